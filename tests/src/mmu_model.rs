//! A reference model of the PV MMU rules, written to be obviously correct rather than
//! fast: it keeps only memory and pins, and derives everything else (which frames are
//! page tables, at which level) by walking the tables from the pins after every change.
//! An operation is accepted exactly when the state after it is consistent.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hv_abi::mmu::{PTE_A, PTE_D, PTE_P, PTE_W};
use hv_abi::Errno;

/// Page size.
pub const PAGE: u64 = 4096;

/// The model's view of the domain's memory layout.
#[derive(Clone, Copy, Debug)]
pub struct ModelLayout {
    /// Guest-physical address width: address bits from here to 51 are reserved.
    pub phys_bits: u32,
    /// RAM frames.
    pub ram_frames: u64,
    /// Pool base address.
    pub pool_base: u64,
    /// Pool frames.
    pub pool_frames: u64,
}

/// Model state: entries in memory (absent = 0) and pins (frame address -> level).
#[derive(Clone, Debug)]
pub struct Model {
    /// Layout.
    pub layout: ModelLayout,
    /// Memory of the pool, by entry address.
    pub mem: HashMap<u64, u64>,
    /// Pinned frames and their levels.
    pub pins: BTreeMap<u64, u8>,
}

/// What an entry points to, by the model's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Points {
    Nothing,
    Ram,
    PoolRo(u64),
    PoolRw(u64),
    Table(u64, u8),
}

/// What the walk from the pins found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Levels at which each frame is reachable.
    pub levels: BTreeMap<u64, BTreeSet<u8>>,
    /// Errors that make the state inconsistent (any of them may be reported).
    pub errors: BTreeSet<i64>,
    /// References to each frame as a table (pins + entries).
    pub table_refs: BTreeMap<u64, u32>,
    /// Writable L1 mappings of each pool frame.
    pub writable_maps: BTreeMap<u64, u32>,
}

impl Model {
    /// An empty model.
    pub fn new(layout: ModelLayout) -> Self {
        Model {
            layout,
            mem: HashMap::new(),
            pins: BTreeMap::new(),
        }
    }

    fn in_pool(&self, addr: u64) -> bool {
        addr >= self.layout.pool_base
            && addr < self.layout.pool_base + self.layout.pool_frames * PAGE
    }

    fn read(&self, addr: u64) -> u64 {
        self.mem.get(&addr).copied().unwrap_or(0)
    }

    /// The rules for one entry, written out plainly.
    fn rule(&self, level: u8, slot: u64, val: u64) -> Result<Points, Errno> {
        if val & PTE_P == 0 {
            return Ok(Points::Nothing);
        }
        let addr = val & 0x000F_FFFF_FFFF_F000;
        let flags = val & !0x000F_FFFF_FFFF_F000;
        // Address bits M..=51 are reserved.
        for bit in self.layout.phys_bits..52 {
            if val & (1 << bit) != 0 {
                return Err(Errno::EINVAL);
            }
        }
        // Bit 7 is PAT at L1 (allowed), PS at L2 (a 2 MiB page: bits 13-20 must be 0),
        // and PS at L3/L4 (no 1 GiB pages).
        let large = level == 2 && flags & (1 << 7) != 0;
        if level > 2 && flags & (1 << 7) != 0 {
            return Err(Errno::EINVAL);
        }
        if large && (13..=20).any(|bit| val & (1 << bit) != 0) {
            return Err(Errno::EINVAL);
        }
        if level == 4 && (256..=271).contains(&slot) {
            return Err(Errno::EACCES);
        }
        if large {
            // Wholly in RAM, which is never a page table: no reference.
            let start = addr & !((2 << 20) - 1);
            return if start + (2 << 20) <= self.layout.ram_frames * PAGE {
                Ok(Points::Ram)
            } else {
                Err(Errno::EACCES)
            };
        }
        if self.in_pool(addr) {
            if level > 1 {
                return Ok(Points::Table(addr, level - 1));
            }
            return Ok(if flags & PTE_W != 0 {
                Points::PoolRw(addr)
            } else {
                Points::PoolRo(addr)
            });
        }
        if level == 1 && addr < self.layout.ram_frames * PAGE {
            return Ok(Points::Ram);
        }
        Err(Errno::EACCES)
    }

    /// Walks the tables from the pins in the current state.
    pub fn walk(&self) -> Walk {
        self.walk_with(None)
    }

