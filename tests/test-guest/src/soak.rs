//! `soak seed=N calls=M ring3=0|1`: a hostile guest. M hypercalls with random
//! operations and arguments biased towards the values that find bugs (0, 1, sizes
//! around page and batch limits, all ones, addresses at the edges of RAM, in the
//! page-table pool, the grant window, shared_info, start_info), argument memory
//! filled with random bytes, from ring 0 and then (with `ring3=1`, which needs
//! `--allow-user-hypercalls`) from ring 3. It prints `soak_ring0_calls=`,
//! `soak_ring3_calls=` and powers off with 0 if it survives.
//!
//! What a guest may do to itself is allowed to end it (unmapping its own code with
//! `update_va_mapping`, for example, crashes it); hv must never fail, and the other
//! domains must not notice. Left out, since they would only stop the soak: shutdown
//! with a valid reason and code, `SCHEDOP_BLOCK` and `SCHEDOP_POLL` (sleeping with
//! nothing to wake it), and `VCPUOP_SET_UPCALL_VECTOR` (an upcall to a vector
//! without a gate is a triple fault: the guest's own doing, but the end of the soak).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_sdk::hv_abi::hypercall::{VCPUOP_IS_UP, VCPUOP_SET_UPCALL_VECTOR};
use guest_sdk::hv_abi::layout::{GRANT_TABLE_GPA, SHARED_INFO_GPA, START_INFO_GPA, TSS_GPA};
use guest_sdk::hv_abi::sched::{SCHEDOP_BLOCK, SCHEDOP_POLL, SCHEDOP_SHUTDOWN, SCHEDOP_YIELD};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::user::{self, Idt};
use guest_sdk::{cmdline, poweroff, println, virt_to_phys};

/// The operations the soak draws from (hv's numbers), plus numbers no operation has.
const OPS: [u64; 15] = [
    1,
    13,
    14,
    15,
    17,
    18,
    20,
    24,
    26,
    29,
    32,
    64,
    0,
    99,
    1 << 40,
];

/// Argument memory: structures and arrays the calls point at.
#[repr(C, align(4096))]
struct Scratch(UnsafeCell<[u8; 3 * 4096]>);
// SAFETY: used by one vCPU, from one context at a time (ring 0, then ring 3).
unsafe impl Sync for Scratch {}
static SCRATCH: Scratch = Scratch(UnsafeCell::new([0; 3 * 4096]));

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; 16384]>);
// SAFETY: each stack is used by one context only.
unsafe impl Sync for Stack {}
static R3_STACK: Stack = Stack(UnsafeCell::new([0; 16384]));
static EXC_STACK: Stack = Stack(UnsafeCell::new([0; 16384]));
static IDT: Idt = Idt::new();

/// The generator's state and the facts the value table needs (set before ring 3).
static STATE: AtomicU64 = AtomicU64::new(1);
static RAM_END: AtomicU64 = AtomicU64::new(0);
static POOL: AtomicU64 = AtomicU64::new(0);
static WINDOW: AtomicU64 = AtomicU64::new(0);
static RING3_CALLS: AtomicU64 = AtomicU64::new(0);
static RING3_TARGET: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    // xorshift64*
    let mut x = STATE.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn scratch() -> u64 {
    virt_to_phys(SCRATCH.0.get())
}

/// A biased argument value.
fn value() -> u64 {
    let ram = RAM_END.load(Ordering::Relaxed);
    let pool = POOL.load(Ordering::Relaxed);
    let window = WINDOW.load(Ordering::Relaxed);
    let s = scratch();
    match next() % 24 {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => next() % 16,
        4 => 63 + next() % 3,
        5 => 511 + next() % 3,
        6 => 4095 + next() % 3,
        7 => u64::from(u32::MAX),
        8 => u64::MAX,
        9 => 1 << 63,
        10..=12 => s + ((next() % 4096) & !7),
        13 => s + 4096 * 2 - 8 + next() % 16, // crossing the end of the scratch area
        14 => ram - 8 + next() % 16,          // crossing the end of RAM
        // Entries of the boot L4 other than entry 0 (which maps all of RAM: clearing
        // it would end the soak at once, a test of nothing but the guest).
        15 => pool + 8 + (next() % 64) * 8,
        16 => window + (next() % 8) * 4096,
        17 => SHARED_INFO_GPA + (next() % 512) * 8,
        18 => START_INFO_GPA,
        19 => GRANT_TABLE_GPA + (next() % 64) * 8,
        20 => TSS_GPA,
        21 => next() % 0x8000, // a small port, ref, domid or count
        _ => next(),
    }
}

/// Random bytes into the first 256 bytes of scratch pages 0 and 1 (the argument
/// structures and arrays the calls most often point at). Page 2 is what
/// `update_va_mapping` may remap, so nothing in the guest touches it.
fn scramble() {
    let base = SCRATCH.0.get() as *mut u64;
    for page in 0..2 {
        for i in 0..32 {
            let v = if next() % 4 == 0 { value() } else { next() };
            // SAFETY: inside SCRATCH (3 pages of 512 words); used by this context only.
            unsafe { core::ptr::write_volatile(base.add(page * 512 + i), v) };
        }
    }
}

