//! PV MMU wrappers: batched page-table updates, pinning, base pointer, flushes
//! (SPEC.md 8.5). Page tables live in the page-table pool, which the guest can read but
//! not write: every change goes through these calls and is validated by the hypervisor.
//!
//! Changing mappings can break the memory safety of running code (unmapping its stack,
//! remapping a page a reference points to), so the calls that change page tables are
//! `unsafe`: the caller vouches that no live Rust reference depends on what changes.

use hv_abi::mmu::{
    MmuUpdate, MmuextOp, MulticallEntry, MMUEXT_INVLPG_LOCAL, MMUEXT_NEW_BASEPTR,
    MMUEXT_PIN_L1_TABLE, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_UNPIN_TABLE,
};
use hv_abi::Op;

use crate::error::{check, Error};
use crate::hypercall::{hypercall2, hypercall3};
use crate::virt_to_phys;

/// `mmu_update(reqs)`: applies the requests in order and stops at the first failure.
/// Returns how many were applied, and the failing request's error.
///
/// # Safety
/// The new mappings must not invalidate memory that live references point to.
pub unsafe fn mmu_update(reqs: &[MmuUpdate]) -> (u32, Result<(), Error>) {
    let mut done: u32 = 0;
    // SAFETY: the hypervisor reads `reqs` and writes `done`, both borrowed for the call
    // and identity-mapped; the caller vouches for the mappings changed.
    let ret = unsafe {
        hypercall3(
            Op::MmuUpdate,
            virt_to_phys(reqs.as_ptr()),
            reqs.len() as u64,
            virt_to_phys(&mut done as *mut u32),
        )
    };
    (done, check(ret).map(|_| ()))
}

/// `mmuext_op(ops)`: runs the operations in order and stops at the first failure.
/// Returns how many completed, and the failing operation's error.
///
/// # Safety
/// As for [`mmu_update`]: unpinning or switching page tables must not pull memory from
/// under live references.
pub unsafe fn mmuext(ops: &[MmuextOp]) -> (u32, Result<(), Error>) {
    let mut done: u32 = 0;
    // SAFETY: as in `mmu_update`.
    let ret = unsafe {
        hypercall3(
            Op::MmuextOp,
            virt_to_phys(ops.as_ptr()),
            ops.len() as u64,
            virt_to_phys(&mut done as *mut u32),
        )
    };
    (done, check(ret).map(|_| ()))
}

fn one(cmd: u32, arg1: u64) -> MmuextOp {
    MmuextOp {
        cmd,
        reserved: 0,
        arg1,
        arg2: 0,
    }
}

/// Pins the pool frame at `gpa` as a level-`level` table (1..=4).
pub fn pin_table(level: u8, gpa: u64) -> Result<(), Error> {
    let op = one(
        MMUEXT_PIN_L1_TABLE + u32::from(level.saturating_sub(1)),
        gpa,
    );
    // SAFETY: pinning changes no mapping.
    unsafe { mmuext(&[op]) }.1
}

/// Unpins the table at `gpa`.
///
/// # Safety
/// Tables that lose their last reference stop being page tables; nothing live may
/// depend on mappings only they held.
pub unsafe fn unpin_table(gpa: u64) -> Result<(), Error> {
    // SAFETY: the caller vouches for the mappings that go away.
    unsafe { mmuext(&[one(MMUEXT_UNPIN_TABLE, gpa)]) }.1
}

/// Loads the pinned L4 table at `gpa` into this vCPU's CR3.
///
/// # Safety
/// The new address space must map the running code, stack and every live reference.
pub unsafe fn new_baseptr(gpa: u64) -> Result<(), Error> {
    // SAFETY: the caller vouches for the new address space.
    unsafe { mmuext(&[one(MMUEXT_NEW_BASEPTR, gpa)]) }.1
}

/// Flushes this vCPU's TLB (through the hypervisor, which knows what the host needs).
pub fn tlb_flush_local() -> Result<(), Error> {
    // SAFETY: a flush changes no mapping.
    unsafe { mmuext(&[one(MMUEXT_TLB_FLUSH_LOCAL, 0)]) }.1
}

