//! Host-side cost of validating and applying one page-table entry (goal: <= 25 ns per
//! entry). Each iteration applies a 512-request batch to a pinned L1 table that flips
//! every entry between two RAM frames, so every request really changes the entry.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hv_abi::mmu::{MmuUpdate, PTE_P, PTE_U, PTE_W};
use hv_core::mmu::{FlatPool, Layout, Mmu};

const POOL_BASE: u64 = 64 << 20;

fn batch(l1: u64, frame_base: u64) -> Vec<MmuUpdate> {
    (0..512)
        .map(|i| MmuUpdate {
            ptr: l1 + i * 8,
            val: (frame_base + i * 4096) | PTE_P | PTE_W | PTE_U,
        })
        .collect()
}

fn validate_apply(c: &mut Criterion) {
    let layout = Layout {
        phys_bits: 46,
        ram_frames: (64 << 20) / 4096,
        pool_base: POOL_BASE,
        pool_frames: 16,
    };
    let mut mem = FlatPool::new(POOL_BASE, 16);
    let mut mmu = Mmu::new(layout);
    mmu.pin(&mut mem, 1, POOL_BASE).expect("pin L1");
    let a = batch(POOL_BASE, 0x10_0000);
    let b = batch(POOL_BASE, 0x30_0000);
    let mut group = c.benchmark_group("mmu");
    group.throughput(Throughput::Elements(512));
    let mut flip = false;
    group.bench_function("validate_apply_512", |bench| {
        bench.iter(|| {
            flip = !flip;
            let reqs = if flip { &a } else { &b };
            let (done, r) = mmu.update_batch(&mut mem, reqs);
            assert!(done == 512 && r.is_ok());
            mmu.take_changes()
        })
    });
    group.finish();
}

criterion_group!(benches, validate_apply);
criterion_main!(benches);
