//! Property tests: the real PV MMU validator (hv-core) against the reference model
//! (tests::mmu_model), over random sequences of pins, unpins, updates and batches.

use std::collections::{BTreeSet, HashMap};

use hv_abi::mmu::{MmuUpdate, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W};
use hv_abi::Errno;
use hv_core::mmu::{FrameInfo, Layout, Mmu, PtMemory};
use proptest::prelude::*;
use tests::mmu_model::{Model, ModelLayout, PAGE};
use zerocopy::FromBytes;

/// 4 MiB of RAM: room for one 2 MiB page ([2 MiB, 4 MiB)) and one that would reach
/// into the pool (at 4 MiB).
const RAM_FRAMES: u64 = 1024;
const POOL_BASE: u64 = RAM_FRAMES * PAGE;
const POOL_FRAMES: u64 = 8;
const PHYS_BITS: u32 = 40;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Mem(HashMap<u64, u64>);

impl PtMemory for Mem {
    fn read_pte(&self, gpa: u64) -> u64 {
        self.0.get(&gpa).copied().unwrap_or(0)
    }
    fn write_pte(&mut self, gpa: u64, val: u64) {
        self.0.insert(gpa, val);
    }
}

impl Mem {
    fn normalized(&self) -> HashMap<u64, u64> {
        self.0
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

fn pool(i: u64) -> u64 {
    POOL_BASE + i * PAGE
}

#[derive(Clone, Debug)]
enum Op {
    Pin(u8, u64),
    Unpin(u64),
    Update(u64, u64, u64, u64),
    Batch(Vec<(u64, u64, u64)>),
    Raw(u64, u64),
}

fn entry() -> impl Strategy<Value = u64> {
    let target = prop_oneof![
        4 => (0..POOL_FRAMES).prop_map(pool),
        3 => (0..RAM_FRAMES).prop_map(|f| f * PAGE),
        1 => prop_oneof![Just(0u64), Just(2 << 20), Just((2 << 20) + PAGE), Just(3 << 20)],
        1 => Just(1u64 << 39),
        1 => Just(1u64 << 45),
    ];
    let flags = (
        prop::bool::weighted(0.85),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(p, w, u, a, d, ps, hi)| {
            let mut v = 0;
            for (on, bit) in [
                (p, PTE_P),
                (w, PTE_W),
                (u, PTE_U),
                (a, PTE_A),
                (d, PTE_D),
                (ps, PTE_PS),
                (hi, 1 << 52),
            ] {
                if on {
                    v |= bit;
                }
            }
            v
        });
    prop_oneof![
        1 => Just(0u64),
        8 => (target, flags).prop_map(|(t, f)| t | f),
        1 => any::<u64>(),
    ]
}

fn slot() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..3u64, 1 => Just(256u64), 1 => Just(511u64)]
}

fn update() -> impl Strategy<Value = (u64, u64, u64)> {
    (0..POOL_FRAMES, slot(), entry())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..=4u8, 0..POOL_FRAMES).prop_map(|(l, f)| Op::Pin(l, pool(f))),
        1 => (0..POOL_FRAMES).prop_map(|f| Op::Unpin(pool(f))),
        6 => (update(), prop_oneof![8 => Just(0u64), 2 => Just(2u64), 1 => Just(1u64), 1 => Just(4u64)])
            .prop_map(|((f, s, v), cmd)| Op::Update(f, s, v, cmd)),
        2 => prop::collection::vec(update(), 1..6).prop_map(Op::Batch),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(p, v)| Op::Raw(p, v)),
    ]
}

fn agree(real: &Result<(), Errno>, model: &Result<(), BTreeSet<i64>>, what: &Op) {
    match (real, model) {
        (Ok(()), Ok(())) => {}
        (Err(e), Err(codes)) => assert!(
            codes.contains(&e.to_ret()),
            "{what:?}: real error {e}, model allows {codes:?}"
        ),
        _ => panic!("{what:?}: real {real:?}, model {model:?}"),
    }
}

struct World {
    mmu: Mmu,
    mem: Mem,
    model: Model,
}

impl World {
    fn new() -> Self {
        World {
            mmu: Mmu::new(Layout {
                phys_bits: PHYS_BITS,
                ram_frames: RAM_FRAMES,
                pool_base: POOL_BASE,
                pool_frames: POOL_FRAMES,
            }),
            mem: Mem::default(),
            model: Model::new(ModelLayout {
                phys_bits: PHYS_BITS,
                ram_frames: RAM_FRAMES,
                pool_base: POOL_BASE,
                pool_frames: POOL_FRAMES,
            }),
        }
    }

