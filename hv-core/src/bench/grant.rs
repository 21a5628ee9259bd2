//! `grant_copy_4k` and `grant_map_unmap`: hv's grant-table operations, called on the
//! host side directly.
//!
//! Two domains of one [`Hypervisor`] are created (in the registry, not running): G
//! grants one RAM page to U (entry 0 of G's table: `GTF_PERMIT_ACCESS`, U's id, the
//! page's frame). The benchmark then calls [`crate::grant::Grants::grant_table_op`] as
//! U's vCPU 0 would reach it from the hypercall dispatcher: the operation array is in U's RAM,
//! copied in and its statuses written back; CR3 is U's boot page-table root. What is
//! **not** included: the exit and the dispatcher (one `exit_floor` + the small
//! `null_hypercall` margin per call, amortised over the batch for a copy).
//!
//! * `grant_copy_4k`: one `GNTTABOP_COPY` call of [`BATCH`] 4 KiB operations, each from
//!   G's granted page (by reference) to one page of U (by frame), resubmitted
//!   [`COPY_CALLS`] times; GB/s of bytes copied. The same two pages every time, as the
//!   floor `memcpy_4k` copies one hot page between two memfd mappings: the ratio is what
//!   the grant path (pin and release the entry with atomics, per-operation checks,
//!   `vm-memory` volatile copy, status write-back) leaves of the raw copy.
//! * `grant_map_unmap`: `GNTTABOP_MAP_GRANT_REF` of G's page at the first page of U's
//!   grant window (whose L1 table the boot tables provide) followed by
//!   `GNTTABOP_UNMAP_GRANT_REF` of the handle, one operation per call, [`MAP_PAIRS`]
//!   times; us per pair. This includes hv's window remapping (an `mmap` of the granter's
//!   memfd page into the window slot, and an anonymous page back on unmap) and the
//!   validated L1 write and clear.

use std::time::Instant;

use hv_abi::grant::{
    GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabUnmapGrantRef, DOMID_SELF,
    GNTCOPY_SOURCE_GREF, GNTMAP_HOST_MAP, GNTTABOP_COPY, GNTTABOP_MAP_GRANT_REF,
    GNTTABOP_UNMAP_GRANT_REF, GTF_PERMIT_ACCESS,
};
use hv_abi::layout::{GRANT_TABLE_GPA, KERNEL_MIN_GPA};
use hv_abi::PAGE_SIZE;
use kvm_ioctls::Kvm;
use zerocopy::IntoBytes;

use super::BenchError;
use crate::console::ConsoleSink;
use crate::domain::{DomainConfig, DomainError, DomainShared};
use crate::hypervisor::Hypervisor;
use crate::loader::KernelImage;

/// Copy operations per `GNTTABOP_COPY` call.
pub const BATCH: usize = 64;
/// Calls timed per `grant_copy_4k` repetition (x [`BATCH`] x 4 KiB = 512 MiB).
pub const COPY_CALLS: u64 = 2_000;
/// Map+unmap pairs timed per `grant_map_unmap` repetition.
pub const MAP_PAIRS: u64 = 2_000;

/// RAM of each domain.
const RAM: u64 = 4 << 20;
/// G's granted page.
const SRC_GPA: u64 = 0x30_0000;
/// U's destination page.
const DST_GPA: u64 = 0x30_0000;
/// U's operation array.
const OPS_GPA: u64 = 0x20_0000;

struct Pair {
    /// Kept alive: the domains stay in the registry while it exists.
    hv: Hypervisor,
    g: u32,
    u: u32,
}

impl Pair {
    fn dom(&self, id: u32) -> Result<&std::sync::Arc<DomainShared>, BenchError> {
        Ok(self
            .hv
            .domain(id)
            .ok_or(DomainError::BadDomainId(id))?
            .shared())
    }
}

fn config(name: &str, domid: u32) -> DomainConfig {
    DomainConfig {
        name: name.into(),
        domid,
        mem_bytes: RAM,
        console: ConsoleSink::Discard,
        ..DomainConfig::default()
    }
}

/// Two created domains; G's grant reference 0 lets U use G's page at `SRC_GPA`, which
/// holds a pattern.
fn pair() -> Result<Pair, BenchError> {
    let mut hv = Hypervisor::new(crate::domain::open_kvm()?);
    let image = KernelImage::from_code(KERNEL_MIN_GPA, &super::boot_probe_code());
    let g = hv.create_domain(config("grant-g", hv.free_domid()), &image)?;
    let u = hv.create_domain(config("grant-u", hv.free_domid()), &image)?;
    let p = Pair { hv, g, u };
    let gd = p.dom(g)?;
    let entry = u64::from(GTF_PERMIT_ACCESS) | u64::from(u) << 16 | (SRC_GPA / PAGE_SIZE) << 32;
    gd.mem
        .write_ram(GRANT_TABLE_GPA, &entry.to_le_bytes())
        .map_err(DomainError::from)?;
    let pattern: Vec<u8> = (0..PAGE_SIZE)
        .map(|i| (i * 13 + 5).to_le_bytes()[0])
        .collect();
    gd.mem
        .write_ram(SRC_GPA, &pattern)
        .map_err(DomainError::from)?;
    Ok(p)
}

