//! Scenario `mmu`: every PV MMU rule through the real hypercall path. Prints one
//! `key=<rc>` line per check (negative errno on refusal) and powers off with 0.

use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use guest_sdk::hv_abi::hypercall::{VcpuContext, VERSION_GET};
use guest_sdk::hv_abi::mmu::{
    MmuUpdate, MmuextOp, MulticallEntry, PTE_A, PTE_ADDR_MASK, PTE_D, PTE_LARGE_ADDR_MASK, PTE_P,
    PTE_PS, PTE_W, UVMF_INVLPG,
};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::{Op, PAGE_SIZE};
use guest_sdk::mmu;
use guest_sdk::{poweroff, println, Error};

fn rc(r: Result<(), Error>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(Error::Errno(e)) => e.to_ret(),
        Err(Error::Unknown(v)) => v,
    }
}

fn upd(ptr: u64, val: u64) -> MmuUpdate {
    MmuUpdate { ptr, val }
}

/// Reads an entry of the (read-only, identity-mapped) page-table pool.
fn read(gpa: u64) -> u64 {
    // SAFETY: pool frames are mapped read-only at their guest-physical address.
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

/// One update, result code only.
fn one(ptr: u64, val: u64) -> i64 {
    // SAFETY: every update here targets frames nothing else uses.
    rc(unsafe { mmu::mmu_update(&[upd(ptr, val)]) }.1)
}

pub fn run(si: &StartInfo) -> ! {
    let root = si.pt_base_gpa;
    let pool_end = si.pt_pool_gpa + si.pt_pool_frames * PAGE_SIZE;
    let free = si.pt_pool_gpa + si.nr_pt_frames * PAGE_SIZE;
    let (f, g) = (free, free + PAGE_SIZE);
    // A RAM page past the kernel, mapped by nobody else in what follows.
    let ram = (si.first_free_gpa + 16 * PAGE_SIZE) & !(PAGE_SIZE - 1);

    println!("pin_root_again={}", rc(mmu::pin_table(4, root)));
    // Frame f is not a page table yet: the write is stored as is.
    println!("untyped_write={}", one(f, ram | PTE_P | PTE_W));
    println!("pin_l1={}", rc(mmu::pin_table(1, f)));
    println!("writable_pt={}", one(f + 8, f | PTE_P | PTE_W));
    println!("readonly_pt={}", one(f + 8, f | PTE_P));
    println!("reserved_bits={}", one(f + 16, ram | PTE_P | (1 << 51)));
    println!("outside={}", one(f + 16, pool_end | PTE_P));
    println!("ram_target={}", one(f + 16, ram | PTE_P | PTE_W));
    let stored = read(f + 16);
    println!(
        "stored_ad={}",
        u8::from(stored & (PTE_A | PTE_D) == PTE_A | PTE_D)
    );
    // Frame g becomes an L2 with a 2 MiB page that is not 2 MiB-aligned in it: pinning
    // validates it and refuses.
    println!(
        "untyped_write2={}",
        one(g, (ram & !0x1F_FFFF) | 0x2000 | PTE_P | PTE_PS)
    );
    println!("huge_page={}", rc(mmu::pin_table(2, g)));
    println!("hv_slot={}", one(root + 256 * 8, g | PTE_P));
    // f is an L1; the root wants an L3 there.
    println!("type_conflict={}", one(root + 8 * 8, f | PTE_P));
    println!("update_in_ram={}", one(ram, 0));
    println!("bad_command={}", one(f | 1, 0));
    // A batch stops at the first failure and reports how many were applied.
    let batch = [
        upd(f + 24, ram | PTE_P),
        upd(f + 32, ram | PTE_P),
        upd(f + 40, f | PTE_P | PTE_W),
        upd(f + 48, ram | PTE_P),
    ];
    // SAFETY: the entries changed belong to frame f, which maps nothing in use.
    let (done, r) = unsafe { mmu::mmu_update(&batch) };
    println!("batch_done={done}");
    println!("batch_rc={}", rc(r));
    println!("batch_not_applied={:#x}", read(f + 48));
    // mmuext_op.
    // SAFETY: g is not pinned, so this only fails.
    println!("baseptr_unpinned={}", rc(unsafe { mmu::new_baseptr(g) }));
    // SAFETY: refused: the root is this vCPU's CR3.
    println!("unpin_in_use={}", rc(unsafe { mmu::unpin_table(root) }));
    let bad = MmuextOp {
        cmd: 99,
        reserved: 0,
        arg1: 0,
        arg2: 0,
    };
    // SAFETY: an unknown command changes nothing.
    println!("mmuext_bad_cmd={}", rc(unsafe { mmu::mmuext(&[bad]) }.1));
    println!("flush={}", rc(mmu::tlb_flush_local()));
    // update_va_mapping on a page the boot tables map: same mapping, with a flush.
    let cur = {
        let mut t = root;
        for shift in [39u32, 30, 21] {
            t = read(t + ((ram >> shift) & 511) * 8) & PTE_ADDR_MASK;
        }
        read(t + ((ram >> 12) & 511) * 8)
    };
    println!(
        "uva={}",
        // SAFETY: the page keeps its mapping.
        rc(unsafe { mmu::update_va_mapping(ram, cur, UVMF_INVLPG) })
    );
    println!(
        "uva_bad_flags={}",
        // SAFETY: refused before anything changes.
        rc(unsafe { mmu::update_va_mapping(ram, cur, 7) })
    );
    println!(
        "uva_hv_range={}",
        // SAFETY: refused: the hypervisor's range.
        rc(unsafe { mmu::update_va_mapping(0xFFFF_8000_0000_0000, 0, 0) })
    );
    // multicall: each entry gets its own result, a failure does not stop the others.
    let bad_req = [upd(f + 56, f | PTE_P | PTE_W)];
    let mut entries = [
        MulticallEntry {
            op: Op::Version as u64,
            result: 0,
            args: [VERSION_GET, 0, 0, 0, 0, 0],
        },
        MulticallEntry {
            op: Op::MmuUpdate as u64,
            result: 0,
            args: [guest_sdk::virt_to_phys(bad_req.as_ptr()), 1, 0, 0, 0, 0],
        },
        MulticallEntry {
            op: Op::Multicall as u64,
            result: 0,
            args: [0; 6],
        },
        MulticallEntry {
            op: Op::Version as u64,
            result: 0,
            args: [VERSION_GET, 0, 0, 0, 0, 1],
        },
        MulticallEntry {
            op: 99,
            result: 0,
            args: [0; 6],
        },
    ];
    // SAFETY: the sub-calls change nothing in use.
    println!("multicall={}", rc(unsafe { mmu::multicall(&mut entries) }));
    for (i, e) in entries.iter().enumerate() {
        println!("mc{i}={}", e.result);
    }
    poweroff(0)
}

fn write_pool(gpa: u64, val: u64) {
    // SAFETY: called with CR0.WP clear: the store reaches the read-only pool memslot and
    // exits to the hypervisor, which validates it (or ends the domain).
    unsafe { core::ptr::write_volatile(gpa as *mut u64, val) }
}

/// Scenario `trapped-write`: direct stores into the pool (CR0.WP clear, so ring 0
/// ignores the read-only mapping) trap and are handled like `mmu_update`.
pub fn trapped_write(si: &StartInfo) -> ! {
    let f = si.pt_pool_gpa + si.nr_pt_frames * PAGE_SIZE;
    let ram = (si.first_free_gpa + 16 * PAGE_SIZE) & !(PAGE_SIZE - 1);
    // SAFETY: only this scenario's stores to the pool are affected by WP.
    unsafe { guest_sdk::arch::write_cr0(guest_sdk::arch::read_cr0() & !guest_sdk::arch::CR0_WP) };
    write_pool(f, ram | PTE_P | PTE_W);
    println!("trapped_untyped={:#x}", read(f));
    println!("pin_l1={}", rc(mmu::pin_table(1, f)));
    write_pool(f + 8, (ram + PAGE_SIZE) | PTE_P);
    println!("trapped_valid={:#x}", read(f + 8));
    println!("about_to_write_bad");
    // A writable mapping of a page table: refused, and the domain ends.
    write_pool(f + 16, f | PTE_P | PTE_W);
    println!("survived_bad_write");
    poweroff(1)
}

/// Scenario `cr3-bypass`: load a copy of the boot L4 that lives in RAM (so it was
/// never registered) straight into CR3; the next exit must end the domain.
pub fn cr3_bypass(si: &StartInfo) -> ! {
    let copy = (si.first_free_gpa + 32 * PAGE_SIZE) & !(PAGE_SIZE - 1);
    for i in 0..512 {
        let e = read(si.pt_base_gpa + i * 8);
        // SAFETY: `copy` is a free RAM page, identity-mapped and writable.
        unsafe { core::ptr::write_volatile((copy + i * 8) as *mut u64, e) };
    }
    println!("loading_copy={copy:#x}");
    // SAFETY: the copy maps exactly what the boot L4 maps, so execution continues.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) copy, options(nostack)) };
    println!("bypassed");
    poweroff(1)
}

// ---------------------------------------------------------------------------------
// unpin-vcpus: which page-table roots the other vCPUs hold (SPEC 8.4, 8.5.4).

static V1_STACK: crate::Stack<16384> = crate::Stack::new();
/// The root vCPU 1 switches to once it runs.
static V1_TARGET: AtomicU64 = AtomicU64::new(0);
/// vCPU 1's CR3 when it started, its `new_baseptr` result and a done flag.
static V1_START_CR3: AtomicU64 = AtomicU64::new(0);
static V1_SWITCH_RC: AtomicI64 = AtomicI64::new(1);
static V1_DONE: AtomicBool = AtomicBool::new(false);

/// vCPU 1: records the root it started on, switches to `V1_TARGET`, then sleeps.
extern "C" fn v1_entry(_arg: u64) -> ! {
    V1_START_CR3.store(
        guest_sdk::arch::read_cr3() & PTE_ADDR_MASK,
        Ordering::Release,
    );
    // SAFETY: the target maps the kernel exactly as the root vCPU 1 started on.
    let r = unsafe { mmu::new_baseptr(V1_TARGET.load(Ordering::Acquire)) };
    V1_SWITCH_RC.store(rc(r), Ordering::Release);
    V1_DONE.store(true, Ordering::Release);
    loop {
        let _ = guest_sdk::sched::block();
    }
}

/// A new L4 in a free pool frame with the same entries as `from`, pinned.
fn copy_root(frames: &mut mmu::PtFrames, from: u64) -> u64 {
    let Some(root) = frames.alloc() else {
        println!("unpin-vcpus: pool exhausted");
        guest_sdk::crash()
    };
    for i in 0..512 {
        let e = read(from + i * 8);
        if e & PTE_P != 0 && one(root + i * 8, e) != 0 {
            println!("unpin-vcpus: copying the root failed");
            guest_sdk::crash()
        }
    }
    if mmu::pin_table(4, root).is_err() {
        println!("unpin-vcpus: pinning a copy of the root failed");
        guest_sdk::crash()
    }
    root
}

fn init_v1(cr3: u64) -> i64 {
    let ctx = VcpuContext {
        rip: v1_entry as *const () as u64,
        rsp: V1_STACK.top() - 8,
        cr3,
        arg: 0,
        reserved: [0; 4],
    };
    rc(guest_sdk::vcpu_initialise(1, &ctx))
}

/// Scenario `unpin-vcpus` (2 vCPUs): a vCPU that is down holds no page table; from
/// `VCPUOP_INITIALISE` on, its context's root is its CR3 and cannot be unpinned.
pub fn unpin_vcpus(si: &StartInfo) -> ! {
    if si.nr_vcpus < 2 {
        println!("unpin-vcpus: needs 2 vCPUs");
        poweroff(3)
    }
    let boot = si.pt_base_gpa;
    let mut frames = mmu::PtFrames::from_start_info(si);
    let a = copy_root(&mut frames, boot);
    // SAFETY: `a` maps exactly what the boot root maps.
    println!("switch_a={}", rc(unsafe { mmu::new_baseptr(a) }));
    // vCPU 1 is down: nothing but vCPU 0 could hold the boot root, and vCPU 0 left it.
    println!(
        "unpin_boot_v1_down={}",
        // SAFETY: no vCPU uses the boot root any more.
        rc(unsafe { mmu::unpin_table(boot) })
    );
    println!("init_unpinned={}", init_v1(boot));
    let b = copy_root(&mut frames, a);
    println!("init_b={}", init_v1(b));
    // SAFETY: refused: b is the initialised vCPU 1's root.
    println!("unpin_initialised={}", rc(unsafe { mmu::unpin_table(b) }));
    println!("reinit_a={}", init_v1(a));
    // SAFETY: b is nobody's root any more.
    println!("unpin_after_reinit={}", rc(unsafe { mmu::unpin_table(b) }));
    let c = copy_root(&mut frames, a);
    V1_TARGET.store(c, Ordering::Release);
    // SAFETY: vCPU 1 starts in `v1_entry` on its own stack, on root `a`, which maps the
    // kernel; it touches only atomics and sleeps.
    println!("up={}", rc(unsafe { guest_sdk::vcpu_up(1) }));
    let mut tries: u32 = 0;
    while !V1_DONE.load(Ordering::Acquire) {
        tries += 1;
        if tries > 2_000_000 {
            println!("unpin-vcpus: timeout waiting for vcpu 1");
            guest_sdk::crash()
        }
        let _ = guest_sdk::sched_yield();
    }
    println!(
        "v1_started_on_a={}",
        u8::from(V1_START_CR3.load(Ordering::Acquire) == a)
    );
    println!("v1_switch={}", V1_SWITCH_RC.load(Ordering::Acquire));
    // SAFETY: refused: c is vCPU 1's CR3 now.
    println!("unpin_other_vcpu={}", rc(unsafe { mmu::unpin_table(c) }));
    // SAFETY: refused: a is still vCPU 0's CR3 (vCPU 1 left it).
    println!("unpin_own={}", rc(unsafe { mmu::unpin_table(a) }));
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// big-ram: 2 MiB pages in the boot tables and through the validator (ABI 1.3).

/// The entry that maps `va` under `root`: its address, value and level (1: 4 KiB page,
/// 2: 2 MiB page); level 0 if `va` is not mapped.
fn walk(root: u64, va: u64) -> (u64, u64, u8) {
    let mut table = root;
    for (shift, level) in [(39u32, 4u8), (30, 3), (21, 2), (12, 1)] {
        let at = table + ((va >> shift) & 511) * 8;
        let e = read(at);
        if e & PTE_P == 0 {
            return (at, e, 0);
        }
        if level == 1 || (level == 2 && e & PTE_PS != 0) {
            return (at, e, level);
        }
        table = e & PTE_ADDR_MASK;
    }
    (0, 0, 0)
}

fn poke(va: u64, v: u64) {
    // SAFETY: `va` is free RAM of this scenario, identity-mapped and writable.
    unsafe { core::ptr::write_volatile(va as *mut u64, v) }
}

/// Scenario `big-ram` (RAM above 4 GiB, not a multiple of 2 MiB): the boot tables map
/// RAM above 4 GiB with 2 MiB pages and a last partial 2 MiB with 4 KiB pages
/// (SPEC 4.5); 2 MiB pages go through the validator like any entry (SPEC 8.5.2).
pub fn big_ram(si: &StartInfo) -> ! {
    const MIB2: u64 = 2 << 20;
    let root = si.pt_base_gpa;
    let ram_end = si.nr_pages * PAGE_SIZE;
    if ram_end <= (6 << 30) + MIB2 || ram_end % MIB2 == 0 {
        println!("big-ram: needs more than 6 GiB of RAM, not a multiple of 2 MiB");
        poweroff(3)
    }
    let (l2_6g, e6, lvl6) = walk(root, 6 << 30);
    println!("boot_6g_level={lvl6}");
    println!("boot_6g_entry={e6:#x}");
    let (_, e4, lvl4) = walk(root, (4 << 30) - PAGE_SIZE);
    println!("boot_below_4g_level={lvl4}");
    println!("boot_below_4g_entry={e4:#x}");
    let last = ram_end - PAGE_SIZE;
    let (_, elast, lvl_last) = walk(root, last);
    println!("boot_last_level={lvl_last}");
    println!("boot_last_entry={elast:#x}");
    // Memory through the 2 MiB pages and the last 4 KiB page.
    let spots = [
        (6 << 30) + 0x12_3450,
        (ram_end & !(MIB2 - 1)) - 8,
        ram_end - 8,
    ];
    for (i, va) in spots.iter().enumerate() {
        poke(*va, 0x5A5A_0000 + i as u64);
    }
    let rw = spots
        .iter()
        .enumerate()
        .all(|(i, va)| read(*va) == 0x5A5A_0000 + i as u64);
    println!("high_rw={}", u8::from(rw));
    // No L1 entry under a 2 MiB page; the last page has one.
    println!(
        "uva_large={}",
        // SAFETY: refused before anything changes.
        rc(unsafe { mmu::update_va_mapping(6 << 30, 0, 0) })
    );
    println!(
        "uva_last={}",
        // SAFETY: the page keeps its mapping.
        rc(unsafe { mmu::update_va_mapping(last, elast, UVMF_INVLPG) })
    );
    // Remap virtual 6 GiB to the 2 MiB of RAM at 4 GiB (an upper-level change, made
    // visible by the hypervisor), read through it, and map it back.
    poke((4 << 30) + 0x100, 0x4444);
    poke((6 << 30) + 0x100, 0x6666);
    println!(
        "remap_large={}",
        one(l2_6g, (e6 & !PTE_LARGE_ADDR_MASK) | (4 << 30))
    );
    println!("remapped_read={:#x}", read((6 << 30) + 0x100));
    println!("remap_back={}", one(l2_6g, e6));
    println!("back_read={:#x}", read((6 << 30) + 0x100));
    // The validator: a new L2 with 2 MiB pages, pinned.
    let mut frames = mmu::PtFrames::from_start_info(si);
    let (Some(f), Some(g)) = (frames.alloc(), frames.alloc()) else {
        println!("big-ram: pool exhausted");
        guest_sdk::crash()
    };
    one(f, (6 << 30) | PTE_P | PTE_W | PTE_PS);
    one(f + 8, (ram_end & !(MIB2 - 1)) | PTE_P | PTE_PS);
    println!("pin_past_ram_end={}", rc(mmu::pin_table(2, f)));
    one(f + 8, 0);
    println!("pin_large={}", rc(mmu::pin_table(2, f)));
    // Into the pinned table: validated, stored with A and D.
    println!(
        "update_large={}",
        one(f + 24, (4 << 30) | PTE_P | PTE_W | PTE_PS)
    );
    println!(
        "large_stored_ad={}",
        u8::from(read(f + 24) & (PTE_A | PTE_D) == PTE_A | PTE_D)
    );
    println!(
        "update_misaligned={}",
        one(f + 16, (4 << 30) | 0x4000 | PTE_P | PTE_PS)
    );
    one(g, (4 << 30) | PTE_P | PTE_PS);
    println!("pin_l3_large={}", rc(mmu::pin_table(3, g)));
    poweroff(0)
}