/// One random hypercall. Returns its result.
fn one_call() -> i64 {
    if next() % 8 == 0 {
        scramble();
    }
    let mut op = OPS[(next() % OPS.len() as u64) as usize];
    let mut a = [value(), value(), value(), value(), value()];
    match op {
        // sched_op: no sleeping, no valid shutdown (see the module doc).
        29 => match a[0] % 4 {
            c if c == SCHEDOP_BLOCK || c == SCHEDOP_POLL => a[0] = SCHEDOP_YIELD,
            c if c == SCHEDOP_SHUTDOWN => {
                a[0] = SCHEDOP_SHUTDOWN;
                a[2] = 100 + a[2] % 1000; // a code over 99: refused for every reason
            }
            c => a[0] = c,
        },
        24 if a[0] == VCPUOP_SET_UPCALL_VECTOR => a[0] = VCPUOP_IS_UP,
        // console_io: short writes, so the neighbours' output stays readable.
        18 => a[1] %= 64,
        13 => a[1] %= 8, // multicall: a few random entries
        // update_va_mapping: addresses the guest does not run on (scratch page 2, the
        // grant window, beyond RAM, hv's range, non-canonical, page 0).
        14 => {
            let s = scratch() + 2 * 4096;
            a[0] = match next() % 7 {
                0 => s,
                1 => s + 1 + next() % 4095,
                2 => WINDOW.load(Ordering::Relaxed) + (next() % 1024) * 4096,
                3 => RAM_END.load(Ordering::Relaxed) + (next() % 16) * 4096,
                4 => 0xFFFF_8000_0000_0000 + (next() % 16) * 4096,
                5 => 1 << 47,
                _ => 0,
            };
        }
        _ => {}
    }
    if op == 0 {
        op = 99;
    }
    // SAFETY: a hostile guest on purpose: every pointer is either into SCRATCH or a
    // value hv must refuse or handle; whatever the call does to this guest's own
    // memory or page tables is this soak's business.
    unsafe { hypercall5_raw(op, a) }
}

/// A hypercall with the operation as a raw number (unknown ones included).
///
/// # Safety
/// As `guest_sdk::hypercall::hypercall5`.
unsafe fn hypercall5_raw(op: u64, a: [u64; 5]) -> i64 {
    let r: i64;
    // SAFETY: the caller's; the transport is `out 0xE8, al` with the operation in RAX.
    unsafe {
        core::arch::asm!(
            "out 0xE8, al",
            inlateout("rax") op => r,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4],
            options(nostack),
        );
    }
    r
}

/// Ring 3: `RING3_TARGET` random calls, then `ud2` back to ring 0.
extern "C" fn soak_user() -> ! {
    let n = RING3_TARGET.load(Ordering::Relaxed);
    for _ in 0..n {
        one_call();
        RING3_CALLS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: raises #UD, which returns to `run_user`'s caller.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) };
}

pub fn soak(si: &StartInfo) -> ! {
    let cmd = si.cmdline_bytes();
    let seed = cmdline::value(cmd, b"seed")
        .and_then(cmdline::parse_u64)
        .unwrap_or(1);
    let calls = cmdline::value(cmd, b"calls")
        .and_then(cmdline::parse_u64)
        .unwrap_or(2000);
    let ring3 = cmdline::value(cmd, b"ring3").and_then(cmdline::parse_u64) == Some(1);
    STATE.store(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        Ordering::Relaxed,
    );
    RAM_END.store(si.nr_pages * 4096, Ordering::Relaxed);
    POOL.store(si.pt_base_gpa, Ordering::Relaxed);
    WINDOW.store(si.grant_window_gpa, Ordering::Relaxed);
    println!("soak seed={seed} calls={calls} ring3={}", u8::from(ring3));
    for i in 0..calls {
        one_call();
        if i % 500 == 499 {
            println!("soak_progress={}", i + 1);
        }
    }
    println!("soak_ring0_calls={calls}");
    if ring3 {
        RING3_TARGET.store(calls, Ordering::Relaxed);
        // SAFETY: this scenario's own IDT and exception stack; ring 3 runs
        // `soak_user` on its own stack, in RAM that the boot tables map for ring 3.
        let exit = unsafe {
            user::install(&IDT, virt_to_phys(EXC_STACK.0.get()) + 16384);
            user::run_user(
                soak_user as *const () as u64,
                virt_to_phys(R3_STACK.0.get()) + 16384 - 8,
            )
        };
        println!(
            "soak_ring3_calls={} soak_ring3_vector={}",
            RING3_CALLS.load(Ordering::Relaxed),
            exit.vector
        );
    }
    println!("soak survived");
    poweroff(0)
}
