//! `hv bench`: benchmarks on real KVM, each reported against a floor measured in the
//! same run.
//!
//! | name | what | floor |
//! | --- | --- | --- |
//! | `exit_floor` | ns per iteration of a guest loop doing one port-I/O exit, host loop on bare KVM (no sync_regs, no dispatch) | - |
//! | `null_hypercall` | ns per `version` hypercall through the full hv path, same guest loop | `exit_floor` |
//! | `kvm_create_floor` | ms to create a bare VM + vCPU with the same RAM and run to its first exit (real mode) | - |
//! | `domain_boot` | ms to create an hv domain, run to its first hypercall and shut down | `kvm_create_floor` |
//! | `mmu_trapped_write` | ns per PTE rewritten by direct stores into a pinned L1 (an exit each) | - |
//! | `mmu_batch_512` | ns per PTE rewritten by one prepared 512-entry `mmu_update`, resubmitted | `mmu_trapped_write` |
//! | `irq_floor` | us per ping-pong round trip between two bare KVM guests over irqfd/MSI ([`irq_floor`]) | - |
//! | `evtchn_pingpong` | us per round trip between two hv domains over an event channel, upcalls ([`evtchn`]) | `irq_floor` |
//! | `evtchn_pingpong_poll` | the same, each side waiting in `SCHEDOP_POLL` ([`evtchn`]) | `irq_floor` |
//! | `memcpy_4k` | GB/s copying 4 KiB between two memfd mappings on the host ([`memcpy`]) | - |
//! | `grant_copy_4k` | GB/s of batched 4 KiB `GNTTABOP_COPY` operations, host side ([`grant`]) | `memcpy_4k` |
//! | `grant_map_unmap` | us per grant map + unmap pair, host side ([`grant`]) | - |
//! | `density` | rows `density_*`: N idle demo domains ([`crate::density`]) | - |
//! | `blk_host_seq_write` | MB/s of the host writing 1 MiB to an image file in 44 KiB `pwrite`s ([`blk`]) | - |
//! | `blk_passthrough_seq_write` | MB/s of a guest's ring-3 loop writing 1 MiB into a passthrough region ([`blk`]) | `blk_host_seq_write` |
//! | `blk_pv_seq_write` | the same 1 MiB written through the PV block device from ring 3 ([`blk`]) | `blk_passthrough_seq_write` |
//! | `blk_emulated_seq_write` | the same 1 MiB written through the emulated block device from ring 3 ([`blk`]) | `blk_pv_seq_write` |
//! | `blk_host_4k_iops` | 4 KiB `pwrite`s per second on the host ([`blk`]) | - |
//! | `blk_pv_4k_iops` | 4 KiB PV block writes per second, one in flight, from ring 3 ([`blk`]) | `blk_host_4k_iops` |

pub mod blk;
pub mod evtchn;
pub mod grant;
pub mod irq_floor;
pub mod memcpy;

use std::time::{Duration, Instant};

use hv_abi::{layout, Op, PAGE_SIZE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;
use thiserror::Error;

use crate::boot;
use crate::console::ConsoleSink;
use crate::domain::{Domain, DomainConfig, DomainError};
use crate::loader::KernelImage;
use crate::memory::DomainMemory;
use crate::outcome::Outcome;

/// RAM of the guests the benchmarks boot.
pub const BENCH_MEM: u64 = 64 << 20;

/// Names of all benchmarks, in run order (`density` stands for its `density_*` rows).
pub const ALL: [&str; 19] = [
    "exit_floor",
    "null_hypercall",
    "kvm_create_floor",
    "domain_boot",
    "mmu_trapped_write",
    "mmu_batch_512",
    "irq_floor",
    "evtchn_pingpong",
    "evtchn_pingpong_poll",
    "memcpy_4k",
    "grant_copy_4k",
    "grant_map_unmap",
    "blk_host_seq_write",
    "blk_passthrough_seq_write",
    "blk_pv_seq_write",
    "blk_emulated_seq_write",
    "blk_host_4k_iops",
    "blk_pv_4k_iops",
    "density",
];

/// Domains the density benchmark boots unless told otherwise (the goal: 1000
/// on a 2-core, 24 GiB machine).
pub const DENSITY_DOMAINS: usize = 1000;
/// Guest RAM of each density domain: the demo kernel's idle role touches well under
/// 1 MiB; 4 MiB leaves it room and keeps the untouched reservation small.
pub const DENSITY_MEM: u64 = 4 << 20;
/// How long the idle domains' CPU use is measured.
const DENSITY_IDLE_WINDOW: Duration = Duration::from_secs(1);

/// Options of `hv bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Domains the density benchmark boots.
    pub density_domains: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            density_domains: DENSITY_DOMAINS,
        }
    }
}