    fn update(&mut self, ptr: u64, val: u64, what: &Op) -> Result<(), Errno> {
        let before = (self.mmu.frames().to_vec(), self.mem.clone());
        let real = self.mmu.update(&mut self.mem, ptr, val).map(|_| ());
        let model = self.model.update(ptr, val);
        agree(&real, &model, what);
        if real.is_err() {
            assert_eq!(
                (self.mmu.frames().to_vec(), self.mem.clone()),
                before,
                "{what:?}: a rejected update changed state"
            );
        }
        real
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Pin(level, f) => {
                let before = (self.mmu.frames().to_vec(), self.mem.clone());
                let real = self.mmu.pin(&mut self.mem, *level, *f);
                agree(&real, &self.model.pin(*level, *f), op);
                if real.is_err() {
                    assert_eq!(
                        (self.mmu.frames().to_vec(), self.mem.clone()),
                        before,
                        "{op:?}: rejected pin changed state"
                    );
                }
            }
            Op::Unpin(f) => {
                let real = self.mmu.unpin(&mut self.mem, *f, false);
                agree(&real, &self.model.unpin(*f), op);
            }
            Op::Update(f, s, v, cmd) => {
                let _ = self.update((pool(*f) + s * 8) | cmd, *v, op);
            }
            Op::Raw(p, v) => {
                let _ = self.update(*p, *v, op);
            }
            Op::Batch(reqs) => {
                let reqs: Vec<MmuUpdate> = reqs
                    .iter()
                    .map(|(f, s, v)| MmuUpdate {
                        ptr: pool(*f) + s * 8,
                        val: *v,
                    })
                    .collect();
                // The batch entry point ...
                let mut batch_mmu = self.mmu.clone();
                let mut batch_mem = self.mem.clone();
                let (done, res) = batch_mmu.update_batch(&mut batch_mem, &reqs);
                // ... gives the same result and state as the requests one by one, each of
                // which the model agrees with.
                let mut one_done = 0;
                let mut one_res = Ok(());
                for r in &reqs {
                    match self.update(r.ptr, r.val, op) {
                        Ok(()) => one_done += 1,
                        Err(e) => {
                            one_res = Err(e);
                            break;
                        }
                    }
                }
                assert_eq!((done, res), (one_done, one_res), "{op:?}");
                assert_eq!(batch_mmu.frames(), self.mmu.frames());
                assert_eq!(batch_mem, self.mem);
            }
        }
        self.check_invariants(op);
    }

    fn check_invariants(&self, op: &Op) {
        let walk = self.model.walk();
        assert!(
            walk.errors.is_empty(),
            "after {op:?}: the model accepted an inconsistent state"
        );
        assert_eq!(
            self.mem.normalized(),
            {
                let m: HashMap<u64, u64> = self
                    .model
                    .mem
                    .iter()
                    .filter(|(_, v)| **v != 0)
                    .map(|(k, v)| (*k, *v))
                    .collect();
                m
            },
            "after {op:?}: memory differs from the model"
        );
        for i in 0..POOL_FRAMES {
            let f = pool(i);
            let real = self.mmu.frame(f).unwrap();
            let level = walk.levels.get(&f).map_or(0, |l| *l.iter().next().unwrap());
            assert_eq!(real.level, level, "after {op:?}: level of frame {i}");
            // Type counts equal the real number of references.
            assert_eq!(
                real.type_count,
                walk.table_refs.get(&f).copied().unwrap_or(0),
                "after {op:?}: type count of frame {i}"
            );
            assert_eq!(
                real.writable_maps,
                walk.writable_maps.get(&f).copied().unwrap_or(0),
                "after {op:?}: writable maps of frame {i}"
            );
            assert_eq!(real.pinned, self.model.pins.contains_key(&f));
            // No writable mapping of a page-table frame.
            assert!(
                !(real.level > 0 && real.writable_maps > 0),
                "after {op:?}: frame {i} is a table mapped writable"
            );
        }
        // Every present entry of every page table maps an allowed frame.
        let layout = *self.mmu.layout();
        for i in 0..POOL_FRAMES {
            let fr = self.mmu.frame(pool(i)).unwrap();
            if fr.level == 0 {
                continue;
            }
            for s in 0..512 {
                let v = self.mem.read_pte(pool(i) + s * 8);
                assert!(
                    layout
                        .check_entry(fr.level, hv_core::conv::usize_from(s), v)
                        .is_ok(),
                    "after {op:?}: bad entry {v:#x} in L{} frame {i}",
                    fr.level
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn validator_agrees_with_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op);
        }
        // Unpinning everything returns every count to zero.
        let pins: Vec<u64> = w.model.pins.keys().copied().collect();
        for f in pins {
            w.mmu.unpin(&mut w.mem, f, false).unwrap();
        }
        prop_assert!(w.mmu.frames().iter().all(|f| f.level == 0 && f.type_count == 0 && !f.pinned));
        // Writable mappings live only in validated L1 tables, so none are counted either.
        prop_assert!(w.mmu.frames().iter().all(|f| *f == FrameInfo::default()));
    }

    #[test]
    fn arbitrary_bytes_as_requests_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), pins in prop::collection::vec((1..=4u8, 0..POOL_FRAMES), 0..4)) {
        let mut w = World::new();
        for (l, f) in pins {
            let _ = w.mmu.pin(&mut w.mem, l, pool(f));
        }
        let n = bytes.len() / 16;
        let reqs = <[MmuUpdate]>::ref_from_bytes(&bytes[..n * 16]).map(|r| r.to_vec()).unwrap_or_else(|_| {
            bytes[..n * 16].chunks(16).map(|c| MmuUpdate::read_from_bytes(c).unwrap()).collect()
        });
        let (done, res) = w.mmu.update_batch(&mut w.mem, &reqs);
        prop_assert!(done as usize <= reqs.len());
        prop_assert_eq!(res.is_ok(), done as usize == reqs.len());
    }
}
