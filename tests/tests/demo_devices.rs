//! The demo kernel's device roles on real KVM (guest-kernel-demo/src/devices.rs and
//! blkbench.rs): `role=devices` (PV console + PV block: pattern written with several
//! multi-segment requests in flight, flush, per-request errors, disconnect and
//! reconnect, read back and verified), `role=devices-direct` (the same workload on the
//! emulated block device and a passthrough region), `console=uart`, and
//! `role=blkbench` on all three models. After each run the image or region file is
//! read on the host: it holds exactly the guest's pattern where the guest wrote, and
//! zeroes elsewhere.

use std::path::PathBuf;

use hv_core::devices::disk::DiskSpec;
use hv_core::devices::passthrough::RegionSpec;
use hv_core::devices::{ConsoleInput, ConsoleSpec, DeviceSpec};
use hv_core::{DomainConfig, Outcome};
use tests::{demo_kernel, kvm_available, run_elf, GuestRun};

/// The demo's pattern word at byte offset `off` (devices.rs `pattern`).
fn pattern(tag: u64, off: u64) -> u64 {
    tag << 48 | (off & 0xFFFF_FFFF_FFFF)
}
const TAG_PV: u64 = 0x5056;
const TAG_EMU: u64 = 0x454D;
const TAG_PT: u64 = 0x5054;
/// devices.rs: START_SECTOR, END_SECTOR (PV), EMU_SECTORS, PT_BYTES.
const START: u64 = 8 * 512;
const PV_END: u64 = (8 + 188) * 512;
const EMU_END: u64 = (8 + 192) * 512;
const PT_END: u64 = 96 << 10;

/// A file path in a fresh per-test directory under the system's temporary directory
/// (removed when the value drops).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("hv-demo-devices-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(path: PathBuf, size: u64) -> DiskSpec {
    DiskSpec {
        path,
        create_size: Some(size),
        readonly: false,
    }
}

fn run_demo(name: &str, cmdline: &str, devices: Vec<DeviceSpec>, console: ConsoleSpec) -> GuestRun {
    let config = DomainConfig {
        name: name.to_string(),
        cmdline: cmdline.to_string(),
        devices,
        console_spec: console,
        ..DomainConfig::default()
    };
    run_elf(demo_kernel(), config).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Checks that `bytes` holds the pattern of `tag` in `start..end` and zeroes elsewhere.
fn assert_pattern(bytes: &[u8], tag: u64, start: u64, end: u64, what: &str) {
    for (i, w) in bytes.chunks_exact(8).enumerate() {
        let off = 8 * i as u64;
        let got = u64::from_le_bytes(w.try_into().unwrap());
        let want = if (start..end).contains(&off) {
            pattern(tag, off)
        } else {
            0
        };
        assert_eq!(got, want, "{what}: word at offset {off:#x}");
    }
}

#[test]
fn pv_console_and_pv_block_workload_leaves_the_pattern_in_the_image() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("pv");
    let img = dir.file("pv.img");
    let size = 1 << 20;
    let run = run_demo(
        "devices",
        "role=devices",
        vec![DeviceSpec::PvBlock(disk(img.clone(), size))],
        ConsoleSpec::default(),
    );
    run.assert_poweroff(0);
    run.line_with("demo devices: printing through the PV console (page 0x5000");
    run.line_with("demo devices: device 0: console base 0x5000");
    run.line_with("demo devices: device 1: uart base 0x3f8 size 8");
    run.line_with(&format!(
        "demo devices: device 2: pv-block base 0x0 size {} state initialising",
        size / 512
    ));
    run.line_with(&format!(
        "demo devices: pv block: device 2 connected ({} sectors)",
        size / 512
    ));
    run.line_with("demo devices: pv block: wrote sectors 8..196 (96256 bytes) with 3 requests in flight (11 + 11 + 3 segments): 3 responses ok",
    );
    run.line_with("demo devices: pv block: flush ok");
    run.line_with("(beyond the disk) refused with ERANGE");
    run.line_with(
        "demo devices: pv block: disconnected (state closed) and reconnected (state connected)",
    );
    run.line_with("demo devices: pv block: read back 96256 bytes with 3 requests after the reconnect: pattern verified",
    );
    run.line_with("demo devices: all parts passed");
    let bytes = std::fs::read(&img).expect("image");
    assert_eq!(bytes.len() as u64, size);
    assert_pattern(&bytes, TAG_PV, START, PV_END, "PV image");
}