/// A benchmark failed or was unknown.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Unknown benchmark name.
    #[error("unknown benchmark {0:?}; known: {list}", list = ALL.join(", "))]
    Unknown(String),
    /// A domain could not be created or run.
    #[error("{0}")]
    Domain(#[from] DomainError),
    /// A bare KVM call failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The guest did not do what the benchmark expects.
    #[error("benchmark guest misbehaved: {0}")]
    Guest(String),
    /// The density benchmark failed.
    #[error("density: {0}")]
    Density(#[from] crate::density::DensityError),
    /// Bad options.
    #[error("{0}")]
    Usage(String),
}

impl BenchError {
    /// True for errors in the user's request.
    pub fn is_user_error(&self) -> bool {
        matches!(self, BenchError::Unknown(_) | BenchError::Usage(_))
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BenchError {
    move |source| BenchError::Kvm { what, source }
}

/// One result row.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Benchmark name.
    pub name: String,
    /// Measured value (median of the repetitions).
    pub value: f64,
    /// Unit of `value`.
    pub unit: String,
    /// The floor this is compared with, if any.
    pub vs: Option<String>,
    /// value / floor value.
    pub ratio: Option<f64>,
}

/// Runs the named benchmarks (all if `names` is empty) with the default options; floors
/// needed for a ratio are run too.
pub fn run(names: &[String]) -> Result<Vec<BenchResult>, BenchError> {
    run_with(names, &BenchOptions::default())
}

/// [`run`] with options.
pub fn run_with(names: &[String], opts: &BenchOptions) -> Result<Vec<BenchResult>, BenchError> {
    if opts.density_domains == 0 {
        return Err(BenchError::Usage(
            "the density benchmark needs at least one domain".into(),
        ));
    }
    for n in names {
        if !ALL.contains(&n.as_str()) {
            return Err(BenchError::Unknown(n.clone()));
        }
    }
    let want = |n: &str| names.is_empty() || names.iter().any(|x| x == n);
    let kvm = crate::domain::open_kvm()?;
    let mut out: Vec<BenchResult> = Vec::new();
    type Once = fn(&Kvm) -> Result<f64, BenchError>;
    // (floor, its function, benchmark, its function, unit, repetitions)
    let pairs: [(&str, Once, &str, Once, &str, usize); 3] = [
        (
            "exit_floor",
            exit_floor_once,
            "null_hypercall",
            null_hypercall_once,
            "ns",
            REPS,
        ),
        (
            "kvm_create_floor",
            kvm_create_floor_once,
            "domain_boot",
            domain_boot_once,
            "ms",
            BOOT_REPS,
        ),
        (
            "mmu_trapped_write",
            mmu_trapped_write_once,
            "mmu_batch_512",
            mmu_batch_512_once,
            "ns/PTE",
            REPS,
        ),
    ];
    // Each benchmark runs interleaved with its floor, repetition by repetition, so that
    // noise on a shared machine hits both alike; the medians are reported.
    for (floor_name, floor_once, name, once, unit, reps) in pairs {
        if !want(floor_name) && !want(name) {
            continue;
        }
        let (mut floor, mut bench) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            floor.push(floor_once(&kvm)?);
            if want(name) {
                bench.push(once(&kvm)?);
            }
        }
        let floor = median(floor);
        out.push(row(floor_name, floor, unit, None));
        if want(name) {
            out.push(row(name, median(bench), unit, Some((floor_name, floor))));
        }
    }
    // Floors with two benchmarks each, all interleaved repetition by repetition.
    // (floor, its function, its benchmarks, unit, repetitions)
    type Group<'a> = (&'a str, Once, &'a [(&'a str, Once)], &'a str, usize);
    let groups: [Group; 2] = [
        (
            "irq_floor",
            irq_floor::irq_floor_once,
            &[
                ("evtchn_pingpong", evtchn::evtchn_pingpong_once),
                ("evtchn_pingpong_poll", evtchn::evtchn_pingpong_poll_once),
            ],
            "us",
            irq_floor::REPS,
        ),
        (
            "memcpy_4k",
            memcpy::memcpy_4k_once,
            &[("grant_copy_4k", grant::grant_copy_4k_once)],
            "GB/s",
            REPS,
        ),
    ];
    for (floor_name, floor_once, benches, unit, reps) in groups {
        let wanted: Vec<&(&str, Once)> = benches.iter().filter(|b| want(b.0)).collect();
        if !want(floor_name) && wanted.is_empty() {
            continue;
        }
        let mut floor = Vec::new();
        let mut values = vec![Vec::new(); wanted.len()];
        for _ in 0..reps {
            floor.push(floor_once(&kvm)?);
            for (v, (_, once)) in values.iter_mut().zip(&wanted) {
                v.push(once(&kvm)?);
            }
        }
        let floor = median(floor);
        out.push(row(floor_name, floor, unit, None));
        for (v, (name, _)) in values.into_iter().zip(&wanted) {
            out.push(row(name, median(v), unit, Some((floor_name, floor))));
        }
    }
    if want("grant_map_unmap") {
        let v = (0..REPS)
            .map(|_| grant::grant_map_unmap_once(&kvm))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(row("grant_map_unmap", median(v), "us", None));
    }
    out.extend(blk_rows(&want)?);
    if want("density") {
        out.extend(density_rows(kvm, opts.density_domains)?);
    }
    Ok(out)
}