/// `grant_table_op(cmd, OPS_GPA, count)` as U's vCPU 0.
fn op(u: &DomainShared, cmd: u64, count: u64) -> Result<(), BenchError> {
    let cr3 = u.vcpu_cr3[0].load(std::sync::atomic::Ordering::Acquire);
    u.grants
        .grant_table_op(&u.mmu, &*u.registry, cr3, cmd, OPS_GPA, count)
        .map(|_| ())
        .map_err(|e| BenchError::Guest(format!("grant_table_op({cmd}): {e:?}")))
}

fn read_ops<T: zerocopy::FromBytes + IntoBytes + Clone>(
    u: &DomainShared,
    n: usize,
) -> Result<Vec<T>, BenchError> {
    let mut v = vec![T::new_zeroed(); n];
    u.mem
        .read_ram(OPS_GPA, v.as_mut_slice().as_mut_bytes())
        .map_err(DomainError::from)?;
    Ok(v)
}

/// GB/s (1e9 bytes per second) of 4 KiB grant copies, [`BATCH`] per call.
pub fn grant_copy_4k_once(_kvm: &Kvm) -> Result<f64, BenchError> {
    let p = pair()?;
    let (gd, ud) = (p.dom(p.g)?, p.dom(p.u)?);
    let one = GnttabCopy {
        source: GnttabCopyPtr {
            ref_or_gfn: 0,
            domid: u16::try_from(gd.domid)
                .map_err(|_| crate::bench::BenchError::Guest("domid above 65535".into()))?,
            ..Default::default()
        },
        dest: GnttabCopyPtr {
            ref_or_gfn: DST_GPA / PAGE_SIZE,
            domid: DOMID_SELF,
            ..Default::default()
        },
        len: const { crate::conv::imm16(PAGE_SIZE) },
        flags: GNTCOPY_SOURCE_GREF,
        ..Default::default()
    };
    let ops = vec![one; BATCH];
    ud.mem
        .write_ram(OPS_GPA, ops.as_bytes())
        .map_err(DomainError::from)?;
    // Warm up (pages faulted in, caches), then check every status and the bytes.
    for _ in 0..20 {
        op(ud, GNTTABOP_COPY, BATCH as u64)?;
    }
    let done: Vec<GnttabCopy> = read_ops(ud, BATCH)?;
    if let Some(bad) = done.iter().find(|o| o.status != 0) {
        return Err(BenchError::Guest(format!(
            "grant copy failed: status {}",
            bad.status
        )));
    }
    let (mut a, mut b) = (
        vec![0u8; crate::conv::usize_from(PAGE_SIZE)],
        vec![0u8; crate::conv::usize_from(PAGE_SIZE)],
    );
    gd.mem
        .read_ram(SRC_GPA, &mut a)
        .map_err(DomainError::from)?;
    ud.mem
        .read_ram(DST_GPA, &mut b)
        .map_err(DomainError::from)?;
    if a != b {
        return Err(BenchError::Guest("grant copy: the page differs".into()));
    }
    let t0 = Instant::now();
    for _ in 0..COPY_CALLS {
        op(ud, GNTTABOP_COPY, BATCH as u64)?;
    }
    let t = t0.elapsed();
    let bytes = COPY_CALLS * BATCH as u64 * PAGE_SIZE;
    Ok(bytes as f64 / t.as_secs_f64() / 1e9)
}

/// us per `GNTTABOP_MAP_GRANT_REF` + `GNTTABOP_UNMAP_GRANT_REF` pair (one call each).
pub fn grant_map_unmap_once(_kvm: &Kvm) -> Result<f64, BenchError> {
    let p = pair()?;
    let (gd, ud) = (p.dom(p.g)?, p.dom(p.u)?);
    let va = ud.grants.window_gpa();
    let map = GnttabMapGrantRef {
        host_addr: va,
        flags: GNTMAP_HOST_MAP,
        ref_: 0,
        dom: u16::try_from(gd.domid)
            .map_err(|_| crate::bench::BenchError::Guest("domid above 65535".into()))?,
        ..Default::default()
    };
    let pair_once = || -> Result<(), BenchError> {
        ud.mem
            .write_ram(OPS_GPA, map.as_bytes())
            .map_err(DomainError::from)?;
        op(ud, GNTTABOP_MAP_GRANT_REF, 1)?;
        let m: Vec<GnttabMapGrantRef> = read_ops(ud, 1)?;
        if m[0].status != 0 {
            return Err(BenchError::Guest(format!(
                "grant map failed: status {}",
                m[0].status
            )));
        }
        let unmap = GnttabUnmapGrantRef {
            host_addr: va,
            handle: m[0].handle,
            ..Default::default()
        };
        ud.mem
            .write_ram(OPS_GPA, unmap.as_bytes())
            .map_err(DomainError::from)?;
        op(ud, GNTTABOP_UNMAP_GRANT_REF, 1)?;
        let u: Vec<GnttabUnmapGrantRef> = read_ops(ud, 1)?;
        if u[0].status != 0 {
            return Err(BenchError::Guest(format!(
                "grant unmap failed: status {}",
                u[0].status
            )));
        }
        Ok(())
    };
    for _ in 0..50 {
        pair_once()?;
    }
    let t0 = Instant::now();
    for _ in 0..MAP_PAIRS {
        pair_once()?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6 / MAP_PAIRS as f64)
}
