//! The PV block back-end on real KVM (SPEC.md §8.9.3, §8.9.5), driven by the test
//! guest's raw front-end (tests/test-guest/src/blk.rs): the device table, dev_op and its
//! refusals, multi-segment writes and reads, flush, every malformed request, the
//! notification rules, grant flags, disconnect and reconnect, a read-only disk, a
//! broken ring, and the image file after the domain exits, byte for byte.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hv_abi::evtchn::{EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_UNBOUND};
use hv_core::devices::disk::DiskSpec;
use hv_core::devices::DeviceSpec;
use hv_core::{ConsoleSink, DomainConfig, Outcome};
use tests::{kvm_available, scenario_with, GuestRun};

const ENOENT: i64 = -2;
const EFAULT: i64 = -14;
const EACCES: i64 = -13;
const EBUSY: i64 = -16;
const ENODEV: i64 = -19;
const EINVAL: i64 = -22;
const ERANGE: i64 = -34;
const ENOSYS: i64 = -38;

const SECTORS: u64 = 2048;
const DOMID_HV: i64 = 0x7FF2;

/// The test guest's data pattern (blk.rs `pattern`).
fn pattern(salt: u64, page: u64, word: u64) -> u64 {
    (salt << 56) ^ (page << 40) ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The bytes of data page `page` with `salt`.
fn page_bytes(salt: u64, page: u64) -> Vec<u8> {
    (0..512)
        .flat_map(|w| pattern(salt, page, w).to_le_bytes())
        .collect()
}

/// The segment shape of data page `i` of the 11-segment write (blk.rs `shape`).
fn shape(i: u64) -> (usize, usize) {
    ((i % 3) as usize, 7 - (i % 2) as usize)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("hv-pvblk-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pv(path: &Path, create: Option<u64>, readonly: bool) -> DeviceSpec {
    DeviceSpec::PvBlock(DiskSpec {
        path: path.to_path_buf(),
        create_size: create,
        readonly,
    })
}

fn expect(run: &GuestRun, pairs: &[(&str, i64)]) {
    for (k, v) in pairs {
        assert_eq!(run.int(k), *v, "{k}; console:\n{}", run.console);
    }
}

#[test]
fn every_request_kind_and_refusal_and_the_image_after_exit() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("all");
    let img = dir.path("disk.img");
    let ro_img = dir.path("ro.img");
    let ro_data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&ro_img, &ro_data).unwrap();
    let config = DomainConfig {
        devices: vec![
            pv(&img, Some(SECTORS * 512), false),
            pv(&ro_img, None, true),
        ],
        ..DomainConfig::default()
    };
    let run = scenario_with("blk", "", config);
    run.assert_poweroff(0);

    // The device table and start_info.
    expect(
        &run,
        &[
            ("nr_devices", 4),
            ("dev0_kind", 1),
            ("dev0_state", 4),
            ("dev0_base", 0x5000),
            ("dev1_kind", 5),
            ("dev1_base", 0x3F8),
            ("blk_dev", 2),
            ("blk_sectors", SECTORS as i64),
            ("blk_state", 1),
            ("blk_backend", DOMID_HV),
            ("console_gpa", 0x5000),
        ],
    );
    assert!(run.int("console_evtchn") > 0);

    // dev_op refusals, none of which leaves the ring grant pinned.
    expect(
        &run,
        &[
            ("dev_connect_console", EINVAL),
            ("dev_connect_uart", EINVAL),
            ("dev_connect_nodev", ENODEV),
            ("dev_state_nodev", ENODEV),
            ("dev_bad_cmd", EINVAL),
            ("dev_reserved", EINVAL),
            ("dev_efault", EFAULT),
            ("dev_ring_ro", EACCES),
            ("dev_ring_range", ENOENT),
            ("dev_ring_not_granted", EACCES),
            ("dev_port_ipi", EINVAL),
            ("dev_port_self", EINVAL),
            ("dev_port_bad", EINVAL),
            ("dev_disconnect_console", EINVAL),
            ("dev_disconnect_idle", EBUSY),
            ("dev_state_console", 4),
            ("dev_state_initial", 1),
            ("ring_flags_after_refusals", 0x1),
        ],
    );

    // Connected: ring pinned (PERMIT | READING | WRITING), port bound to DOMID_HV.
    expect(
        &run,
        &[
            ("connect", 0),
            ("state_connected", 4),
            ("table_state", 4),
            ("ring_flags", 0x19),
            ("ring_revoke_busy", 1),
            ("port_status", i64::from(EVTCHNSTAT_INTERDOMAIN)),
            ("port_remote", DOMID_HV),
            ("connect_again", EBUSY),
        ],
    );

    // Data: writes, flush, read-back; a read-only grant is enough to write from.
    expect(
        &run,
        &[
            ("write1", 0),
            ("write11", 0),
            ("flush", 0),
            ("read11", 0),
            ("read1", 0),
            ("readback", 1),
            ("write_ro_grant", 0),
            ("read_into_ro_grant", EACCES),
            ("partial_bad_gref", ENOENT),
        ],
    );

    // Malformed requests: one error status each; segment pins released.
    expect(
        &run,
        &[
            ("st_bad_op", ENOSYS),
            ("st_no_segs", EINVAL),
            ("st_12_segs", EINVAL),
            ("st_first_gt_last", EINVAL),
            ("st_last_8", EINVAL),
            ("st_handle", EINVAL),
            ("st_reserved", EINVAL),
            ("st_seg_reserved", EINVAL),
            ("st_flush_sector", EINVAL),
            ("st_flush_segs", EINVAL),
            ("st_range", ERANGE),
            ("st_range_wrap", ERANGE),
            ("st_gref_range", ENOENT),
            ("st_not_granted", EACCES),
            ("st_other_dom", EACCES),
            ("ids_ok", 1),
            ("seg_flags", 0x1),
            ("ro_flags", 0x5),
        ],
    );

    // Events only when the front-end's rsp_event asks.
    expect(
        &run,
        &[("no_event_unless_asked", 1), ("event_when_asked", 1)],
    );
    assert_eq!(
        run.value("barriers"),
        Some("-16,-16,-16"),
        "{}",
        run.console
    );

    // Disconnect releases the ring and the port; reconnect on the same port works.
    expect(
        &run,
        &[
            ("disconnect", 0),
            ("state_closed", 6),
            ("table_error", 0),
            ("ring_flags_closed", 0x1),
            ("ring_revoke", 1),
            ("port_status_closed", i64::from(EVTCHNSTAT_UNBOUND)),
            ("port_remote_closed", DOMID_HV),
            ("disconnect_again", EBUSY),
            ("reconnect", 0),
            ("reconnect_read", 0),
            ("reconnect_data", 1),
            ("last_sector", 0),
            ("beyond_end", ERANGE),
            ("flush2", 0),
        ],
    );

    // The read-only disk.
    expect(
        &run,
        &[
            ("ro_connect", 0),
            ("ro_write", EACCES),
            ("ro_read", 0),
            ("ro_table_flags", 1),
        ],
    );

    // The image holds exactly what was written: sector 0 (page 0), 11 segments from
    // sector 100, the read-only grant's page at 200, the last sector; nothing else
    // (the refused partial write at 300 moved no data).
    let mut want = vec![0u8; hv_core::conv::usize_from(SECTORS * 512)];
    want[..4096].copy_from_slice(&page_bytes(1, 0));
    let mut at = 100 * 512;
    for i in 0..11u64 {
        let (f, l) = shape(i);
        let p = page_bytes(1, i + 1);
        let chunk = &p[f * 512..(l + 1) * 512];
        want[at..at + chunk.len()].copy_from_slice(chunk);
        at += chunk.len();
    }
    want[200 * 512..200 * 512 + 4096].copy_from_slice(&page_bytes(3, 99));
    let last = (hv_core::conv::usize_from(SECTORS) - 1) * 512;
    want[last..].copy_from_slice(&page_bytes(1, 2)[7 * 512..]);
    let got = std::fs::read(&img).unwrap();
    assert_eq!(got.len(), want.len());
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the image differs from what was written");
    assert_eq!(std::fs::read(&ro_img).unwrap(), ro_data);
}