/// Invalidates the translation of `va` on this vCPU.
pub fn invlpg_local(va: u64) -> Result<(), Error> {
    // SAFETY: a flush changes no mapping.
    unsafe { mmuext(&[one(MMUEXT_INVLPG_LOCAL, va)]) }.1
}

/// `update_va_mapping(va, val, flags)`: replaces the L1 entry mapping `va` in the
/// current page tables, then flushes per `flags` (`UVMF_*`).
///
/// # Safety
/// As for [`mmu_update`].
pub unsafe fn update_va_mapping(va: u64, val: u64, flags: u64) -> Result<(), Error> {
    // SAFETY: no pointer is passed; the caller vouches for the mapping changed.
    check(unsafe { hypercall3(Op::UpdateVaMapping, va, val, flags) }).map(|_| ())
}

/// `multicall(entries)`: runs every entry, each writing its own `result`.
///
/// # Safety
/// Each entry must be a call that would be sound on its own.
pub unsafe fn multicall(entries: &mut [MulticallEntry]) -> Result<(), Error> {
    // SAFETY: the hypervisor reads the entries and writes their results, all borrowed
    // for the call and identity-mapped; the caller vouches for each sub-call.
    check(unsafe {
        hypercall2(
            Op::Multicall,
            virt_to_phys(entries.as_mut_ptr()),
            entries.len() as u64,
        )
    })
    .map(|_| ())
}

/// Most pool frames a [`PtFrames`] allocator manages.
pub const PT_FRAMES_MAX: usize = 64 * 64;

/// Allocator of page-table frames from the page-table pool: the frames after the
/// boot tables (`start_info.pt_pool_gpa + nr_pt_frames * 4096` on), which are zero at
/// boot. A frame goes back with [`PtFrames::free`] once it is no page table any more
/// (unpinned and unreferenced); the caller clears its entries before reusing it as a
/// table, since pinning validates what it contains.
pub struct PtFrames {
    base: u64,
    count: usize,
    used: [u64; PT_FRAMES_MAX / 64],
}

impl PtFrames {
    /// The pool's free frames as `start_info` describes them (at most
    /// [`PT_FRAMES_MAX`] are managed).
    pub fn from_start_info(si: &hv_abi::start_info::StartInfo) -> Self {
        let base = si.pt_pool_gpa + si.nr_pt_frames * hv_abi::PAGE_SIZE;
        let count = si.pt_pool_frames.saturating_sub(si.nr_pt_frames) as usize;
        PtFrames {
            base,
            count: count.min(PT_FRAMES_MAX),
            used: [0; PT_FRAMES_MAX / 64],
        }
    }

    /// A free frame's guest-physical address, or `None` if the pool is exhausted.
    pub fn alloc(&mut self) -> Option<u64> {
        for (w, word) in self.used.iter_mut().enumerate() {
            if *word == u64::MAX {
                continue;
            }
            let bit = (!*word).trailing_zeros() as usize;
            let i = w * 64 + bit;
            if i >= self.count {
                return None;
            }
            *word |= 1 << bit;
            return Some(self.base + i as u64 * hv_abi::PAGE_SIZE);
        }
        None
    }

    /// Returns a frame obtained from [`PtFrames::alloc`]; other addresses are ignored.
    pub fn free(&mut self, gpa: u64) {
        let Some(off) = gpa.checked_sub(self.base) else {
            return;
        };
        let i = (off / hv_abi::PAGE_SIZE) as usize;
        if off % hv_abi::PAGE_SIZE == 0 && i < self.count {
            self.used[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Frames still free.
    pub fn available(&self) -> usize {
        self.count
            - self
                .used
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn allocates_frees_and_runs_out() {
        let mut si = hv_abi::start_info::StartInfo::new_zeroed();
        si.pt_pool_gpa = 0x400_0000;
        si.nr_pt_frames = 2;
        si.pt_pool_frames = 5;
        let mut a = PtFrames::from_start_info(&si);
        assert_eq!(a.available(), 3);
        let f: [u64; 3] = [a.alloc().unwrap(), a.alloc().unwrap(), a.alloc().unwrap()];
        assert_eq!(f, [0x400_2000, 0x400_3000, 0x400_4000]);
        assert_eq!(a.alloc(), None);
        a.free(0x400_3000);
        a.free(0x123); // ignored
        assert_eq!(a.alloc(), Some(0x400_3000));
    }
}
