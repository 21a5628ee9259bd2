//! Entry rules: what a page-table entry at a given level and slot may contain.

use hv_abi::mmu::{PTE_A, PTE_ADDR_MASK, PTE_D, PTE_P, PTE_W};
use hv_abi::{Errno, PAGE_SIZE};

/// L4 slots reserved to the hypervisor (virtual 0xFFFF8000_00000000..0xFFFF8800_00000000).
pub const HV_L4_SLOTS: core::ops::RangeInclusive<usize> = 256..=271;

/// Bits a present L1 entry may have besides the frame address: P W U PWT PCD A D G,
/// the software bits 9-11 and NX. PAT (bit 7) and bits 52-62 are reserved in v1.
pub const L1_ALLOWED: u64 = 0x1FF & !(1 << 7) | 0xE00 | (1 << 63);
/// Bits a present L2-L4 entry may have besides the address: P W U PWT PCD A, the
/// software bits 9-11 and NX. PS (no huge pages), D, G and bits 52-62 are reserved.
pub const UPPER_ALLOWED: u64 = 0x3F | 0xE00 | (1 << 63);

/// The memory a domain's entries may refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
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
    /// An L1 entry mapping a RAM frame.
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
    /// looking at any frame's state. Errors: EINVAL for reserved or disallowed bits, a
    /// huge page, or an upper-level entry that points outside the pool; EPERM for a
    /// present entry in a hypervisor L4 slot; EFAULT for a frame outside the domain.
    pub fn check_entry(&self, level: u8, slot: usize, val: u64) -> Result<Target, Errno> {
        if val & PTE_P == 0 {
            return Ok(Target::NotPresent);
        }
        let allowed = if level == 1 {
            L1_ALLOWED
        } else {
            UPPER_ALLOWED
        };
        if val & !(allowed | PTE_ADDR_MASK) != 0 {
            return Err(Errno::EINVAL);
        }
        if level == 4 && HV_L4_SLOTS.contains(&slot) {
            return Err(Errno::EPERM);
        }
        let addr = val & PTE_ADDR_MASK;
        if let Some(i) = self.pool_index(addr) {
            return Ok(match level {
                1 if val & PTE_W != 0 => Target::PoolWritable(i),
                1 => Target::PoolReadOnly(i),
                _ => Target::Table(i, level - 1),
            });
        }
        if addr < self.ram_bytes() {
            return if level == 1 {
                Ok(Target::Ram)
            } else {
                Err(Errno::EINVAL)
            };
        }
        Err(Errno::EFAULT)
    }
}

/// The value the hypervisor stores for `val` at `level`: Accessed set on present
/// entries, and Dirty on present writable L1 entries.
pub fn with_accessed(level: u8, val: u64) -> u64 {
    if val & PTE_P == 0 {
        return val;
    }
    let mut v = val | PTE_A;
    if level == 1 && val & PTE_W != 0 {
        v |= PTE_D;
    }
    v
}
