//! The PV MMU: the frame table of the page-table pool and the validator that every
//! page-table change goes through (hypercalls and trapped writes alike).
//!
//! Rules (SPEC.md, "PV MMU"), modelled on Xen's:
//! - Only frames of the page-table pool can be page tables. Each pool frame has a type
//!   (none or L1..L4), a type count (references as that type: pins plus validated
//!   upper-level entries), a pin flag and a count of writable mappings.
//! - A frame gets a type when its count goes from 0 to 1: all 512 entries are validated
//!   then. The type changes only at count 0; when the count drops to 0 the frame loses
//!   its type and drops the references its entries held.
//! - A present L1 entry maps a RAM frame (any permissions) or a pool frame: read-only
//!   if the pool frame is a page table; writable only while it is not one (such a
//!   frame cannot become a page table until the writable mappings are gone).
//! - A present L2..L4 entry points to a pool frame validated as a table one level down,
//!   except an L2 entry with PS (ABI 1.3): a 2 MiB page wholly in RAM, which takes no
//!   reference (RAM frames are never page tables). No PS in L3/L4, no reserved bits,
//!   nothing in the hypervisor's L4 slots.
//! - Entries written through the validator get Accessed set (and Dirty on writable
//!   leaves), so a CPU rarely needs to write them back into the read-only pool.
//!   Validation itself never changes memory: a rejected operation changes nothing.

pub mod hypercalls;
pub mod rules;

use hv_abi::mmu::PTE_P;
use hv_abi::{Errno, PAGE_SIZE};

pub use rules::{Layout, Target};

/// Access to the page-table pool's memory.
pub trait PtMemory {
    /// Reads the 8-byte entry at guest-physical `gpa` (8-aligned, inside the pool).
    fn read_pte(&self, gpa: u64) -> u64;
    /// Writes the 8-byte entry at guest-physical `gpa` (8-aligned, inside the pool).
    fn write_pte(&mut self, gpa: u64, val: u64);
}

/// A page-table pool held in a plain vector, for benchmarks, fuzzing and tests of the
/// validator without a domain (the hypervisor itself uses
/// [`PoolAccess`]). Addresses outside the pool read as 0 and are not
/// written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatPool {
    base: u64,
    entries: Vec<u64>,
}

impl FlatPool {
    /// A zeroed pool of `frames` frames at guest-physical `base`.
    pub fn new(base: u64, frames: u64) -> Self {
        FlatPool {
            base,
            entries: vec![0; crate::conv::usize_from(frames * 512)],
        }
    }

    fn index(&self, gpa: u64) -> Option<usize> {
        let i = (gpa.checked_sub(self.base)? / 8) as usize;
        (i < self.entries.len()).then_some(i)
    }
}

impl PtMemory for FlatPool {
    fn read_pte(&self, gpa: u64) -> u64 {
        self.index(gpa).map_or(0, |i| self.entries[i])
    }
    fn write_pte(&mut self, gpa: u64, val: u64) {
        if let Some(i) = self.index(gpa) {
            self.entries[i] = val;
        }
    }
}

/// Per-frame state of a pool frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameInfo {
    /// 0: not a page table; 1..=4: L1..L4.
    pub level: u8,
    /// References as `level` (pins and validated entries one level up).
    pub type_count: u32,
    /// Pinned by the guest (or by the hypervisor at boot).
    pub pinned: bool,
    /// Writable mappings of this frame in validated L1 tables.
    pub writable_maps: u32,
}

/// Changes to present entries since the last [`Mmu::take_changes`]: what a host with
/// shadow page tables must be told about (see [`crate::coherence`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Frames that present L1 entries mapped before they were changed or removed.
    pub old_l1_targets: Vec<u64>,
    /// A present L2-L4 entry was changed or removed.
    pub upper: bool,
}

/// The frame table and validator of one domain.
#[derive(Clone, Debug)]
pub struct Mmu {
    layout: Layout,
    frames: Vec<FrameInfo>,
    changes: Changes,
    /// Guest-physical ranges `[start, end)` outside RAM that L1 entries may map as
    /// data pages (passthrough regions).
    data_ranges: Vec<(u64, u64)>,
}

