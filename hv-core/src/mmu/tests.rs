use super::*;
use hv_abi::mmu::{PTE_A, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W};
use std::collections::HashMap;

#[derive(Default)]
struct Mem(HashMap<u64, u64>);

impl PtMemory for Mem {
    fn read_pte(&self, gpa: u64) -> u64 {
        self.0.get(&gpa).copied().unwrap_or(0)
    }
    fn write_pte(&mut self, gpa: u64, val: u64) {
        self.0.insert(gpa, val);
    }
}

const POOL: u64 = 0x40_0000;

fn layout() -> Layout {
    Layout {
        phys_bits: 46,
        ram_frames: 1024,
        pool_base: POOL,
        pool_frames: 16,
    }
}

fn f(i: u64) -> u64 {
    POOL + i * 4096
}

/// L4 (frame 0) -> L3 (1) -> L2 (2) -> L1 (3) mapping RAM page 0x5000 and frame 3 RO.
fn chain(mem: &mut Mem) {
    mem.write_pte(f(0), f(1) | PTE_P | PTE_W);
    mem.write_pte(f(1), f(2) | PTE_P | PTE_W);
    mem.write_pte(f(2), f(3) | PTE_P | PTE_W);
    mem.write_pte(f(3), 0x5000 | PTE_P | PTE_W | PTE_U);
    mem.write_pte(f(3) + 8, f(3) | PTE_P);
}

#[test]
fn pin_validates_the_whole_tree_and_unpin_releases_it() {
    let mut mem = Mem::default();
    chain(&mut mem);
    let mut m = Mmu::new(layout());
    m.pin(&mut mem, 4, f(0)).unwrap();
    assert!(m.is_pinned_l4(f(0)));
    for (i, level) in [(0, 4), (1, 3), (2, 2), (3, 1)] {
        let fr = m.frame(f(i)).unwrap();
        assert_eq!((fr.level, fr.type_count), (level, 1), "frame {i}");
    }
    assert_eq!(m.pin(&mut mem, 4, f(0)), Err(Errno::EEXIST));
    assert_eq!(m.unpin(&mut mem, f(0), true), Err(Errno::EBUSY));
    m.unpin(&mut mem, f(0), false).unwrap();
    assert!(m.frames().iter().all(|fr| *fr == FrameInfo::default()));
    assert_eq!(m.unpin(&mut mem, f(0), false), Err(Errno::EINVAL));
}

#[test]
fn entry_rules() {
    let l = layout();
    let ok = |lvl, slot, v| l.check_entry(lvl, slot, v);
    assert_eq!(ok(1, 0, 0x5000 | PTE_P | PTE_PS), Ok(Target::Ram)); // PAT at L1
                                                                    // 2 MiB pages (ABI 1.3): L2 only, aligned (bit 12 is PAT), wholly in RAM (4 MiB).
    assert_eq!(
        ok(2, 0, 0x20_0000 | PTE_P | PTE_W | PTE_PS),
        Ok(Target::Ram)
    );
    assert_eq!(ok(2, 0, 0x20_1000 | PTE_P | PTE_PS), Ok(Target::Ram)); // PAT
    assert_eq!(ok(2, 0, 0x20_2000 | PTE_P | PTE_PS), Err(Errno::EINVAL)); // bits 13-20
    assert_eq!(ok(2, 0, 0x30_0000 | PTE_P | PTE_PS), Err(Errno::EINVAL));
    assert_eq!(ok(2, 0, POOL | PTE_P | PTE_PS), Err(Errno::EACCES)); // the pool
    assert_eq!(ok(2, 0, (1 << 40) | PTE_P | PTE_PS), Err(Errno::EACCES)); // outside
    assert_eq!(
        ok(2, 0, 0x20_0000 | PTE_P | PTE_PS | 1 << 46),
        Err(Errno::EINVAL)
    );
    assert_eq!(ok(3, 0, PTE_P | PTE_PS), Err(Errno::EINVAL)); // no 1 GiB pages
    assert_eq!(ok(3, 0, f(1) | PTE_P | PTE_PS), Err(Errno::EINVAL));
    assert_eq!(ok(4, 0, f(1) | PTE_P | PTE_PS), Err(Errno::EINVAL));
    assert_eq!(
        ok(1, 0, 0x5000 | PTE_P | 1 << 52 | 1 << 62),
        Ok(Target::Ram)
    ); // software bits
    assert_eq!(ok(1, 0, 0x5000 | PTE_P | 1 << 46), Err(Errno::EINVAL)); // address bit >= M
    assert_eq!(ok(1, 0, 0x5000 | PTE_P | 1 << 51), Err(Errno::EINVAL));
    assert_eq!(ok(2, 0, 0x5000 | PTE_P), Err(Errno::EACCES)); // upper level -> RAM
    assert_eq!(ok(1, 0, (1 << 40) | PTE_P), Err(Errno::EACCES)); // outside the domain
    assert_eq!(ok(4, 256, f(1) | PTE_P), Err(Errno::EACCES)); // hypervisor slots
    assert_eq!(ok(4, 271, f(1) | PTE_P), Err(Errno::EACCES));
    assert_eq!(ok(4, 272, f(1) | PTE_P), Ok(Target::Table(1, 3)));
    assert_eq!(ok(4, 256, f(1)), Ok(Target::NotPresent));
    assert_eq!(ok(1, 0, 0x5000 | PTE_P | PTE_W), Ok(Target::Ram));
    assert_eq!(ok(1, 0, f(2) | PTE_P), Ok(Target::PoolReadOnly(2)));
    assert_eq!(ok(1, 0, f(2) | PTE_P | PTE_W), Ok(Target::PoolWritable(2)));
}