/// The block rows that `want` asks for, each beside its floor: a chain
/// host → passthrough → PV → emulated for sequential writes, and host → PV for 4 KiB
/// IOPS. Repetitions are interleaved; medians are reported.
fn blk_rows(want: &dyn Fn(&str) -> bool) -> Result<Vec<BenchResult>, BenchError> {
    use blk::Model;
    type Once = Box<dyn Fn() -> Result<f64, BenchError>>;
    let seq: [(&str, Once); 4] = [
        ("blk_host_seq_write", Box::new(blk::host_seq_write_once)),
        (
            "blk_passthrough_seq_write",
            Box::new(|| blk::seq_write_once(Model::Passthrough)),
        ),
        (
            "blk_pv_seq_write",
            Box::new(|| blk::seq_write_once(Model::Pv)),
        ),
        (
            "blk_emulated_seq_write",
            Box::new(|| blk::seq_write_once(Model::Emulated)),
        ),
    ];
    let iops: [(&str, Once); 2] = [
        ("blk_host_4k_iops", Box::new(blk::host_4k_iops_once)),
        ("blk_pv_4k_iops", Box::new(blk::pv_4k_iops_once)),
    ];
    let mut out = Vec::new();
    for (chain, unit) in [(&seq[..], "MB/s"), (&iops[..], "IOPS")] {
        // A row is run if wanted or if the next one in the chain (its dependant) is.
        let run: Vec<bool> = (0..chain.len())
            .map(|i| want(chain[i].0) || chain.get(i + 1).is_some_and(|n| want(n.0)))
            .collect();
        if !run.iter().any(|r| *r) {
            continue;
        }
        let mut values = vec![Vec::new(); chain.len()];
        for _ in 0..blk::REPS {
            for (i, (_, once)) in chain.iter().enumerate() {
                if run[i] {
                    values[i].push(once()?);
                }
            }
        }
        // Rows not run have no values (and are not reported).
        let medians: Vec<f64> = values
            .into_iter()
            .map(|v| if v.is_empty() { f64::NAN } else { median(v) })
            .collect();
        for (i, (name, _)) in chain.iter().enumerate() {
            if want(name) {
                let floor = i
                    .checked_sub(1)
                    .filter(|p| run[*p])
                    .map(|p| (chain[p].0, medians[p]));
                out.push(row(name, medians[i], unit, floor));
            }
        }
    }
    Ok(out)
}

