//! PV MMU: page-table updates (specified in ABI v1; available when the hypervisor
//! reports [`crate::Features::PV_MMU`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `mmu_update` request command in the low 2 bits of `ptr`: normal checked update.
pub const MMU_NORMAL_PT_UPDATE: u64 = 0;
/// `mmu_update` request command: update preserving the Accessed/Dirty bits.
pub const MMU_PT_UPDATE_PRESERVE_AD: u64 = 2;

/// One `mmu_update(reqs, count, done)` request: write `val` to the page-table entry at
/// guest-physical address `ptr & !7`, with the command in `ptr & 3`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MmuUpdate {
    /// Guest-physical address of the entry, with the command in bits 0-1.
    pub ptr: u64,
    /// New entry value.
    pub val: u64,
}

/// `mmuext_op` command: pin an L1 table.
pub const MMUEXT_PIN_L1_TABLE: u32 = 0;
/// `mmuext_op` command: pin an L2 table.
pub const MMUEXT_PIN_L2_TABLE: u32 = 1;
/// `mmuext_op` command: pin an L3 table.
pub const MMUEXT_PIN_L3_TABLE: u32 = 2;
/// `mmuext_op` command: pin an L4 table.
pub const MMUEXT_PIN_L4_TABLE: u32 = 3;
/// `mmuext_op` command: unpin a table.
pub const MMUEXT_UNPIN_TABLE: u32 = 4;
/// `mmuext_op` command: load a pinned L4 into CR3.
pub const MMUEXT_NEW_BASEPTR: u32 = 5;
/// `mmuext_op` command: flush this vCPU's TLB.
pub const MMUEXT_TLB_FLUSH_LOCAL: u32 = 6;
/// `mmuext_op` command: invalidate one virtual address on this vCPU.
pub const MMUEXT_INVLPG_LOCAL: u32 = 7;

/// One `mmuext_op(ops, count, done)` operation (24 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MmuextOp {
    /// `MMUEXT_*` command.
    pub cmd: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Guest-physical frame address (pin, unpin, new_baseptr) or virtual address (invlpg).
    pub arg1: u64,
    /// Reserved for commands with a second argument, zero.
    pub arg2: u64,
}

/// `update_va_mapping` flag: no flush.
pub const UVMF_NONE: u64 = 0;
/// `update_va_mapping` flag: flush the whole local TLB afterwards.
pub const UVMF_TLB_FLUSH: u64 = 1;
/// `update_va_mapping` flag: invalidate the updated address afterwards.
pub const UVMF_INVLPG: u64 = 2;

/// One `multicall(entries, count)` entry (64 bytes): `op` with `args`, and the
/// sub-call's own result written back to `result`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MulticallEntry {
    /// Operation number ([`crate::Op`]).
    pub op: u64,
    /// Written by the hypervisor: the sub-call's return value.
    pub result: i64,
    /// Arguments 1 to 5 of the sub-call; `args[5]` must be zero.
    pub args: [u64; 6],
}

/// Page-table entry bit: present.
pub const PTE_P: u64 = 1 << 0;
/// Page-table entry bit: writable.
pub const PTE_W: u64 = 1 << 1;
/// Page-table entry bit: user-accessible.
pub const PTE_U: u64 = 1 << 2;
/// Page-table entry bit: write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Page-table entry bit: cache disable.
pub const PTE_PCD: u64 = 1 << 4;
/// Page-table entry bit: accessed.
pub const PTE_A: u64 = 1 << 5;
/// Page-table entry bit: dirty.
pub const PTE_D: u64 = 1 << 6;
/// Page-table entry bit: page size (a 2 MiB page in an L2 entry, ABI 1.3; refused in
/// L3 and L4 entries), PAT in L1.
pub const PTE_PS: u64 = 1 << 7;
/// Page-table entry bit: PAT in an L2 entry with [`PTE_PS`] (a 2 MiB page).
pub const PTE_PAT_LARGE: u64 = 1 << 12;
/// Size of the page an L2 entry with [`PTE_PS`] maps (ABI 1.3).
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// Mask of the frame address in an L2 entry with [`PTE_PS`] (bits 21-51); bits 13-20
/// are reserved.
pub const PTE_LARGE_ADDR_MASK: u64 = 0x000F_FFFF_FFE0_0000;
/// Page-table entry bit: global.
pub const PTE_G: u64 = 1 << 8;
/// Page-table entry bit: no-execute.
pub const PTE_NX: u64 = 1 << 63;
/// Mask of the frame address in a 4 KiB page-table entry (bits 12-51).
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<MmuUpdate>(), 16);
        assert_eq!(offset_of!(MmuUpdate, ptr), 0);
        assert_eq!(offset_of!(MmuUpdate, val), 8);
        assert_eq!(size_of::<MmuextOp>(), 24);
        assert_eq!(offset_of!(MmuextOp, cmd), 0);
        assert_eq!(offset_of!(MmuextOp, reserved), 4);
        assert_eq!(offset_of!(MmuextOp, arg1), 8);
        assert_eq!(offset_of!(MmuextOp, arg2), 16);
        assert_eq!(size_of::<MulticallEntry>(), 64);
        assert_eq!(offset_of!(MulticallEntry, op), 0);
        assert_eq!(offset_of!(MulticallEntry, result), 8);
        assert_eq!(offset_of!(MulticallEntry, args), 16);
    }
}