#[test]
fn page_tables_cannot_be_mapped_writable_and_vice_versa() {
    let mut mem = Mem::default();
    chain(&mut mem);
    let mut m = Mmu::new(layout());
    m.pin(&mut mem, 4, f(0)).unwrap();
    // Writable mapping of a page table: refused, nothing changes.
    assert_eq!(
        m.update(&mut mem, f(3) + 16, f(2) | PTE_P | PTE_W),
        Err(Errno::EACCES)
    );
    assert_eq!(mem.read_pte(f(3) + 16), 0);
    // A writable mapping of an untyped pool frame is fine; that frame cannot then be
    // made a table.
    m.update(&mut mem, f(3) + 16, f(5) | PTE_P | PTE_W).unwrap();
    assert_eq!(m.frame(f(5)).unwrap().writable_maps, 1);
    assert_eq!(m.pin(&mut mem, 1, f(5)), Err(Errno::EBUSY));
    m.update(&mut mem, f(3) + 16, 0).unwrap();
    assert_eq!(m.frame(f(5)).unwrap().writable_maps, 0);
    m.pin(&mut mem, 1, f(5)).unwrap();
}

#[test]
fn type_conflicts_and_failed_validation_change_nothing() {
    let mut mem = Mem::default();
    chain(&mut mem);
    let mut m = Mmu::new(layout());
    m.pin(&mut mem, 4, f(0)).unwrap();
    let before = m.frames().to_vec();
    // Frame 3 is an L1; an L4 entry wanting it as an L3 conflicts.
    assert_eq!(
        m.update(&mut mem, f(0) + 8, f(3) | PTE_P),
        Err(Errno::EBUSY)
    );
    // Recursive L4 entry: the L4 itself as an L3.
    assert_eq!(
        m.update(&mut mem, f(0) + 8, f(0) | PTE_P),
        Err(Errno::EBUSY)
    );
    // A fresh L3 (frame 6) whose entry points to an L2 (frame 7) with a bad entry deep in.
    mem.write_pte(f(6), f(7) | PTE_P);
    mem.write_pte(f(7) + 8 * 9, f(8) | PTE_P | PTE_PS);
    let snapshot = mem.0.clone();
    assert_eq!(
        m.update(&mut mem, f(0) + 8, f(6) | PTE_P),
        Err(Errno::EINVAL)
    );
    assert_eq!(m.frames(), &before[..]);
    assert_eq!(mem.0, snapshot);
}

#[test]
fn updates_move_references_and_store_accessed_bits() {
    let mut mem = Mem::default();
    chain(&mut mem);
    let mut m = Mmu::new(layout());
    m.pin(&mut mem, 4, f(0)).unwrap();
    // A second L1 (frame 4), then point the L2 entry at it instead of frame 3.
    mem.write_pte(f(4), 0x6000 | PTE_P | PTE_W);
    let (level, old) = m.update(&mut mem, f(2), f(4) | PTE_P | PTE_W).unwrap();
    assert_eq!(level, 2);
    assert_eq!(old, f(3) | PTE_P | PTE_W);
    assert_eq!(m.frame(f(3)).unwrap(), FrameInfo::default());
    assert_eq!(m.frame(f(4)).unwrap().level, 1);
    assert_eq!(mem.read_pte(f(2)), f(4) | PTE_P | PTE_W | PTE_A);
    m.update(&mut mem, f(4) + 8, 0x7000 | PTE_P | PTE_W)
        .unwrap();
    assert_eq!(
        mem.read_pte(f(4) + 8),
        0x7000 | PTE_P | PTE_W | PTE_A | PTE_D
    );
    // PRESERVE_AD keeps the old entry's A/D bits (and the hypervisor still sets A).
    m.update(&mut mem, (f(4) + 8) | 2, 0x8000 | PTE_P).unwrap();
    assert_eq!(mem.read_pte(f(4) + 8), 0x8000 | PTE_P | PTE_A | PTE_D);
    // PRESERVE_AD keeps the old entry's A/D bits (and the hypervisor still sets A).
    m.update(&mut mem, (f(4) + 8) | 2, 0x8000 | PTE_P).unwrap();
    assert_eq!(mem.read_pte(f(4) + 8), 0x8000 | PTE_P | PTE_A | PTE_D);
    // Untyped frames take any value as is.
    m.update(&mut mem, f(9), u64::MAX).unwrap();
    assert_eq!(mem.read_pte(f(9)), u64::MAX);
    // Bad requests.
    assert_eq!(m.update(&mut mem, f(9) + 1, 0), Err(Errno::EINVAL));
    assert_eq!(m.update(&mut mem, f(9) | 4, 0), Err(Errno::EINVAL));
    assert_eq!(m.update(&mut mem, f(9) | 1, 0), Err(Errno::EINVAL));
    assert_eq!(m.update(&mut mem, 0x5000, 0), Err(Errno::EACCES));
    assert_eq!(m.update(&mut mem, 1 << 40, 0), Err(Errno::EFAULT));
}