#[test]
fn a_broken_ring_closes_the_device_and_a_new_ring_connects() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("overflow");
    let img = dir.path("disk.img");
    let config = DomainConfig {
        devices: vec![pv(&img, Some(SECTORS * 512), false)],
        ..DomainConfig::default()
    };
    let run = scenario_with("blk-overflow", "", config);
    run.assert_poweroff(0);
    expect(
        &run,
        &[
            ("ov_connect", 0),
            ("ov_state", 6),
            ("ov_error", EINVAL),
            ("ov_ring_flags", 0x1),
            ("ov_port_status", i64::from(EVTCHNSTAT_UNBOUND)),
            ("ov_port_remote", DOMID_HV),
            ("ov_send_after", 0),
            ("ov_reconnect", 0),
            ("ov_read", 0),
            ("ov_error_cleared", 0),
            ("ov2_state", 6),
            ("ov2_error", EINVAL),
            ("pc_connect", 0),
            ("pc_close", 0),
            ("pc_send", -1),
            ("pc_disconnect", 0),
            ("pc_state", 6),
            ("pc_ring_flags", 0x1),
        ],
    );
}

/// Waits until the captured console holds `needle` (the guest prints it and then waits
/// for the host); panics after a long while.
fn wait_for(buf: &std::sync::Mutex<Vec<u8>>, needle: &str) -> String {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} from the guest; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn word(text: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in {text}"))
        .to_string()
}