#[test]
fn pv_console_input_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("input");
    let input = dir.file("input.txt");
    std::fs::write(&input, "hello from the host\n").expect("input file");
    let run = run_demo(
        "devices-input",
        "role=devices echo-input",
        vec![DeviceSpec::PvBlock(disk(dir.file("pv.img"), 1 << 20))],
        ConsoleSpec {
            output: None,
            input: ConsoleInput::File(input),
        },
    );
    run.assert_poweroff(0);
    run.line_with("demo devices: console input: hello from the host");
    run.line_with("demo devices: all parts passed");
}

#[test]
fn emulated_and_passthrough_workload_leaves_the_pattern_in_the_files() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("direct");
    let img = dir.file("emu.img");
    let region = dir.file("region.bin");
    let (disk_size, region_size) = (1 << 20, 2 << 20);
    let run = run_demo(
        "devices-direct",
        "role=devices-direct",
        vec![
            DeviceSpec::EmuBlock(disk(img.clone(), disk_size)),
            DeviceSpec::Passthrough(RegionSpec {
                path: region.clone(),
                size: region_size,
                create: true,
            }),
        ],
        ConsoleSpec::default(),
    );
    run.assert_poweroff(0);
    run.line_with(&format!(
        "demo devices-direct: device 2: emu-block base 0x410 size {} state connected",
        disk_size / 512
    ));
    let l = run.line_with("demo devices-direct: device 3: passthrough base 0x");
    assert!(
        l.ends_with(&format!("size {region_size} state connected")),
        "{l}"
    );
    run.line_with("demo devices-direct: emulated block: device 2: wrote sectors 8..200 (98304 bytes) in 2 commands, flush ok, read back and verified; a read beyond the disk refused with ERANGE",
    );
    run.line_with(&format!(
            "({region_size} bytes): wrote 98304 bytes with plain stores from ring 3, read back and verified"
        ),
    );
    run.line_with("demo devices-direct: all parts passed");
    let bytes = std::fs::read(&img).expect("image");
    assert_eq!(bytes.len() as u64, disk_size);
    assert_pattern(&bytes, TAG_EMU, START, EMU_END, "emulated image");
    let bytes = std::fs::read(&region).expect("region file");
    assert_eq!(bytes.len() as u64, region_size);
    assert_pattern(&bytes, TAG_PT, 0, PT_END, "passthrough region");
}

#[test]
fn console_uart_prints_everything_through_the_uart() {
    if !kvm_available() {
        return;
    }
    // The same workload, every line through the 16550 (no PV console, no console
    // hypercall): the lines still reach the domain's console.
    let dir = Scratch::new("uart");
    let run = run_demo(
        "devices-uart",
        "role=devices-direct console=uart",
        vec![
            DeviceSpec::EmuBlock(disk(dir.file("emu.img"), 1 << 20)),
            DeviceSpec::Passthrough(RegionSpec {
                path: dir.file("region.bin"),
                size: 2 << 20,
                create: true,
            }),
        ],
        ConsoleSpec::default(),
    );
    run.assert_poweroff(0);
    run.line_with("demo devices-direct: all parts passed");
    let stats = &run.report.stats;
    let console_calls = stats.ops[hv_abi::Op::ConsoleIo as usize].count;
    assert_eq!(console_calls, 0, "console hypercalls with console=uart");
    let evtchn_calls = stats.ops[hv_abi::Op::EventChannelOp as usize].count;
    assert_eq!(
        evtchn_calls, 0,
        "event-channel hypercalls (PV console) with console=uart"
    );
}

/// Runs `role=blkbench dev=<dev> <args>` with a device of `size` bytes backed by
/// `file`; returns the run and the (count, ns) of its result line.
fn blkbench(dev: &str, args: &str, file: PathBuf, size: u64) -> (GuestRun, u64, u64) {
    let device = match dev {
        "pv" => DeviceSpec::PvBlock(disk(file, size)),
        "emu" => DeviceSpec::EmuBlock(disk(file, size)),
        _ => DeviceSpec::Passthrough(RegionSpec {
            path: file,
            size,
            create: true,
        }),
    };
    let config = DomainConfig {
        name: format!("blkbench-{dev}"),
        cmdline: format!("role=blkbench dev={dev} {args}"),
        allow_user_hypercalls: true,
        devices: vec![device],
        ..DomainConfig::default()
    };
    let run = run_elf(demo_kernel(), config).unwrap_or_else(|e| panic!("blkbench {dev}: {e}"));
    run.assert_poweroff(0);
    let line = run.line_with(&format!("blkbench dev={dev} "));
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    let count = if line.contains(" ops=") {
        field("ops=")
    } else {
        field("bytes=")
    };
    let ns = field("ns=");
    assert!(ns > 0, "{line}");
    (run, count, ns)
}