/// One density run of `n` idle demo domains, as rows.
fn density_rows(kvm: Kvm, n: usize) -> Result<Vec<BenchResult>, BenchError> {
    if crate::DEMO_KERNEL.is_empty() {
        return Err(BenchError::Usage(
            "density needs the demo kernel: this hv was built without it".into(),
        ));
    }
    let image = KernelImage::from_elf(crate::DEMO_KERNEL).map_err(DomainError::from)?;
    raise_fd_limit();
    let r = crate::density::run(
        kvm,
        &image,
        "role=idle",
        n,
        DENSITY_MEM,
        DENSITY_IDLE_WINDOW,
    )?;
    tracing::info!(?r, "density run");
    Ok(vec![
        row("density_boot_rate", r.boot_rate_per_s, "domains/s", None),
        row(
            "density_overhead",
            r.overhead_kib_per_domain,
            "KiB/domain",
            None,
        ),
        row("density_rss", r.rss_kib_per_domain, "KiB/domain", None),
        row(
            "density_touched",
            r.touched_kib_per_domain,
            "KiB/domain",
            None,
        ),
        row("density_idle_cpu", r.idle_cpu_percent, "% of a core", None),
    ])
}

/// Many domains need many descriptors (VM, vCPU, memory, eventfds): the soft limit is
/// raised to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn row(name: &str, value: f64, unit: &str, floor: Option<(&str, f64)>) -> BenchResult {
    BenchResult {
        name: name.into(),
        value,
        unit: unit.into(),
        vs: floor.map(|(n, _)| n.to_string()),
        ratio: floor.map(|(_, f)| if f > 0.0 { value / f } else { f64::NAN }),
    }
}

/// `{"results": [...]}`.
pub fn to_json(results: &[BenchResult]) -> String {
    serde_json::json!({ "results": results }).to_string()
}

/// A plain-text table.
pub fn to_table(results: &[BenchResult]) -> String {
    let mut s = format!(
        "{:<22} {:>12} {:<12} {:<18} {:>8}\n",
        "benchmark", "value", "unit", "vs", "ratio"
    );
    for r in results {
        s += &format!(
            "{:<22} {:>12.3} {:<12} {:<18} {:>8}\n",
            r.name,
            r.value,
            r.unit,
            r.vs.as_deref().unwrap_or("-"),
            r.ratio.map_or("-".into(), |x| format!("{x:.4}x"))
        );
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Guest code: `n` version hypercalls in a loop, then shutdown(poweroff, 0).
pub fn hypercall_loop_code(n: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xB9]; // mov rcx, imm64
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[0xB8]); // mov eax, imm32
    c.extend_from_slice(&(Op::Version as u32).to_le_bytes());
    c.extend_from_slice(&[0x31, 0xFF]); // xor edi, edi
    c.extend_from_slice(&[
        0xE6,
        const { crate::conv::imm8(hv_abi::hypercall::HYPERCALL_PORT as u64) },
    ]); // out port, al
    c.extend_from_slice(&[0x48, 0xFF, 0xC9]); // dec rcx
    c.extend_from_slice(&[0x75, 0xF2]); // jnz loop (-14)
    c.extend_from_slice(&shutdown_code());
    c
}

/// Guest code: one version hypercall, then shutdown(poweroff, 0).
pub fn boot_probe_code() -> Vec<u8> {
    let mut c = vec![0xB8];
    c.extend_from_slice(&(Op::Version as u32).to_le_bytes());
    c.extend_from_slice(&[
        0x31,
        0xFF,
        0xE6,
        const { crate::conv::imm8(hv_abi::hypercall::HYPERCALL_PORT as u64) },
    ]);
    c.extend_from_slice(&shutdown_code());
    c
}

pub(crate) fn shutdown_code() -> Vec<u8> {
    let mut c = vec![0xB8];
    c.extend_from_slice(&(Op::SchedOp as u32).to_le_bytes());
    c.push(0xBF); // mov edi, SCHEDOP_SHUTDOWN
    c.extend_from_slice(
        &const { crate::conv::imm32(hv_abi::sched::SCHEDOP_SHUTDOWN) }.to_le_bytes(),
    );
    c.extend_from_slice(&[0x31, 0xF6, 0x31, 0xD2]); // xor esi, esi; xor edx, edx
    c.extend_from_slice(&[
        0xE6,
        const { crate::conv::imm8(hv_abi::hypercall::HYPERCALL_PORT as u64) },
    ]);
    c.push(0xF4); // hlt (not reached)
    c
}

