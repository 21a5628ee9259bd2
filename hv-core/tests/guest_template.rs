//! The guest template (`examples/guest-template/`) as a guest author uses it: copied
//! out of the repository (its `guest-sdk` path pointed at this checkout), built there
//! with plain `cargo build --release` (its own `.cargo/config.toml` picks the target),
//! and run with `hv run`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read template") {
        let e = e.expect("entry");
        let name = e.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

#[test]
fn the_guest_template_builds_outside_the_workspace_and_runs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("hv-guest-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root.join("examples/guest-template"), &dir);
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("template manifest");
    let sdk = root.join("guest-sdk");
    let text = text.replace(
        "path = \"../../guest-sdk\"",
        &format!("path = \"{}\"", sdk.display()),
    );
    assert!(
        text.contains(&sdk.display().to_string()),
        "the template names guest-sdk by path"
    );
    std::fs::write(&manifest, text).expect("write manifest");
    // The workspace's lock file, so that the template gets the dependency versions
    // this checkout is tested with.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).expect("lock file");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release"])
        .current_dir(&dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build of the template failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elf = dir.join("target/x86_64-unknown-none/release/my-guest");
    assert!(elf.is_file(), "no kernel at {}", elf.display());

    if common::kvm_available() {
        let out = Command::new(env!("CARGO_BIN_EXE_hv"))
            .arg("run")
            .arg(&elf)
            .output()
            .expect("run hv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("hello from domain 0 (16384 pages of RAM, 1 vCPUs)"),
            "{stdout}"
        );
        let abi = format!(
            "hv ABI {}.{}, features 0x",
            hv_abi::ABI_MAJOR,
            hv_abi::ABI_MINOR
        );
        assert!(stdout.contains(&abi), "{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