#[test]
fn a_write_is_in_the_file_when_answered_and_a_flush_is_answered_after_fdatasync() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("flush");
    let img = dir.path("disk.img");
    let image =
        hv_core::loader::KernelImage::from_elf(tests::TEST_GUEST).expect("test guest loads");
    let mut hv = hv_core::hypervisor::Hypervisor::new(tests::kvm());
    let (sink, buf) = ConsoleSink::capture();
    let config = DomainConfig {
        name: "flush".into(),
        domid: 1,
        cmdline: "scenario=blk-flush".into(),
        console: sink,
        devices: vec![pv(&img, Some(SECTORS * 512), false)],
        ..DomainConfig::default()
    };
    hv.create_domain(config, &image).expect("create");
    let running = hv.start();
    let dom = running.domains().next().expect("one domain").clone();

    // The write's response has come back: its data is in the file, and no flush ran.
    let text = wait_for(&buf, "write_done=1");
    assert_eq!(word(&text, "write"), "0", "{text}");
    let go = u64::from_str_radix(word(&text, "go").trim_start_matches("0x"), 16).unwrap();
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[8 * 512..8 * 512 + 4096], &page_bytes(7, 0)[..]);
    let s = dom.devices.blk_stats(2).expect("PV block device 2");
    assert_eq!((s.requests, s.flushes, s.bytes), (1, 0, 4096));

    // The flush's response has come back: its fdatasync had returned before.
    dom.mem.write_obj(go, &1u64).unwrap();
    let text = wait_for(&buf, "flush_done=1");
    assert_eq!(word(&text, "flush"), "0", "{text}");
    let s = dom.devices.blk_stats(2).unwrap();
    assert_eq!((s.requests, s.flushes, s.errors), (2, 1, 0));

    dom.mem.write_obj(go, &2u64).unwrap();
    let results = tests::wait_bounded(running, "blk-flush", std::slice::from_ref(&buf));
    let report = results[0].report.as_ref().expect("ran");
    assert!(
        matches!(report.outcome, Outcome::Poweroff { code: 0 }),
        "{}",
        report.outcome
    );
    // After the domain's end the back-end is gone: the device's ring is released.
    let s = dom.devices.blk_stats(2).unwrap();
    assert_eq!(s.connects, 1);
}

#[test]
fn bad_disks_are_refused_before_the_domain_exists() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("bad");
    let odd = dir.path("odd.img");
    std::fs::write(&odd, [0u8; 700]).unwrap();
    for spec in [
        pv(&dir.path("missing.img"), None, false),
        pv(&odd, None, false),
        pv(&dir.path("new.img"), Some(1000), false),
    ] {
        let config = DomainConfig {
            devices: vec![spec.clone()],
            ..DomainConfig::default()
        };
        let e = tests::run_elf(tests::TEST_GUEST, config).expect_err("refused");
        assert!(e.is_user_error(), "{e}");
        assert!(e.to_string().contains("disk #1"), "{e}");
    }
}