impl Mmu {
    /// A frame table for `layout` with every frame untyped.
    pub fn new(layout: Layout) -> Self {
        Mmu {
            frames: vec![FrameInfo::default(); crate::conv::usize_from(layout.pool_frames)],
            layout,
            changes: Changes::default(),
            data_ranges: Vec::new(),
        }
    }

    /// Lets L1 entries map the `bytes` at `gpa` (a passthrough region, outside RAM and
    /// the pool) as data pages, like RAM: never as page tables, never pinned.
    pub fn add_data_range(&mut self, gpa: u64, bytes: u64) {
        self.data_ranges.push((gpa, gpa.saturating_add(bytes)));
    }

    /// Stops accepting new L1 entries into the range added at `gpa` (the region was
    /// detached; entries already validated stay, and take no reference).
    pub fn remove_data_range(&mut self, gpa: u64) {
        self.data_ranges.retain(|(start, _)| *start != gpa);
    }

    /// [`Layout::check_entry`], with the data ranges as RAM for L1 entries.
    pub fn check_entry(&self, level: u8, slot: usize, val: u64) -> Result<Target, Errno> {
        match self.layout.check_entry(level, slot, val) {
            Err(Errno::EACCES) if level == 1 => {
                let addr = val & hv_abi::mmu::PTE_ADDR_MASK;
                if self
                    .data_ranges
                    .iter()
                    .any(|(start, end)| (*start..*end).contains(&addr))
                {
                    Ok(Target::Ram)
                } else {
                    Err(Errno::EACCES)
                }
            }
            r => r,
        }
    }

    /// Takes the record of present entries changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// State of the pool frame at `gpa` (`None` outside the pool).
    pub fn frame(&self, gpa: u64) -> Option<FrameInfo> {
        self.layout.pool_index(gpa).map(|i| self.frames[i])
    }

    /// All pool frames' states, by pool index.
    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    /// True if `gpa` is a pinned L4 table (a valid CR3).
    pub fn is_pinned_l4(&self, gpa: u64) -> bool {
        gpa % PAGE_SIZE == 0
            && self
                .layout
                .pool_index(gpa)
                .is_some_and(|i| self.frames[i].pinned && self.frames[i].level == 4)
    }

    /// Pins the table at `gpa` as a level-`level` table, validating it if needed.
    pub fn pin(&mut self, mem: &mut impl PtMemory, level: u8, gpa: u64) -> Result<(), Errno> {
        if !(1..=4).contains(&level) || gpa % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let idx = self.layout.pool_index(gpa).ok_or(Errno::EINVAL)?;
        if self.frames[idx].pinned {
            return Err(Errno::EEXIST);
        }
        self.get_type(mem, idx, level)?;
        self.frames[idx].pinned = true;
        Ok(())
    }

    /// Unpins the table at `gpa`. `in_use` tells whether it is some vCPU's CR3.
    pub fn unpin(&mut self, mem: &mut impl PtMemory, gpa: u64, in_use: bool) -> Result<(), Errno> {
        if gpa % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let idx = self.layout.pool_index(gpa).ok_or(Errno::EINVAL)?;
        if !self.frames[idx].pinned {
            return Err(Errno::EINVAL);
        }
        if in_use {
            return Err(Errno::EBUSY);
        }
        self.frames[idx].pinned = false;
        self.put_type(mem, idx);
        Ok(())
    }

