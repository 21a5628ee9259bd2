//! Hypervisor-emulated devices and passthrough regions on real KVM (SPEC 8.9): the
//! emulated block device (data in the image after exit, every register error), the
//! 16550 UART of a guest that prints through nothing else, and passthrough regions
//! (data both ways with no exits, PV MMU rules, exclusivity, detach, reassignment), and
//! a region whose file the host can no longer back (truncated): a host fault, not a
//! guest crash.

use std::path::{Path, PathBuf};

use hv_core::devices::disk::DiskSpec;
use hv_core::devices::passthrough::{region_gpas, RegionSpec};
use hv_core::devices::DeviceSpec;
use hv_core::domain::Domain;
use hv_core::hypervisor::Hypervisor;
use hv_core::loader::KernelImage;
use hv_core::outcome::{BackingCause, HostFault, HostMemory};
use hv_core::stats::ExitKind;
use hv_core::{ConsoleSink, CrashReason, DomainConfig, Outcome};
use tests::{kvm, kvm_available, scenario_with, GuestRun, TEST_GUEST};

const EINVAL: i64 = 22;
const EACCES: i64 = 13;
const ERANGE: i64 = 34;
const ERROR: i64 = 1 << 31;

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hv-emulated-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn expect(run: &GuestRun, pairs: &[(&str, i64)]) {
    for (k, v) in pairs {
        assert_eq!(run.int(k), *v, "{k}; console:\n{}", run.console);
    }
}

fn emu(path: &Path, create_size: Option<u64>, readonly: bool) -> DeviceSpec {
    DeviceSpec::EmuBlock(DiskSpec {
        path: path.to_path_buf(),
        create_size,
        readonly,
    })
}

fn region(path: &Path, size: u64) -> RegionSpec {
    RegionSpec {
        path: path.to_path_buf(),
        size,
        create: true,
    }
}