fn bench_config() -> DomainConfig {
    DomainConfig {
        name: "bench".into(),
        mem_bytes: BENCH_MEM,
        console: ConsoleSink::Discard,
        ..DomainConfig::default()
    }
}

fn run_hv(kvm: &Kvm, code: &[u8]) -> Result<Duration, BenchError> {
    let t0 = Instant::now();
    let image = KernelImage::from_code(layout::KERNEL_MIN_GPA, code);
    let report = Domain::create(kvm, bench_config(), &image)?.run()?;
    let t = t0.elapsed();
    match report.outcome {
        Outcome::Poweroff { code: 0 } => Ok(t),
        other => Err(BenchError::Guest(other.to_string())),
    }
}

const LOOP_SHORT: u64 = 2_000;
const LOOP_LONG: u64 = 22_000;
const REPS: usize = 5;

/// ns per iteration of the hypercall loop through hv's full path: the difference of a
/// long and a short run, so domain creation cancels out.
pub fn null_hypercall_once(kvm: &Kvm) -> Result<f64, BenchError> {
    let a = run_hv(kvm, &hypercall_loop_code(LOOP_SHORT))?;
    let b = run_hv(kvm, &hypercall_loop_code(LOOP_LONG))?;
    Ok((b.as_secs_f64() - a.as_secs_f64()) * 1e9 / (LOOP_LONG - LOOP_SHORT) as f64)
}

/// Registers `mem`'s RAM (slot 0) and page-table pool (slot 1), both writable, with a
/// bare bench VM. The caller keeps `mem` alive until after the VM is dropped.
pub(crate) fn register_ram_and_pool(
    vm: &kvm_ioctls::VmFd,
    mem: &DomainMemory,
) -> Result<(), BenchError> {
    for (slot, gpa, size) in [
        (0, 0, mem.ram_bytes()),
        (1, mem.pool_gpa(), mem.pool_end() - mem.pool_gpa()),
    ] {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: mem.host_address(gpa).map_err(DomainError::from)?,
        };
        // SAFETY: the region is mapped by `mem`, which the caller keeps alive with the VM.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(())
}

/// A bare KVM VM in hv's 64-bit boot state with `code` at the kernel address, and no
/// hv run loop. Returns the VM, the vCPU and the memory that backs it.
fn bare_long_mode_vm(
    kvm: &Kvm,
    code: &[u8],
) -> Result<(kvm_ioctls::VmFd, kvm_ioctls::VcpuFd, DomainMemory), BenchError> {
    let (pool, _) = boot::pool_frames_for(BENCH_MEM, 0);
    let mem = DomainMemory::new("floor", BENCH_MEM, pool).map_err(DomainError::from)?;
    mem.write_ram(layout::KERNEL_MIN_GPA, code)
        .map_err(DomainError::from)?;
    let bi = boot::build_page_tables(&mem).map_err(DomainError::from)?;
    boot::write_gdt_tss(&mem).map_err(DomainError::from)?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    register_ram_and_pool(&vm, &mem)?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let cpuid = crate::cpuid::supported_cached(kvm).map_err(DomainError::from)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    vcpu.set_sregs(&boot::boot_sregs(sregs, bi.pt_base))
        .map_err(kvm_err("set sregs"))?;
    vcpu.set_regs(&boot::boot_regs(
        layout::KERNEL_MIN_GPA,
        layout::BOOT_STACK_TOP - 8,
        0,
    ))
    .map_err(kvm_err("set regs"))?;
    Ok((vm, vcpu, mem))
}