    /// One `mmu_update` request: `ptr` holds the entry's address and command, `val` the
    /// new value. Returns the level of the table changed (0 if the frame is not a page
    /// table and the value was stored as is) and the entry's previous value.
    pub fn update(
        &mut self,
        mem: &mut impl PtMemory,
        ptr: u64,
        val: u64,
    ) -> Result<(u8, u64), Errno> {
        let gpa = ptr & !7;
        match ptr & 7 {
            hv_abi::mmu::MMU_NORMAL_PT_UPDATE => self.write_entry(mem, gpa, val),
            hv_abi::mmu::MMU_PT_UPDATE_PRESERVE_AD => {
                self.pool_entry(gpa)?;
                let ad = hv_abi::mmu::PTE_A | hv_abi::mmu::PTE_D;
                let old = mem.read_pte(gpa);
                self.write_entry(mem, gpa, (val & !ad) | (old & ad))
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// Checks that `gpa` is an aligned entry in the pool; returns the pool index.
    fn pool_entry(&self, gpa: u64) -> Result<usize, Errno> {
        if gpa % 8 != 0 {
            return Err(Errno::EINVAL);
        }
        self.layout
            .pool_index(gpa)
            .ok_or(if gpa < self.layout.ram_bytes() {
                Errno::EACCES
            } else {
                Errno::EFAULT
            })
    }

    /// A batch of `mmu_update` requests, in order, stopping at the first failure.
    /// Returns how many were applied and the first failure's error.
    pub fn update_batch(
        &mut self,
        mem: &mut impl PtMemory,
        reqs: &[hv_abi::mmu::MmuUpdate],
    ) -> (u32, Result<(), Errno>) {
        let mut done = 0u32;
        for r in reqs {
            if let Err(e) = self.update(mem, r.ptr, r.val) {
                return (done, Err(e));
            }
            done = done.saturating_add(1);
        }
        (done, Ok(()))
    }

    /// A direct write of 8 bytes at `gpa` (trapped or `mmu_update`): validated if the
    /// frame is a page table, stored as is otherwise.
    pub fn write_entry(
        &mut self,
        mem: &mut impl PtMemory,
        gpa: u64,
        val: u64,
    ) -> Result<(u8, u64), Errno> {
        let idx = self.pool_entry(gpa)?;
        let old = mem.read_pte(gpa);
        let level = self.frames[idx].level;
        if self.frames[idx].type_count == 0 {
            mem.write_pte(gpa, val);
            return Ok((0, old));
        }
        let slot = ((gpa % PAGE_SIZE) / 8) as usize;
        let new_target = self.check_entry(level, slot, val)?;
        self.get_ref(mem, new_target)?;
        // Validated entries never fail to decode.
        let old_target = self
            .check_entry(level, slot, old)
            .unwrap_or(Target::NotPresent);
        let stored = rules::with_accessed(level, val);
        mem.write_pte(gpa, stored);
        self.put_ref(mem, old_target);
        if old & PTE_P != 0 && old != stored {
            if level == 1 {
                // Duplicates are removed when the changes are applied.
                self.changes
                    .old_l1_targets
                    .push(old & hv_abi::mmu::PTE_ADDR_MASK);
            } else {
                self.changes.upper = true;
            }
        }
        Ok((level, old))
    }

    /// Writes the L1 entry at `gpa` on the hypervisor's own behalf, without validating
    /// `val` (grant mappings, SPEC 8.8: their targets lie in the grant window, which
    /// guest-made entries may not map, so they take no reference and decode as not
    /// present when the table is untyped). The frame must be a validated L1 table
    /// (else EINVAL); the entry must currently be not present (`expect` = `None`) or
    /// exactly `expect` (else EBUSY). A replaced present entry is recorded for
    /// coherence like any changed L1 entry.
    pub fn hv_write_l1(
        &mut self,
        mem: &mut impl PtMemory,
        gpa: u64,
        expect: Option<u64>,
        val: u64,
    ) -> Result<(), Errno> {
        let idx = self.pool_entry(gpa).map_err(|_| Errno::EINVAL)?;
        let f = self.frames[idx];
        if f.level != 1 || f.type_count == 0 {
            return Err(Errno::EINVAL);
        }
        let old = mem.read_pte(gpa);
        let ok = match expect {
            None => old & PTE_P == 0,
            Some(v) => old == v,
        };
        if !ok {
            return Err(Errno::EBUSY);
        }
        mem.write_pte(gpa, val);
        if old & PTE_P != 0 && old != val {
            self.changes
                .old_l1_targets
                .push(old & hv_abi::mmu::PTE_ADDR_MASK);
        }
        Ok(())
    }

    fn get_ref(&mut self, mem: &mut impl PtMemory, t: Target) -> Result<(), Errno> {
        match t {
            Target::NotPresent | Target::Ram | Target::PoolReadOnly(_) => Ok(()),
            Target::PoolWritable(i) => {
                if self.frames[i].type_count > 0 {
                    return Err(Errno::EACCES);
                }
                self.frames[i].writable_maps += 1;
                Ok(())
            }
            Target::Table(i, level) => self.get_type(mem, i, level),
        }
    }

    fn put_ref(&mut self, mem: &mut impl PtMemory, t: Target) {
        match t {
            Target::NotPresent | Target::Ram | Target::PoolReadOnly(_) => {}
            Target::PoolWritable(i) => self.frames[i].writable_maps -= 1,
            Target::Table(i, _) => self.put_type(mem, i),
        }
    }

    /// Takes a reference to frame `idx` as a level-`level` table, validating all its
    /// entries if it had no type.
    fn get_type(&mut self, mem: &mut impl PtMemory, idx: usize, level: u8) -> Result<(), Errno> {
        let f = self.frames[idx];
        if f.type_count > 0 {
            return if f.level == level {
                self.frames[idx].type_count += 1;
                Ok(())
            } else {
                Err(Errno::EBUSY)
            };
        }
        if f.writable_maps > 0 {
            return Err(Errno::EBUSY);
        }
        // Typed from here on, so that an entry referring back to this frame as another
        // level is a type conflict rather than a loop.
        self.frames[idx].level = level;
        self.frames[idx].type_count = 1;
        let base = self.layout.pool_gpa(idx);
        for slot in 0..512 {
            let gpa = base + slot as u64 * 8;
            let val = mem.read_pte(gpa);
            let r = self
                .check_entry(level, slot, val)
                .and_then(|t| self.get_ref(mem, t));
            if let Err(e) = r {
                self.put_entries(mem, idx, level, slot);
                self.frames[idx].level = 0;
                self.frames[idx].type_count = 0;
                return Err(e);
            }
        }
        Ok(())
    }

    fn put_type(&mut self, mem: &mut impl PtMemory, idx: usize) {
        self.frames[idx].type_count -= 1;
        if self.frames[idx].type_count > 0 {
            return;
        }
        let level = self.frames[idx].level;
        self.put_entries(mem, idx, level, 512);
        self.frames[idx].level = 0;
    }

    /// Drops the references held by entries `0..upto` of frame `idx`, validated as
    /// level-`level` entries.
    fn put_entries(&mut self, mem: &mut impl PtMemory, idx: usize, level: u8, upto: usize) {
        let base = self.layout.pool_gpa(idx);
        for slot in 0..upto {
            let v = mem.read_pte(base + slot as u64 * 8);
            // Validated entries always decode.
            let t = self
                .check_entry(level, slot, v)
                .unwrap_or(Target::NotPresent);
            self.put_ref(mem, t);
        }
    }
}

/// The page-table pool of a domain's memory, as the PV MMU validator sees it.
#[derive(Debug)]
pub struct PoolAccess<'a>(pub &'a crate::memory::DomainMemory);

use vm_memory::Bytes as _;

impl PtMemory for PoolAccess<'_> {
    // vm-memory's `Bytes` gives the typed accesses.
    fn read_pte(&self, gpa: u64) -> u64 {
        // The validator only asks for aligned entries inside the pool.
        self.0
            .guest_memory()
            .read_obj::<u64>(vm_memory::GuestAddress(gpa))
            .unwrap_or(0)
    }

    fn write_pte(&mut self, gpa: u64, val: u64) {
        let _ = self
            .0
            .guest_memory()
            .write_obj::<u64>(val, vm_memory::GuestAddress(gpa));
    }
}

#[cfg(test)]
mod tests;
