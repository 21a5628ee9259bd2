//! Fuzzes the PV MMU validator's entry points with arbitrary pins, unpins and
//! `mmu_update` requests, checking its invariants after every step.
#![no_main]

use hv_abi::mmu::MmuUpdate;
use hv_core::mmu::{FlatPool, Layout, Mmu};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

const RAM_FRAMES: u64 = 32;
const POOL_BASE: u64 = RAM_FRAMES * 4096;
const POOL_FRAMES: u64 = 8;

fuzz_target!(|data: &[u8]| {
    let layout = Layout {
        phys_bits: 40,
        ram_frames: RAM_FRAMES,
        pool_base: POOL_BASE,
        pool_frames: POOL_FRAMES,
    };
    let mut mem = FlatPool::new(POOL_BASE, POOL_FRAMES);
    let mut mmu = Mmu::new(layout);
    let mut pinned = Vec::new();
    // Each chunk: 1 opcode byte + 16 bytes of request.
    for chunk in data.chunks(17) {
        let Some((&op, rest)) = chunk.split_first() else {
            break;
        };
        let Ok(req) = MmuUpdate::read_from_bytes(rest) else {
            break;
        };
        // Aim most addresses at the pool so that validation is reached.
        let frame = POOL_BASE + (u64::from(op >> 3) % POOL_FRAMES) * 4096;
        match op & 7 {
            0 => {
                let level = (req.val % 4) as u8 + 1;
                if mmu.pin(&mut mem, level, frame).is_ok() {
                    pinned.push(frame);
                }
            }
            1 => {
                if mmu.unpin(&mut mem, frame, false).is_ok() {
                    pinned.retain(|f| *f != frame);
                }
            }
            2 => {
                let _ = mmu.update(&mut mem, req.ptr, req.val);
            }
            _ => {
                let ptr = frame + (req.ptr % 512) * 8;
                let _ = mmu.update_batch(&mut mem, &[MmuUpdate { ptr, val: req.val }]);
            }
        }
        // Invariant: no page table is mapped writable.
        assert!(mmu
            .frames()
            .iter()
            .all(|f| f.level == 0 || f.writable_maps == 0));
        let _ = mmu.take_changes();
    }
    // Unpinning everything returns every frame to its initial state.
    for f in pinned {
        mmu.unpin(&mut mem, f, false).expect("unpin a pinned table");
    }
    assert!(mmu
        .frames()
        .iter()
        .all(|f| f.level == 0 && f.type_count == 0 && f.writable_maps == 0 && !f.pinned));
});
