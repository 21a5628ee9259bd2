//! The PV MMU hypercalls: `mmu_update`, `mmuext_op`, `update_va_mapping` (SPEC 8.5).
//! `multicall` lives in [`crate::hypercall`], since it dispatches any operation.

use hv_abi::mmu::{
    MmuUpdate, MmuextOp, MMUEXT_INVLPG_LOCAL, MMUEXT_NEW_BASEPTR, MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L4_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE, PTE_ADDR_MASK, PTE_P, PTE_PS,
    UVMF_INVLPG,
};
use hv_abi::{layout, Errno};
use std::sync::atomic::Ordering;
use zerocopy::{FromBytes, IntoBytes};

use super::PtMemory;
use crate::domain::DomainShared;
use crate::mmu::PoolAccess;

/// Most requests or operations in one call.
pub const MAX_BATCH: u64 = 2048;

/// What an MMU hypercall asks of the calling vCPU once it returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VcpuEffects {
    /// Load this page-table root into CR3.
    pub new_cr3: Option<u64>,
    /// Some translation of this vCPU may be stale.
    pub flush: bool,
}

/// Copies `count` fixed-size records from guest RAM (each request is copied before use,
/// so the guest cannot change it while it is processed).
fn read_array<T: FromBytes + IntoBytes + Clone>(
    dom: &DomainShared,
    gpa: u64,
    count: u64,
) -> Result<Vec<T>, Errno> {
    crate::guest_arg::copy_in_array(&dom.mem, gpa, count, MAX_BATCH)
}

fn check_done(dom: &DomainShared, done: u64) -> Result<(), Errno> {
    if done != 0 {
        crate::guest_arg::check(&dom.mem, done, 4)?;
    }
    Ok(())
}

fn write_done(dom: &DomainShared, done: u64, n: u32) {
    if done != 0 {
        // Checked before processing started; guest RAM does not shrink.
        let _ = crate::guest_arg::copy_out(&dom.mem, done, &n);
    }
}

/// `mmu_update(reqs, count, done)`.
pub fn mmu_update(dom: &DomainShared, reqs: u64, count: u64, done: u64) -> Result<u64, Errno> {
    let reqs: Vec<MmuUpdate> = read_array(dom, reqs, count)?;
    check_done(dom, done)?;
    let (n, res) = {
        let mut mmu = dom.mmu.lock().map_err(|_| Errno::EIO)?;
        mmu.update_batch(&mut PoolAccess(&dom.mem), &reqs)
    };
    write_done(dom, done, n);
    res.map(|()| 0)
}

/// `mmuext_op(ops, count, done)`.
pub fn mmuext_op(
    dom: &DomainShared,
    vcpu: u32,
    ops: u64,
    count: u64,
    done: u64,
    effects: &mut VcpuEffects,
) -> Result<u64, Errno> {
    let ops: Vec<MmuextOp> = read_array(dom, ops, count)?;
    check_done(dom, done)?;
    let mut n = 0;
    let mut res = Ok(0);
    for op in &ops {
        if let Err(e) = mmuext_one(dom, vcpu, op, effects) {
            res = Err(e);
            break;
        }
        n += 1;
    }
    write_done(dom, done, n);
    res
}

/// True if some vCPU holds `gpa` as its root (SPEC 8.4): its CR3 if it is up, its
/// context's `cr3` if it is initialised. A vCPU still down holds none (its slot is 0).
fn in_use_as_cr3(dom: &DomainShared, gpa: u64) -> bool {
    dom.vcpu_cr3
        .iter()
        .any(|c| c.load(Ordering::Acquire) == gpa)
}

fn mmuext_one(
    dom: &DomainShared,
    vcpu: u32,
    op: &MmuextOp,
    effects: &mut VcpuEffects,
) -> Result<(), Errno> {
    if op.reserved != 0 || op.arg2 != 0 {
        return Err(Errno::EINVAL);
    }
    let mut mmu = dom.mmu.lock().map_err(|_| Errno::EIO)?;
    let mut pool = PoolAccess(&dom.mem);
    match op.cmd {
        MMUEXT_PIN_L1_TABLE..=MMUEXT_PIN_L4_TABLE => {
            let level =
                u8::try_from(op.cmd - MMUEXT_PIN_L1_TABLE + 1).map_err(|_| Errno::EINVAL)?;
            mmu.pin(&mut pool, level, op.arg1)
        }
        MMUEXT_UNPIN_TABLE => {
            let busy = in_use_as_cr3(dom, op.arg1);
            mmu.unpin(&mut pool, op.arg1, busy)?;
            dom.unpin_gen.fetch_add(1, Ordering::AcqRel);
            Ok(())
        }
        MMUEXT_NEW_BASEPTR => {
            if !mmu.is_pinned_l4(op.arg1) {
                return Err(Errno::EINVAL);
            }
            if let Some(c) = dom.vcpu_cr3.get(vcpu as usize) {
                c.store(op.arg1, Ordering::Release);
            }
            effects.new_cr3 = Some(op.arg1);
            effects.flush = true;
            Ok(())
        }
        MMUEXT_TLB_FLUSH_LOCAL | MMUEXT_INVLPG_LOCAL => {
            effects.flush = true;
            Ok(())
        }
        _ => Err(Errno::EINVAL),
    }
}

/// Guest-physical address of the L1 entry that maps `va` under root `cr3`. EINVAL if
/// there is none: an entry on the walk is not present, or `va` lies in a 2 MiB page.
pub(crate) fn l1_entry_for(pool: &PoolAccess<'_>, cr3: u64, va: u64) -> Result<u64, Errno> {
    let mut table = cr3 & PTE_ADDR_MASK;
    for shift in [39u32, 30, 21] {
        let e = pool.read_pte(table + ((va >> shift) & 511) * 8);
        if e & PTE_P == 0 || e & PTE_PS != 0 {
            return Err(Errno::EINVAL);
        }
        table = e & PTE_ADDR_MASK;
    }
    Ok(table + ((va >> 12) & 511) * 8)
}

/// `update_va_mapping(va, val, flags)` on the calling vCPU, whose CR3 is `cr3`.
pub fn update_va_mapping(
    dom: &DomainShared,
    cr3: u64,
    va: u64,
    val: u64,
    flags: u64,
    effects: &mut VcpuEffects,
) -> Result<u64, Errno> {
    if flags > UVMF_INVLPG {
        return Err(Errno::EINVAL);
    }
    let canonical = (va as i64) << 16 >> 16 == va as i64;
    if !canonical || (layout::HV_RESERVED_VA_START..layout::HV_RESERVED_VA_END).contains(&va) {
        return Err(Errno::EINVAL);
    }
    let mut mmu = dom.mmu.lock().map_err(|_| Errno::EIO)?;
    if !mmu.is_pinned_l4(cr3 & PTE_ADDR_MASK) {
        return Err(Errno::EINVAL);
    }
    let mut pool = PoolAccess(&dom.mem);
    let entry = l1_entry_for(&pool, cr3, va)?;
    // The walk went through validated tables, so `entry` lies in an L1 table.
    let (level, _) = mmu.write_entry(&mut pool, entry, val)?;
    debug_assert_eq!(level, 1);
    if flags != 0 {
        effects.flush = true;
    }
    Ok(0)
}
