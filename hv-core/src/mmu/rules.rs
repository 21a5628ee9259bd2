//! Entry rules: what a page-table entry at a given level and slot may contain.

use hv_abi::mmu::{
    LARGE_PAGE_SIZE, PTE_A, PTE_ADDR_MASK, PTE_D, PTE_LARGE_ADDR_MASK, PTE_P, PTE_PAT_LARGE,
    PTE_PS, PTE_W,
};
use hv_abi::{Errno, PAGE_SIZE};

/// L4 slots reserved to the hypervisor (virtual 0xFFFF8000_00000000..0xFFFF8800_00000000).
pub const HV_L4_SLOTS: core::ops::RangeInclusive<usize> = 256..=271;

/// Mask of the frame-address field of an entry (bits 12-51).
pub const ADDR_FIELD: u64 = 0x000F_FFFF_FFFF_F000;

/// The memory a domain's entries may refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest-physical address width M (CPUID 0x80000008 EAX[7:0]): address bits M..=51
    /// of an entry are reserved.
    pub phys_bits: u32,
    /// RAM frames: RAM is `[0, ram_frames * 4096)`.
    pub ram_frames: u64,
    /// Guest-physical address of the pool.
    pub pool_base: u64,
    /// Frames in the pool.
    pub pool_frames: u64,
}

/// What a validated entry refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Not present: refers to nothing.
    NotPresent,
    /// An L1 entry mapping a RAM frame, or an L2 entry mapping a 2 MiB page of RAM.
    Ram,
    /// An L1 entry mapping a pool frame read-only.
    PoolReadOnly(usize),
    /// An L1 entry mapping a pool frame writable (allowed only while it is no table).
    PoolWritable(usize),
    /// An upper-level entry pointing to pool frame `.0` as a level-`.1` table.
    Table(usize, u8),
}

impl Layout {
    /// RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_frames * PAGE_SIZE
    }

    /// Pool index of the frame holding `gpa`, if it is in the pool.
    pub fn pool_index(&self, gpa: u64) -> Option<usize> {
        let off = gpa.checked_sub(self.pool_base)?;
        let idx = off / PAGE_SIZE;
        (idx < self.pool_frames).then_some(idx as usize)
    }

    /// Guest-physical address of pool frame `idx`.
    pub fn pool_gpa(&self, idx: usize) -> u64 {
        self.pool_base + idx as u64 * PAGE_SIZE
    }

    /// Checks entry `val` for slot `slot` of a level-`level` table (1..=4) without
    /// looking at any frame's state (SPEC.md 8.5.2). Errors: EINVAL for reserved address
    /// bits (M..=51), PS in an L3 or L4 entry, or a 2 MiB page (PS in an L2 entry) whose
    /// bits 13-20 are not 0; EACCES for a present entry in a hypervisor L4 slot, a 2 MiB
    /// page not wholly in RAM, or a target that is neither RAM (L1 only) nor the pool.
    pub fn check_entry(&self, level: u8, slot: usize, val: u64) -> Result<Target, Errno> {
        if val & PTE_P == 0 {
            return Ok(Target::NotPresent);
        }
        let reserved = ADDR_FIELD & !((1u64 << self.phys_bits.clamp(32, 52)) - 1);
        let large = level == 2 && val & PTE_PS != 0;
        let large_reserved = PTE_ADDR_MASK & !PTE_LARGE_ADDR_MASK & !PTE_PAT_LARGE;
        if val & reserved != 0
            || (level > 2 && val & PTE_PS != 0)
            || (large && val & large_reserved != 0)
        {
            return Err(Errno::EINVAL);
        }
        if level == 4 && HV_L4_SLOTS.contains(&slot) {
            return Err(Errno::EACCES);
        }
        if large {
            // RAM frames are never page tables, so a 2 MiB page of RAM needs no type
            // tracking; one that reaches past RAM (into the pool, the grant window or a
            // passthrough region) is refused.
            let start = val & PTE_LARGE_ADDR_MASK;
            return if start + LARGE_PAGE_SIZE <= self.ram_bytes() {
                Ok(Target::Ram)
            } else {
                Err(Errno::EACCES)
            };
        }
        let addr = val & PTE_ADDR_MASK;
        if let Some(i) = self.pool_index(addr) {
            return Ok(match level {
                1 if val & PTE_W != 0 => Target::PoolWritable(i),
                1 => Target::PoolReadOnly(i),
                _ => Target::Table(i, level - 1),
            });
        }
        if level == 1 && addr < self.ram_bytes() {
            return Ok(Target::Ram);
        }
        Err(Errno::EACCES)
    }
}

/// True if `val`, found at `level`, maps a page (an L1 entry, or an L2 entry with PS)
/// rather than pointing to a table.
pub fn is_leaf(level: u8, val: u64) -> bool {
    level == 1 || (level == 2 && val & PTE_PS != 0)
}

/// The value the hypervisor stores for `val` at `level`: Accessed set on present
/// entries, and Dirty on present writable leaves (L1 entries and 2 MiB pages).
pub fn with_accessed(level: u8, val: u64) -> u64 {
    if val & PTE_P == 0 {
        return val;
    }
    let mut v = val | PTE_A;
    if is_leaf(level, val) && val & PTE_W != 0 {
        v |= PTE_D;
    }
    v
}