#[test]
fn blkbench_writes_the_pattern_on_all_three_models() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("bench");
    // 300 KiB: several PV requests of 44 KiB (the last one shorter), several emulated
    // commands, and wrapping on the 256 KiB devices (the first 44 KiB are written
    // twice with the same pattern of their offsets).
    let bytes = 300 << 10;
    let size = 256 << 10;
    for (dev, tag) in [("pv", TAG_PV), ("emu", TAG_EMU), ("pt", TAG_PT)] {
        let file = dir.file(&format!("{dev}.img"));
        let (run, n, _) = blkbench(dev, &format!("bytes={bytes}"), file.clone(), size);
        assert_eq!(n, bytes, "{}", run.console);
        let data = std::fs::read(&file).expect("image");
        assert_eq!(data.len() as u64, size);
        assert_pattern(&data, tag, 0, size, dev);
    }
}

#[test]
fn blkbench_pv_iops_writes_single_pages() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("iops");
    let file = dir.file("pv.img");
    let (run, ops, _) = blkbench("pv", "op=iops ops=40", file.clone(), 1 << 20);
    assert_eq!(ops, 40, "{}", run.console);
    let data = std::fs::read(&file).expect("image");
    assert_pattern(&data, TAG_PV, 0, 40 * 4096, "iops image");
}

#[test]
fn blkbench_pv_needs_user_hypercalls() {
    if !kvm_available() {
        return;
    }
    let dir = Scratch::new("nouser");
    let config = DomainConfig {
        name: "blkbench-nouser".into(),
        cmdline: "role=blkbench dev=pv bytes=4096".into(),
        devices: vec![DeviceSpec::PvBlock(disk(dir.file("pv.img"), 1 << 20))],
        ..DomainConfig::default()
    };
    let run = run_elf(demo_kernel(), config).expect("run");
    run.assert_poweroff(1);
    run.line_with("blkbench: FAILED: dev=pv notifies from ring 3: start the domain with allow_user_hypercalls",
    );
}

#[test]
fn the_devices_example_runs_and_fills_its_images() {
    if !kvm_available() {
        return;
    }
    // examples/devices.toml as shipped, with its images moved from target/ to a
    // scratch directory.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join("devices.toml")).expect("example");
    let dir = Scratch::new("example");
    let text = text.replace("../target/", &format!("{}/", dir.0.display()));
    let config = hv_core::config::Config::parse(&text, &examples).expect("the example parses");
    let kernels = config
        .load_kernels(hv_core::DEMO_KERNEL)
        .expect("kernels load");
    let bufs = std::sync::Mutex::new(Vec::new());
    let hv = config
        .build(tests::kvm(), &kernels, |d| {
            let (sink, buf) = hv_core::ConsoleSink::capture();
            bufs.lock().unwrap().push((d.name.clone(), buf));
            sink
        })
        .expect("domains are created");
    let consoles = bufs.into_inner().unwrap();
    let buffers: Vec<_> = consoles.iter().map(|(_, b)| b.clone()).collect();
    let results = tests::run_bounded(hv, "examples/devices.toml", &buffers);
    for (r, (name, buf)) in results.iter().zip(&consoles) {
        let console = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        assert_eq!(&r.name, name);
        let report = r.report.as_ref().expect("the domain ran");
        assert!(
            matches!(report.outcome, Outcome::Poweroff { code: 0 }),
            "{name}: {}; console:\n{console}",
            report.outcome
        );
        assert!(console.contains("all parts passed"), "{name}:\n{console}");
    }
    assert_eq!(results.len(), 2);
    let read = |f: &str| std::fs::read(dir.file(f)).expect(f);
    assert_pattern(&read("hv-demo-pv.img"), TAG_PV, START, PV_END, "pv.img");
    assert_pattern(&read("hv-demo-emu.img"), TAG_EMU, START, EMU_END, "emu.img");
    assert_pattern(&read("hv-demo-region.bin"), TAG_PT, 0, PT_END, "region.bin");
}