/// ns per iteration of the same guest loop on bare KVM: the host only re-enters.
pub fn exit_floor_once(kvm: &Kvm) -> Result<f64, BenchError> {
    let n = LOOP_LONG;
    {
        let (_vm, mut vcpu, _mem) = bare_long_mode_vm(kvm, &hypercall_loop_code(n))?;
        let mut exits = 0u64;
        let mut t0 = Instant::now();
        // n loop exits + 1 shutdown exit; time from the first exit to the n+1-th.
        while exits <= n {
            match vcpu.run().map_err(kvm_err("run"))? {
                VcpuExit::IoOut(..) => {
                    exits += 1;
                    if exits == 1 {
                        t0 = Instant::now();
                    }
                }
                other => return Err(BenchError::Guest(format!("unexpected exit {other:?}"))),
            }
        }
        Ok(t0.elapsed().as_secs_f64() * 1e9 / n as f64)
    }
}

const BOOT_REPS: usize = 21;

/// ms to create a bare VM + vCPU with the same RAM and run to the first exit.
pub fn kvm_create_floor_once(kvm: &Kvm) -> Result<f64, BenchError> {
    {
        let t0 = Instant::now();
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        let size = crate::conv::usize_from(BENCH_MEM);
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(BenchError::Guest("mmap failed".into()));
        }
        let result = (|| {
            // out 0xE8, al; hlt
            let code = [0xE6u8, 0xE8, 0xF4];
            // SAFETY: `host` maps `size` bytes and the code fits in the first page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    code.as_ptr(),
                    (host as *mut u8).add(crate::conv::usize_from(PAGE_SIZE)),
                    code.len(),
                )
            };
            let r = kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: BENCH_MEM,
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping outlives the VM (unmapped after the VM is dropped).
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
            let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
            let mut s = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
            s.cs.base = 0;
            s.cs.selector = 0;
            vcpu.set_sregs(&s).map_err(kvm_err("set sregs"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: PAGE_SIZE,
                rflags: 2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
            match vcpu.run().map_err(kvm_err("run"))? {
                VcpuExit::IoOut(..) => Ok(()),
                other => Err(BenchError::Guest(format!("unexpected exit {other:?}"))),
            }
        })();
        drop(vm);
        let t = t0.elapsed();
        // SAFETY: `host` was mapped above with this size and the VM using it is gone.
        unsafe { libc::munmap(host, size) };
        result?;
        Ok(t.as_secs_f64() * 1e3)
    }
}

/// ms to create an hv domain, run it to its first hypercall and shut it down.
pub fn domain_boot_once(kvm: &Kvm) -> Result<f64, BenchError> {
    Ok(run_hv(kvm, &boot_probe_code())?.as_secs_f64() * 1e3)
}

/// Where the MMU benchmarks put their data in guest RAM: the L1 table's address at
/// `MMU_HDR`, the 512 prepared requests at `MMU_REQS`.
const MMU_HDR: u64 = 0x30_0000;
const MMU_REQS: u64 = 0x30_1000;
/// The virtual range whose L1 table the benchmarks rewrite (identity-mapped RAM).
const MMU_VA: u64 = 0x40_0000;

/// Guest code: `n` calls of `mmu_update(MMU_REQS, 512, 0)`, then shutdown.
fn batch_code(n: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xB9];
    c.extend_from_slice(&n.to_le_bytes());
    c.push(0xB8); // mov eax, mmu_update
    c.extend_from_slice(&(Op::MmuUpdate as u32).to_le_bytes());
    c.push(0xBF); // mov edi, MMU_REQS
    c.extend_from_slice(&const { crate::conv::imm32(MMU_REQS) }.to_le_bytes());
    c.push(0xBE); // mov esi, 512
    c.extend_from_slice(&512u32.to_le_bytes());
    c.extend_from_slice(&[0x31, 0xD2]); // xor edx, edx
    c.extend_from_slice(&[
        0xE6,
        const { crate::conv::imm8(hv_abi::hypercall::HYPERCALL_PORT as u64) },
    ]);
    c.extend_from_slice(&[0x48, 0xFF, 0xC9]); // dec rcx
    c.extend_from_slice(&[0x75, 0xE8]); // jnz loop (-24)
    c.extend_from_slice(&shutdown_code());
    c
}