#[test]
fn data_ranges_map_as_data_only() {
    const REGION: u64 = 0x100_0000;
    let mut mem = Mem::default();
    chain(&mut mem);
    let mut mmu = Mmu::new(layout());
    mmu.pin(&mut mem, 4, f(0)).unwrap();
    let l1e = f(3) + 16;
    let data = REGION | PTE_P | PTE_W | PTE_U;
    // Before the range is added, the frame is outside the domain's memory.
    assert_eq!(mmu.write_entry(&mut mem, l1e, data), Err(Errno::EACCES));
    mmu.add_data_range(REGION, 2 * 4096);
    assert_eq!(mmu.check_entry(1, 0, data), Ok(Target::Ram));
    assert_eq!(mmu.write_entry(&mut mem, l1e, data), Ok((1, 0)));
    assert_eq!(
        mmu.write_entry(&mut mem, l1e + 8, (REGION + 4096) | PTE_P),
        Ok((1, 0))
    );
    // Past its end, and as a table at any level: refused. Never pinnable.
    assert_eq!(
        mmu.write_entry(&mut mem, l1e + 16, (REGION + 8192) | PTE_P),
        Err(Errno::EACCES)
    );
    assert_eq!(mmu.check_entry(2, 0, REGION | PTE_P), Err(Errno::EACCES));
    assert_eq!(
        mmu.write_entry(&mut mem, f(2) + 8, data),
        Err(Errno::EACCES)
    );
    assert_eq!(mmu.pin(&mut mem, 1, REGION), Err(Errno::EINVAL));
    // Removed: new entries are refused; the old ones can still be cleared.
    mmu.remove_data_range(REGION);
    assert_eq!(
        mmu.write_entry(&mut mem, l1e + 16, REGION | PTE_P),
        Err(Errno::EACCES)
    );
    assert_eq!(
        mmu.write_entry(&mut mem, l1e, 0),
        Ok((1, data | PTE_A | PTE_D))
    );
}

#[test]
fn large_pages_take_no_reference_and_their_changes_are_upper_level() {
    let mut mem = Mem::default();
    chain(&mut mem);
    // The L2 (frame 2) maps RAM [2 MiB, 4 MiB) with one 2 MiB page in slot 1.
    mem.write_pte(f(2) + 8, 0x20_0000 | PTE_P | PTE_W | PTE_PS);
    let mut m = Mmu::new(layout());
    m.pin(&mut mem, 4, f(0)).unwrap();
    assert_eq!(m.frame(f(2)).unwrap().level, 2);
    let before = m.frames().to_vec();
    m.take_changes();
    // Replaced by a read-only 2 MiB page of the same RAM: stored with A (no D: not
    // writable), no reference moves, and the change is an upper-level one.
    let (level, old) = m
        .update(&mut mem, f(2) + 8, 0x20_0000 | PTE_P | PTE_PS)
        .unwrap();
    assert_eq!((level, old), (2, 0x20_0000 | PTE_P | PTE_W | PTE_PS));
    assert_eq!(mem.read_pte(f(2) + 8), 0x20_0000 | PTE_P | PTE_PS | PTE_A);
    assert_eq!(m.frames(), &before[..]);
    let c = m.take_changes();
    assert!(c.upper && c.old_l1_targets.is_empty(), "{c:?}");
    // Writable: A and D.
    m.update(&mut mem, f(2) + 8, 0x20_0000 | PTE_P | PTE_W | PTE_PS)
        .unwrap();
    assert_eq!(
        mem.read_pte(f(2) + 8),
        0x20_0000 | PTE_P | PTE_W | PTE_PS | PTE_A | PTE_D
    );
    // An L2 entry is a table or a page, never both: a table there again is fine.
    m.update(&mut mem, f(2) + 8, f(4) | PTE_P | PTE_W).unwrap();
    assert_eq!(m.frame(f(4)).unwrap().level, 1);
    m.unpin(&mut mem, f(0), false).unwrap();
    assert!(m.frames().iter().all(|fr| *fr == FrameInfo::default()));
}