fn with_devices(devices: Vec<DeviceSpec>) -> DomainConfig {
    DomainConfig {
        devices,
        ..DomainConfig::default()
    }
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

#[test]
fn emulated_block_write_flush_read_and_the_image_after_exit() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("blk");
    let img = dir.join("emu.img");
    let run = scenario_with(
        "emu-blk",
        "",
        with_devices(vec![emu(&img, Some(64 << 10), false)]),
    );
    run.assert_poweroff(0);
    expect(
        &run,
        &[
            ("emu_base", 0x410),
            ("emu_sectors", 128),
            ("emu_write_drq", 1),
            ("emu_write", 0),
            ("emu_flush", 0),
            ("emu_read_drq", 1),
            ("emu_read", 0),
            ("emu_read_bad", 0),
            ("emu_rep_drq", 1),
            ("emu_rep", 0),
            ("emu_rep_read", 0),
            ("emu_rep_bad", 0),
        ],
    );
    // Every register access is an exit handled by hv: at least the 512 dword accesses
    // of sectors 1-2 (each `rep` is at least one more).
    let pio = run.report.stats.exits_of(ExitKind::PortIo);
    assert!(pio >= 512 + 2, "only {pio} port-I/O exits");
    // The image holds exactly what the guest wrote, where it wrote it.
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(raw.len(), 64 << 10);
    for i in 0..256 {
        assert_eq!(
            u32_at(&raw, 512 + i * 4),
            0xB10C_0000 | u32::try_from(i).unwrap(),
            "dword {i}"
        );
    }
    for i in 0..128 {
        assert_eq!(
            u32_at(&raw, 3 * 512 + i * 4),
            0x5EC3_0000 | u32::try_from(i).unwrap(),
            "rep dword {i}"
        );
    }
    assert!(raw[..512].iter().all(|b| *b == 0));
    assert!(raw[4 * 512..].iter().all(|b| *b == 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn emulated_block_register_errors() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("errors");
    let (img, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    std::fs::write(&ro, vec![0x5Au8; 4096]).unwrap();
    let run = scenario_with(
        "emu-errors",
        "",
        with_devices(vec![emu(&img, Some(16 << 10), false), emu(&ro, None, true)]),
    );
    run.assert_poweroff(0);
    let err = |e: i64| ERROR | e;
    expect(
        &run,
        &[
            ("err_range", err(ERANGE)),
            ("err_range_hi", err(ERANGE)),
            ("err_count0", err(EINVAL)),
            ("err_count_big", err(EINVAL)),
            ("err_data_idle", err(EINVAL)),
            ("data_idle_value", 0xFFFF_FFFF),
            ("err_data_dir", err(EINVAL)),
            ("err_cmd", err(EINVAL)),
            // Ignored accesses: STATUS keeps the last command's error, a 16-bit write
            // leaves COUNT at 1, write-only registers and narrow reads are all ones.
            ("status_write_ignored", err(EINVAL)),
            ("narrow_write_ignored", 1),
            ("write_only_read", 0xFFFF_FFFF),
            ("narrow_read", 0xFF),
            ("err_ro", err(EACCES)),
            ("recover", 0),
        ],
    );
    // Nothing reached either image.
    assert!(std::fs::read(&img).unwrap().iter().all(|b| *b == 0));
    assert!(std::fs::read(&ro).unwrap().iter().all(|b| *b == 0x5A));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn uart_output_of_a_guest_without_pv_console() {
    if !kvm_available() {
        return;
    }
    let run = scenario_with("uart", "", DomainConfig::default());
    run.assert_poweroff(0);
    assert!(
        run.console
            .lines()
            .any(|l| l == "uart: hello from a guest without PV drivers"),
        "console:\n{}",
        run.console
    );
    expect(
        &run,
        &[
            ("uart_scratch", 0x5A),
            ("uart_divisor", 1),
            ("uart_lsr", 0x60),
        ],
    );
    // Only the UART carried the text: no console hypercall at all.
    assert_eq!(run.report.stats.op(hv_abi::Op::ConsoleIo).count, 0);
    assert!(run.report.stats.exits_of(ExitKind::PortIo) > 50);
}

#[test]
fn uart_output_goes_to_the_console_file() {
    if !kvm_available() {
        return;
    }
    // A domain whose console sink is a file gets its UART output there too.
    let dir = scratch("uartfile");
    let out = dir.join("console.txt");
    let mut config = DomainConfig::default();
    config.console_spec.output = Some(out.clone());
    config.name = "uart-file".into();
    config.cmdline = "scenario=uart".into();
    let report = hv_core::domain::run_elf(&kvm(), config, TEST_GUEST).unwrap();
    assert!(matches!(report.outcome, Outcome::Poweroff { code: 0 }));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("uart: hello from a guest without PV drivers\n"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const REGION: u64 = 64 << 10;
const HOST_MARK: u64 = 0x4057_0000_0000_00AA;

/// Checks what the `pt` scenario left in the region's file.
fn check_region_file(path: &Path, mark: u64) {
    let raw = std::fs::read(path).unwrap();
    assert_eq!(raw.len() as u64, REGION);
    assert_eq!(u64_at(&raw, 8), mark);
    for p in 0..(REGION / 4096) as usize {
        assert_eq!(u64_at(&raw, p * 4096 + 0x10), 0x9A6E_0000_0000 | p as u64);
    }
    for j in 0..256 {
        assert_eq!(
            u64_at(&raw, 4096 + 0x100 + j * 8),
            0xC0DE_0000_0000 | j as u64
        );
    }
    assert_eq!(u64_at(&raw, 2 * 4096 + 0x20), 0x3333_0000_0003);
}

#[test]
fn passthrough_data_both_ways_without_exits() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("pt");
    let file = dir.join("region.bin");
    // The host writes before the guest runs.
    let mut init = vec![0u8; hv_core::conv::usize_from(REGION)];
    init[..8].copy_from_slice(&HOST_MARK.to_le_bytes());
    std::fs::write(&file, &init).unwrap();
    let run = scenario_with(
        "pt",
        "mark=7",
        with_devices(vec![DeviceSpec::Passthrough(RegionSpec {
            path: file.clone(),
            size: REGION,
            create: false,
        })]),
    );
    run.assert_poweroff(0);
    let gpa = run.uint("pt_gpa");
    assert_eq!(gpa % (2 << 20), 0);
    expect(
        &run,
        &[
            ("pt_size", REGION as i64),
            ("pt_state", 4),
            ("pt_prev", 0),
            ("pt_host", HOST_MARK as i64),
            ("pt_seq_bad", 0),
            // A region frame maps as data, never as a page table.
            ("pt_map", 0),
            ("pt_alias", 1),
            ("pt_unmap", 0),
            ("pt_pin", -EINVAL),
            ("pt_l2", -EACCES),
            // Ring 3 reaches it through the boot mapping.
            ("pt_ring3", 1),
            ("pt_ring3_vector", 6),
        ],
    );
    // Hundreds of loads and stores, and not one of them left the guest.
    let stats = &run.report.stats;
    assert_eq!(stats.exits_of(ExitKind::Mmio), 0, "{stats}");
    assert_eq!(stats.exits_of(ExitKind::PortIo), 0, "{stats}");
    check_region_file(&file, 7);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pt_domain(
    name: &str,
    domid: u32,
    file: &Path,
    mark: u64,
) -> (DomainConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (sink, buf) = ConsoleSink::capture();
    (
        DomainConfig {
            name: name.into(),
            domid,
            cmdline: format!("scenario=pt mark={mark}"),
            console: sink,
            devices: vec![DeviceSpec::Passthrough(region(file, REGION))],
            ..DomainConfig::default()
        },
        buf,
    )
}

fn text(buf: &std::sync::Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

#[test]
fn passthrough_is_exclusive_and_detach_reassign_work() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("excl");
    let file = dir.join("region.bin");
    let image = KernelImage::from_elf(TEST_GUEST).unwrap();
    let mut hv = Hypervisor::new(kvm());
    let registry = hv.registry().clone();

    // a holds the region; b cannot have it meanwhile.
    let (ca, buf_a) = pt_domain("a", 1, &file, 1);
    hv.create_domain(ca, &image).unwrap();
    assert_eq!(hv.regions().owner(&file), Some(1));
    let a_gpa = region_gpas(hv.domain(1).unwrap().shared().mem.pool_end(), &[REGION])[0];
    let (cb, buf_b) = pt_domain("b", 2, &file, 2);
    let e = hv.create_domain(cb.clone(), &image).unwrap_err();
    assert!(
        e.to_string().contains("is already assigned to domain 1"),
        "{e}"
    );
    assert!(e.is_user_error());
    assert!(hv.domain(2).is_none());

    // Detached from a, the region can go to b.
    hv.detach_region(1, &file).unwrap();
    assert_eq!(hv.regions().owner(&file), None);
    assert!(hv.detach_region(1, &file).is_err());
    hv.create_domain(cb, &image).unwrap();
    assert_eq!(hv.regions().owner(&file), Some(2));

    let results = tests::run_bounded(hv, "passthrough a, b", &[buf_a.clone(), buf_b.clone()]);
    // a's region is gone from its guest-physical space: its first access is an exit
    // to hv for memory no one has, and a dies of it.
    let ra = results[0].report.as_ref().unwrap();
    match &ra.outcome {
        Outcome::Crash(c) => match &c.reason {
            // The scenario's first access: the u64 at offset 8.
            CrashReason::UnknownMmio { gpa, .. } => assert_eq!(*gpa, a_gpa + 8),
            other => panic!("a crashed of {other}; console:\n{}", text(&buf_a)),
        },
        other => panic!("a ended with {other}; console:\n{}", text(&buf_a)),
    }
    let rb = results[1].report.as_ref().unwrap();
    assert!(
        matches!(rb.outcome, Outcome::Poweroff { code: 0 }),
        "b: {}; console:\n{}",
        rb.outcome,
        text(&buf_b)
    );
    assert!(text(&buf_b).contains("pt_prev=0x0 "), "{}", text(&buf_b));
    check_region_file(&file, 2);

    // b is dead: the region was released with it and goes to c, with b's data.
    assert_eq!(registry.regions.owner(&file), None);
    let (cc, buf_c) = pt_domain("c", 3, &file, 3);
    let rc = Domain::create_in(&kvm(), &registry, cc, &image)
        .unwrap()
        .run()
        .unwrap();
    assert!(
        matches!(rc.outcome, Outcome::Poweroff { code: 0 }),
        "c: {}; console:\n{}",
        rc.outcome,
        text(&buf_c)
    );
    assert!(text(&buf_c).contains("pt_prev=0x2 "), "{}", text(&buf_c));
    check_region_file(&file, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits (bounded: about 20 s) until a `pt-spin` guest runs and has written its
/// ready mark into the region's file; fails with its console otherwise.
fn wait_until_spinning(file: &std::path::Path, buf: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    for _ in 0..20_000 {
        let raw = std::fs::read(file).unwrap();
        if u64_at(&raw, 8) == 0x5EAD_4EAD_0000_0001 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("the guest never wrote its region; console:\n{}", text(buf));
}

#[test]
fn passthrough_detach_from_a_running_domain() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("live");
    let file = dir.join("region.bin");
    let image = KernelImage::from_elf(TEST_GUEST).unwrap();
    let mut hv = Hypervisor::new(kvm());
    let registry = hv.registry().clone();
    let (mut config, buf) = pt_domain("spin", 1, &file, 0);
    config.cmdline = "scenario=pt-spin".into();
    hv.create_domain(config, &image).unwrap();
    let gpa = region_gpas(hv.domain(1).unwrap().shared().mem.pool_end(), &[REGION])[0];
    let running = hv.start();
    wait_until_spinning(&file, &buf);
    assert_eq!(registry.regions.owner(&file), Some(1));
    running.detach_region(1, &file).unwrap();
    assert_eq!(registry.regions.owner(&file), None);
    assert!(running.detach_region(1, &file).is_err());
    let dom = running.domains().next().unwrap().clone();
    let results = tests::wait_bounded(running, "pt-spin", std::slice::from_ref(&buf));
    let r = results[0].report.as_ref().unwrap();
    match &r.outcome {
        Outcome::Crash(c) => match &c.reason {
            CrashReason::UnknownMmio { gpa: g, .. } => assert_eq!(*g, gpa + 0x18),
            other => panic!("crashed of {other}; console:\n{}", text(&buf)),
        },
        other => panic!("ended with {other}; console:\n{}", text(&buf)),
    }
    // The device table tells the guest the region is closed.
    let entry = dom
        .devices
        .entries()
        .into_iter()
        .find(|e| e.kind == hv_abi::device::DEV_PASSTHROUGH)
        .unwrap();
    assert_eq!(entry.base, gpa);
    assert_eq!(entry.state, hv_abi::device::STATE_CLOSED);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The host fault that ended a run, or a panic with the outcome and console.
fn host_fault<'a>(outcome: &'a Outcome, console: &str) -> &'a HostFault {
    outcome
        .host_fault()
        .unwrap_or_else(|| panic!("expected a host fault, got {outcome}; console:\n{console}"))
}

/// Checks a host fault of a region whose file was truncated to `file_bytes`: it names
/// the file and the cause, and the address if KVM gave one. KVM either fails KVM_RUN
/// with EFAULT (a native access; on some kernels with the address) or reports the
/// access as an MMIO exit (an emulated one, as guest ring 0 on PVM hosts) at `gpa`.
fn assert_truncated(h: &HostFault, file: &Path, file_bytes: u64, gpa: u64) {
    assert_eq!(
        h.memory,
        Some(HostMemory::Region {
            path: file.to_path_buf(),
            cause: Some(BackingCause::PastEndOfFile {
                file_bytes,
                region_bytes: REGION
            }),
        }),
        "{h}"
    );
    assert!(matches!(h.kvm_errno, None | Some(14)), "{h}");
    if h.kvm_errno.is_none() || h.gpa.is_some() {
        assert_eq!(h.gpa, Some(gpa), "{h}");
    }
    let text = h.to_string();
    assert!(
        text.contains(&format!(
            "passthrough region {} cannot be faulted in: the file was truncated to {file_bytes} bytes",
            file.display()
        )),
        "{text}"
    );
}

#[test]
fn truncating_a_passthrough_file_under_a_running_domain_is_a_host_fault() {
    if !kvm_available() {
        return;
    }
    // The guest reads its region in a loop; the host truncates the file meanwhile. The
    // pages are gone from under the guest: hv names the file and why, exit status 1.
    let dir = scratch("truncate-live");
    let file = dir.join("region.bin");
    let image = KernelImage::from_elf(TEST_GUEST).unwrap();
    let mut hv = Hypervisor::new(kvm());
    let (mut config, buf) = pt_domain("spin", 1, &file, 0);
    config.cmdline = "scenario=pt-spin".into();
    hv.create_domain(config, &image).unwrap();
    let gpa = region_gpas(hv.domain(1).unwrap().shared().mem.pool_end(), &[REGION])[0];
    let running = hv.start();
    wait_until_spinning(&file, &buf);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(0))
        .unwrap();
    let results = running.wait();
    let r = results[0].report.as_ref().unwrap();
    let h = host_fault(&r.outcome, &text(&buf));
    assert_truncated(h, &file, 0, gpa + 0x18);
    assert_eq!(r.outcome.exit_code(), 1);
    assert!(!text(&buf).contains("still mapped"), "{}", text(&buf));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_passthrough_file_truncated_before_the_run_is_a_host_fault_from_both_rings() {
    if !kvm_available() {
        return;
    }
    // The file shrinks to two pages after the region was mapped: the guest's stores to
    // the first two pages land, the third cannot be backed, from ring 0 and ring 3.
    let dir = scratch("truncate");
    let image = KernelImage::from_elf(TEST_GUEST).unwrap();
    for ring in [0, 3] {
        let file = dir.join(format!("region{ring}.bin"));
        let (mut config, buf) = pt_domain("fill", 1, &file, 0);
        config.cmdline = format!("scenario=pt-fill ring={ring}");
        let dom = Domain::create(&kvm(), config, &image).unwrap();
        let gpa = region_gpas(dom.shared().mem.pool_end(), &[REGION])[0];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(2 * 4096))
            .unwrap();
        let r = dom.run().unwrap();
        let h = host_fault(&r.outcome, &text(&buf));
        assert_truncated(h, &file, 2 * 4096, gpa + 2 * 4096 + 0x10);
        if ring == 3 {
            assert_eq!(h.kvm_errno, Some(14), "{h}");
        }
        assert!(!text(&buf).contains("survived"), "{}", text(&buf));
        let raw = std::fs::read(&file).unwrap();
        assert_eq!(raw.len(), 2 * 4096);
        assert_eq!(u64_at(&raw, 0x10), gpa);
        assert_eq!(u64_at(&raw, 4096 + 0x10), gpa + 4096);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
