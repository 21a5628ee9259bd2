//! Block benchmarks: one sequential-write workload on the three device models, and 4 KiB
//! write IOPS on the PV block device.
//!
//! Each run boots the embedded demo kernel with `role=blkbench dev=<pv|emu|pt>
//! bytes=<n>` (or `op=iops`) and the one device it needs, backed by a fresh file in the
//! temporary directory. The guest runs its data loop in ring 3 for all three models (the
//! domain allows user hypercalls, so the PV front-end notifies from ring 3), times it with
//! its own clock (`system_time_ns`, no exit), and prints
//! `blkbench dev=<d> bytes=<n> ns=<t>` (or `ops=<n>`). The floors are measured on the host
//! in the same run: `blk_host_seq_write` writes the same bytes to an image file with
//! `pwrite` in 44 KiB chunks (the most one PV request carries), `blk_host_4k_iops` does
//! single 4 KiB `pwrite`s.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::console::ConsoleSink;
use crate::devices::disk::DiskSpec;
use crate::devices::passthrough::RegionSpec;
use crate::devices::DeviceSpec;
use crate::domain::{Domain, DomainConfig, DomainError};
use crate::loader::KernelImage;
use crate::outcome::Outcome;

use super::BenchError;

/// Bytes each sequential-write run moves (the same for every model). Small because the
/// emulated device takes one exit per 4 bytes.
pub const SEQ_BYTES: u64 = 1 << 20;
/// 4 KiB writes per IOPS run.
pub const IOPS_OPS: u64 = 2048;
/// Repetitions (medians are reported).
pub const REPS: usize = 3;

/// The device model a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// PV block over a shared ring.
    Pv,
    /// The emulated block device (port I/O).
    Emulated,
    /// A passthrough region.
    Passthrough,
}

impl Model {
    fn arg(self) -> &'static str {
        match self {
            Model::Pv => "pv",
            Model::Emulated => "emu",
            Model::Passthrough => "pt",
        }
    }
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("hv-bench-{}-{what}-{n}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn guest_err(msg: String) -> BenchError {
    BenchError::Guest(msg)
}

/// Boots the demo kernel's blkbench role on `model`; returns the guest's `ns=` and the
/// count it reports (`bytes=` or `ops=`).
fn run_guest(model: Model, args: &str, size: u64) -> Result<(u64, u64), BenchError> {
    if crate::DEMO_KERNEL.is_empty() {
        return Err(BenchError::Usage(
            "the block benchmarks need the demo kernel: this hv was built without it".into(),
        ));
    }
    let image = KernelImage::from_elf(crate::DEMO_KERNEL).map_err(DomainError::from)?;
    let file = Scratch::new(model.arg());
    let disk = DiskSpec {
        path: file.0.clone(),
        create_size: Some(size),
        readonly: false,
    };
    let device = match model {
        Model::Pv => DeviceSpec::PvBlock(disk),
        Model::Emulated => DeviceSpec::EmuBlock(disk),
        Model::Passthrough => DeviceSpec::Passthrough(RegionSpec {
            path: file.0.clone(),
            size,
            create: true,
        }),
    };
    let (sink, out) = ConsoleSink::capture();
    let config = DomainConfig {
        name: format!("blkbench-{}", model.arg()),
        mem_bytes: super::BENCH_MEM,
        cmdline: format!("role=blkbench dev={} {args}", model.arg()),
        allow_user_hypercalls: true,
        console: sink,
        devices: vec![device],
        ..DomainConfig::default()
    };
    let kvm = crate::domain::open_kvm()?;
    let report = Domain::create(&kvm, config, &image)?.run()?;
    let text =
        String::from_utf8_lossy(&out.lock().map(|b| b.clone()).unwrap_or_default()).into_owned();
    if !matches!(report.outcome, Outcome::Poweroff { code: 0 }) {
        return Err(guest_err(format!(
            "blkbench dev={} ended with {:?}; console: {text}",
            model.arg(),
            report.outcome
        )));
    }
    let line = text
        .lines()
        .find(|l| l.contains("blkbench dev="))
        .ok_or_else(|| guest_err(format!("no blkbench line in the console output: {text}")))?;
    let field = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let ns = field("ns=").filter(|n| *n > 0);
    let count = field("bytes=").or_else(|| field("ops="));
    match (ns, count) {
        (Some(ns), Some(count)) => Ok((ns, count)),
        _ => Err(guest_err(format!("malformed blkbench line: {line}"))),
    }
}

/// MB/s (10^6 bytes per second) of one sequential write of [`SEQ_BYTES`] on `model`.
pub fn seq_write_once(model: Model) -> Result<f64, BenchError> {
    let (ns, bytes) = run_guest(model, &format!("bytes={SEQ_BYTES}"), 2 * SEQ_BYTES)?;
    if bytes != SEQ_BYTES {
        return Err(guest_err(format!(
            "the guest wrote {bytes} bytes, not {SEQ_BYTES}"
        )));
    }
    Ok(bytes as f64 * 1e3 / ns as f64)
}

/// 4 KiB writes per second on the PV block device, one request in flight at a time.
pub fn pv_4k_iops_once() -> Result<f64, BenchError> {
    let (ns, ops) = run_guest(Model::Pv, &format!("op=iops ops={IOPS_OPS}"), 2 * SEQ_BYTES)?;
    Ok(ops as f64 * 1e9 / ns as f64)
}

/// MB/s of the host writing [`SEQ_BYTES`] to a fresh image file in 44 KiB `pwrite`s.
pub fn host_seq_write_once() -> Result<f64, BenchError> {
    host_writes(44 << 10, SEQ_BYTES).map(|(ns, n)| (n * (44 << 10)) as f64 * 1e3 / ns as f64)
}

/// 4 KiB `pwrite`s per second on the host, to a fresh image file.
pub fn host_4k_iops_once() -> Result<f64, BenchError> {
    host_writes(4096, IOPS_OPS * 4096).map(|(ns, n)| n as f64 * 1e9 / ns as f64)
}

/// Writes `total` bytes in `chunk`-byte `pwrite`s; returns (ns, writes).
fn host_writes(chunk: u64, total: u64) -> Result<(u64, u64), BenchError> {
    let file = Scratch::new("host");
    let f = std::fs::File::create(&file.0).map_err(|e| guest_err(format!("scratch file: {e}")))?;
    f.set_len(2 * total)
        .map_err(|e| guest_err(format!("scratch file: {e}")))?;
    let buf = vec![0x5Au8; crate::conv::usize_from(chunk)];
    let n = total / chunk;
    let t0 = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, i * chunk)
            .map_err(|e| guest_err(format!("scratch write: {e}")))?;
    }
    Ok((crate::conv::duration_ns(t0.elapsed()).max(1), n))
}
