//! Host faults through the `hv` binary on real KVM: a passthrough region whose file
//! cannot back the guest's pages (its file system is full) stops the domain with exit
//! status 1 and a message naming the file and the errno; it is not a guest crash (100).
//! (Truncating a region's file under a running domain: tests/tests/emulated.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{hv, kvm_available, test_guest, text};

const REGION: u64 = 4 << 20;

/// A small tmpfs that the test mounts on a fresh directory; unmounted and removed when
/// dropped, also when the test fails. Mounting needs root (CAP_SYS_ADMIN).
struct Tmpfs {
    dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("hv-host-fault-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the mount point");
        let mut fs = Tmpfs {
            dir,
            mounted: false,
        };
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "hv-test",
            ])
            .arg(&fs.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} failed (this test needs root): {}",
            fs.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        fs.mounted = true;
        fs
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sparse file of `REGION` bytes (no blocks allocated).
fn sparse(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(REGION))
        .expect("create the sparse region file");
}

/// Checks what `pt-fill` left in the file: each page it reached holds its own
/// guest-physical address at 0x10, from the first page on without a gap, and nothing
/// after the page the host could not back. Returns the number of pages written.
fn filled_pages(path: &Path) -> u64 {
    let raw = std::fs::read(path).expect("read the region file");
    let at = |off: usize| u64::from_le_bytes(raw[off..off + 8].try_into().unwrap());
    let base = at(0x10);
    assert!(base != 0 && base % (2 << 20) == 0, "page 0 holds {base:#x}");
    let pages = REGION / 4096;
    let filled = (0..pages)
        .take_while(|p| at(hv_core::conv::usize_from(p * 4096 + 0x10)) == base + p * 4096)
        .count() as u64;
    assert!(
        (0..raw.len())
            .skip(hv_core::conv::usize_from(filled * 4096))
            .all(|i| raw[i] == 0),
        "data after the first {filled} pages"
    );
    filled
}

#[test]
fn a_full_file_system_under_a_passthrough_region_is_a_host_fault_not_a_crash() {
    if !kvm_available() {
        return;
    }
    // 1 MiB of tmpfs holding a sparse 4 MiB region: the guest writes every page in order
    // and the 257th cannot be allocated.
    let fs = Tmpfs::mount("full", "1M");
    let guest = test_guest().display().to_string();
    for ring in [0, 3] {
        let file = fs.dir.join(format!("region-ring{ring}.bin"));
        sparse(&file);
        let path = file.display().to_string();
        let out = hv(&[
            "run",
            &guest,
            "--cmdline",
            &format!("scenario=pt-fill ring={ring}"),
            "--passthrough",
            &format!("{path},size=4M"),
        ]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(1),
            "ring {ring}: {stdout}\n{stderr}"
        );
        assert!(!stdout.contains("pt-fill: survived"), "{stdout}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("hv: domain test-guest stopped by a host fault: "))
            .unwrap_or_else(|| panic!("no host fault message: {stderr}"));
        assert!(
            line.contains(&format!("passthrough region {path} cannot be faulted in"))
                && line.contains("No space left on device (os error 28), ENOSPC"),
            "{line}"
        );
        // Ring 3 runs natively on every host: its access fails KVM_RUN with EFAULT. Ring 0
        // is emulated on some hosts (PVM), where KVM reports the failed access as an
        // MMIO exit at the page instead.
        if ring == 3 {
            assert!(
                line.contains("KVM_RUN failed: Bad address (os error 14), EFAULT"),
                "{line}"
            );
        } else {
            assert!(
                line.contains("KVM_RUN failed: Bad address (os error 14), EFAULT")
                    || line.contains("(it reported an MMIO exit) at guest-physical"),
                "{line}"
            );
        }
        assert!(!stderr.contains("crashed"), "{stderr}");
        // The guest did write through the region, up to what the file system holds.
        let filled = filled_pages(&file);
        assert!((200..=256).contains(&filled), "{filled} pages written");
        std::fs::remove_file(&file).expect("remove the region file");
    }

    // The same region in a configuration, next to a domain that powers off normally:
    // status 1, and the summary names the host fault.
    let file = fs.dir.join("region-config.bin");
    sparse(&file);
    let cfg = fs.dir.join("host-fault.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[domain]]\nname = \"ok\"\nkernel = \"{guest}\"\ncmdline = \"scenario=hello\"\n\
             [[domain]]\nname = \"filler\"\nkernel = \"{guest}\"\ncmdline = \"scenario=pt-fill ring=3\"\n\
             [[domain.passthrough]]\npath = \"{}\"\nsize = \"4M\"\n",
            file.display()
        ),
    )
    .expect("write the configuration");
    let out = hv(&["run", "--config", &cfg.display().to_string()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("[ok] test-guest: hello"), "{stdout}");
    let summary = |name: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no summary line for {name}: {stderr}"))
            .to_string()
    };
    assert!(
        summary("ok").ends_with("powered off with code 0"),
        "{stderr}"
    );
    let filler = summary("filler");
    assert!(
        filler.contains("stopped by a host fault")
            && filler.contains(&file.display().to_string())
            && filler.contains("ENOSPC"),
        "{filler}"
    );
    assert!(!stderr.contains("crashed"), "{stderr}");
}