    /// Walks the tables from the pins and one extra reference (a table at a level, or
    /// a writable mapping), as held during an update that replaces it.
    fn walk_with(&self, extra: Option<Points>) -> Walk {
        let mut w = Walk::default();
        let mut stack: Vec<(u64, u8)> = Vec::new();
        for (&f, &l) in &self.pins {
            *w.table_refs.entry(f).or_default() += 1;
            stack.push((f, l));
        }
        match extra {
            Some(Points::Table(t, l)) => {
                *w.table_refs.entry(t).or_default() += 1;
                stack.push((t, l));
            }
            Some(Points::PoolRw(t)) => *w.writable_maps.entry(t).or_default() += 1,
            _ => {}
        }
        let mut seen = BTreeSet::new();
        while let Some((f, l)) = stack.pop() {
            w.levels.entry(f).or_default().insert(l);
            if !seen.insert((f, l)) {
                continue;
            }
            for slot in 0..512u64 {
                match self.rule(l, slot, self.read(f + slot * 8)) {
                    Err(e) => {
                        w.errors.insert(e.to_ret());
                    }
                    Ok(Points::Table(t, tl)) => {
                        *w.table_refs.entry(t).or_default() += 1;
                        stack.push((t, tl));
                    }
                    Ok(Points::PoolRw(t)) => *w.writable_maps.entry(t).or_default() += 1,
                    Ok(_) => {}
                }
            }
        }
        for levels in w.levels.values() {
            if levels.len() > 1 {
                w.errors.insert(Errno::EBUSY.to_ret());
            }
        }
        for t in w.writable_maps.keys() {
            if w.levels.contains_key(t) {
                // Which one a real implementation sees depends on which came first.
                w.errors.insert(Errno::EBUSY.to_ret());
                w.errors.insert(Errno::EACCES.to_ret());
            }
        }
        w
    }

    /// Level of a frame in the current state (0: not a page table).
    pub fn level_of(&self, frame: u64) -> u8 {
        self.walk()
            .levels
            .get(&frame)
            .and_then(|l| l.iter().next().copied())
            .unwrap_or(0)
    }

    /// Applies a change if the resulting state is consistent. `Err(codes)`: rejected,
    /// with the codes a correct implementation may report.
    fn commit(&mut self, next: Model, held: Option<Points>) -> Result<(), BTreeSet<i64>> {
        let w = next.walk_with(held);
        if w.errors.is_empty() {
            *self = next;
            Ok(())
        } else {
            Err(w.errors)
        }
    }

    /// Pin.
    pub fn pin(&mut self, level: u8, frame: u64) -> Result<(), BTreeSet<i64>> {
        if !(1..=4).contains(&level) || frame % PAGE != 0 || !self.in_pool(frame) {
            return Err([Errno::EINVAL.to_ret()].into());
        }
        if self.pins.contains_key(&frame) {
            return Err([Errno::EEXIST.to_ret()].into());
        }
        let mut next = self.clone();
        next.pins.insert(frame, level);
        self.commit(next, None)
    }

    /// Unpin (never of a loaded root in the model).
    pub fn unpin(&mut self, frame: u64) -> Result<(), BTreeSet<i64>> {
        if frame % PAGE != 0 || !self.in_pool(frame) || !self.pins.contains_key(&frame) {
            return Err([Errno::EINVAL.to_ret()].into());
        }
        self.pins.remove(&frame);
        Ok(())
    }

    /// One `mmu_update` request.
    pub fn update(&mut self, ptr: u64, val: u64) -> Result<(), BTreeSet<i64>> {
        let one = |e: Errno| -> Result<(), BTreeSet<i64>> { Err([e.to_ret()].into()) };
        let cmd = ptr & 7;
        let ptr = ptr & !7;
        if cmd != 0 && cmd != 2 {
            return one(Errno::EINVAL);
        }
        if !self.in_pool(ptr) {
            return one(if ptr < self.layout.ram_frames * PAGE {
                Errno::EACCES
            } else {
                Errno::EFAULT
            });
        }
        // PRESERVE_AD: A and D come from the entry being replaced.
        let val = if cmd == 2 {
            (val & !(PTE_A | PTE_D)) | (self.read(ptr) & (PTE_A | PTE_D))
        } else {
            val
        };
        let frame = ptr & !(PAGE - 1);
        let level = self.level_of(frame);
        let mut next = self.clone();
        if level == 0 {
            next.mem.insert(ptr, val);
            *self = next;
            return Ok(());
        }
        if let Err(e) = self.rule(level, (ptr % PAGE) / 8, val) {
            return one(e);
        }
        let mut stored = val;
        if val & PTE_P != 0 {
            stored |= PTE_A;
            // Dirty on writable leaves: L1 entries and 2 MiB pages.
            let leaf = level == 1 || (level == 2 && val & (1 << 7) != 0);
            if leaf && val & PTE_W != 0 {
                stored |= PTE_D;
            }
        }
        next.mem.insert(ptr, stored);
        // The new entry's reference is taken before the old one is dropped (as in
        // Xen), so the state must be consistent with both held.
        let old = self.rule(level, (ptr % PAGE) / 8, self.read(ptr)).ok();
        self.commit(next, old)
    }
}