/// Guest code: clear CR0.WP, then `n` direct stores of each L1 entry's own value into
/// the L1 table (each one traps), then shutdown.
fn trapped_code(n: u64) -> Vec<u8> {
    let mut c = vec![
        0x0F, 0x20, 0xC0, // mov rax, cr0
        0x25, 0xFF, 0xFF, 0xFE, 0xFF, // and eax, ~CR0.WP
        0x0F, 0x22, 0xC0, // mov cr0, rax
        0x48, 0xB9, // mov rcx, n
    ];
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x8B, 0x34, 0x25]); // mov rsi, [MMU_HDR]
    c.extend_from_slice(&const { crate::conv::imm32(MMU_HDR) }.to_le_bytes());
    c.extend_from_slice(&[0x31, 0xDB]); // xor ebx, ebx
    c.extend_from_slice(&[
        0x48, 0x8B, 0x14, 0x1E, // loop: mov rdx, [rsi + rbx]
        0x48, 0x89, 0x14, 0x1E, // mov [rsi + rbx], rdx   (traps)
        0x83, 0xC3, 0x08, // add ebx, 8
        0x81, 0xE3, 0xFF, 0x0F, 0x00, 0x00, // and ebx, 0xfff
        0x48, 0xFF, 0xC9, // dec rcx
        0x75, 0xEA, // jnz loop (-22)
    ]);
    c.extend_from_slice(&shutdown_code());
    c
}

/// Runs `code` in a domain whose RAM holds the address of the L1 table mapping
/// `MMU_VA` and 512 requests rewriting that table's entries with their own values.
fn run_mmu(kvm: &Kvm, code: &[u8]) -> Result<Duration, BenchError> {
    let t0 = Instant::now();
    let image = KernelImage::from_code(layout::KERNEL_MIN_GPA, code);
    let dom = Domain::create(kvm, bench_config(), &image)?;
    let mem = &dom.shared().mem;
    let rd = |gpa: u64| -> Result<u64, BenchError> {
        let mut b = [0u8; 8];
        mem.guest_memory_read(gpa, &mut b)
            .map_err(BenchError::Guest)?;
        Ok(u64::from_le_bytes(b))
    };
    let mut table = dom.shared().vcpu_cr3[0].load(std::sync::atomic::Ordering::Acquire);
    for shift in [39u32, 30, 21] {
        table = rd(table + ((MMU_VA >> shift) & 511) * 8)? & hv_abi::mmu::PTE_ADDR_MASK;
    }
    let mut reqs = Vec::with_capacity(512 * 16);
    for i in 0..512 {
        let ptr = table + i * 8;
        reqs.extend_from_slice(&ptr.to_le_bytes());
        reqs.extend_from_slice(&rd(ptr)?.to_le_bytes());
    }
    let w = |gpa, b: &[u8]| mem.write_ram(gpa, b).map_err(DomainError::from);
    w(MMU_HDR, &table.to_le_bytes())?;
    w(MMU_REQS, &reqs)?;
    let report = dom.run()?;
    let t = t0.elapsed();
    match report.outcome {
        Outcome::Poweroff { code: 0 } => Ok(t),
        other => Err(BenchError::Guest(other.to_string())),
    }
}

const TRAPPED_SHORT: u64 = 200;
const TRAPPED_LONG: u64 = 2_200;
const BATCH_SHORT: u64 = 20;
const BATCH_LONG: u64 = 220;

/// ns per PTE written by direct stores into a pinned L1 (one trapped exit each).
pub fn mmu_trapped_write_once(kvm: &Kvm) -> Result<f64, BenchError> {
    let a = run_mmu(kvm, &trapped_code(TRAPPED_SHORT))?;
    let b = run_mmu(kvm, &trapped_code(TRAPPED_LONG))?;
    Ok((b.as_secs_f64() - a.as_secs_f64()) * 1e9 / (TRAPPED_LONG - TRAPPED_SHORT) as f64)
}

/// ns per PTE written by resubmitting one prepared 512-entry `mmu_update`.
pub fn mmu_batch_512_once(kvm: &Kvm) -> Result<f64, BenchError> {
    let a = run_mmu(kvm, &batch_code(BATCH_SHORT))?;
    let b = run_mmu(kvm, &batch_code(BATCH_LONG))?;
    Ok((b.as_secs_f64() - a.as_secs_f64()) * 1e9 / ((BATCH_LONG - BATCH_SHORT) * 512) as f64)
}
