//! Guest kernel for hv's integration tests.
//!
//! The command line selects one scenario, `scenario=NAME`; each prints `key=value`
//! lines (values in decimal unless noted `0x`) that the host tests assert on, then
//! powers off with code 0 unless stated otherwise:
//!
//! | scenario | output / effect |
//! | --- | --- |
//! | `hello` | `test-guest: hello` |
//! | `exit` | powers off with `code=N` (N > 99 is refused by hv: crash) |
//! | `idle` | `idle: ready`, then sleeps in `SCHEDOP_BLOCK` until the host stops the domain |
//! | `panic` | panics with `boom`: `panic: boom at <file>:<line>`, crash |
//! | `triple-fault` | IDT limit 0, `ud2`: triple fault |
//! | `bad-port` | `out 0x80, al`: hv crashes the domain |
//! | `bad-port-in` | `in al, 0xE8`: hv crashes the domain |
//! | `mmio-write` | clears CR0.WP, writes the read-only page-table pool: hv crashes the domain |
//! | `console-efault` | `efault_past_end=`, `efault_overflow=`, `efault_cross=`, `too_long=`, `zero_len=` |
//! | `cpl3` | `cpl3_version=` (the version hypercall made from ring 3); `cpl3_version=gp` (after `fault=13`, crash) if the CPU faulted the ring-3 `out` |
//! | `hypercalls` | `unknown_op=`, `version_bad_cmd=`, `sched_bad_cmd=`, `shutdown_bad_reason=`, `shutdown_bad_code=`, `yield=`, `version=0x..`, `features=0x..` |
//! | `shutdown-codes` | `direct_<reason>_<code>=`, `mc_<reason>_<code>=`, `multicall_ok=`, `alive=1`: shutdowns with codes over 99, all refused (see `shutdown_codes.rs`) |
//! | `cpuid` | `cpuid_sig=`, `cpuid_max_leaf=0x..`, `cpuid_version=0x..`, `cpuid_features=0x..`, `cpuid_port=0x..` |
//! | `vcpus` | `vcpu1 arg=42` (from vCPU 1), `vcpu1_is_up=`, `vcpu_up_again=`, `vcpu_bad=`, `vcpus ok` |
//! | `cmdline` | `cmdline=<the whole command line>` |
//! | `big-ram` | (RAM > 6 GiB, not a multiple of 2 MiB) 2 MiB pages at boot and through the validator: `boot_6g_level=`, `high_rw=`, `pin_large=`, ... (see `mmu.rs`) |
//! | `unpin-vcpus` | (2 vCPUs) which roots vCPUs hold: `unpin_boot_v1_down=`, `init_unpinned=`, `unpin_initialised=`, ... (see `mmu.rs`) |
//! | `emu-blk`, `emu-errors`, `uart`, `pt`, `pt-spin`, `pt-fill` | emulated devices and passthrough (see `emu.rs`) |
//! | `blk`, `blk-overflow`, `blk-flush`, `blk-idle`, `pvcons` | PV block and PV console back-ends (see `blk.rs`) |
//! | `soak` | `seed=N calls=M ring3=0\|1`: random hypercalls with biased arguments (see `soak.rs`) |
//! | anything else | `unknown scenario`, exit code 3 |
//!
//! A scenario meant to end the domain from the host side that comes back prints
//! `<scenario>: survived` and exits with code 1.
#![no_std]
#![no_main]

mod blk;
mod emu;
mod evtchn;
mod grant;
mod mmu;
mod shutdown_codes;
mod soak;

use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_sdk::arch::{self, DescriptorTablePointer, IdtEntry};
use guest_sdk::console::Console;
use guest_sdk::hv_abi::hypercall::{
    VcpuContext, CONSOLEIO_WRITE, CONSOLE_WRITE_MAX, HYPERCALL_PORT, VCPUOP_IS_UP, VCPUOP_UP,
    VERSION_FEATURES, VERSION_GET,
};
use guest_sdk::hv_abi::sched::{
    SCHEDOP_BLOCK, SCHEDOP_SHUTDOWN, SCHEDOP_YIELD, SHUTDOWN_CRASH, SHUTDOWN_POWEROFF,
};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::{Op, PAGE_SIZE};
use guest_sdk::hypercall::hypercall3;
use guest_sdk::{cmdline, cpuid, poweroff, println, shutdown, Features};

guest_sdk::entry!(main, Features::CONSOLE_IO | Features::SCHED);
guest_sdk::panic_handler!();

fn main(si: &'static StartInfo) -> ! {
    let cmd = si.cmdline_bytes();
    match cmdline::value(cmd, b"scenario").unwrap_or(b"") {
        b"hello" => {
            println!("test-guest: hello");
            poweroff(0)
        }
        b"exit" => exit(cmd),
        b"idle" => {
            println!("idle: ready");
            idle()
        }
        b"panic" => panic!("boom"),
        b"triple-fault" => triple_fault(),
        b"bad-port" => bad_port(),
        b"bad-port-in" => bad_port_in(),
        b"mmio-write" => mmio_write(si),
        b"console-efault" => console_efault(si),
        b"cpl3" => cpl3(),
        b"hypercalls" => hypercalls(),
        b"shutdown-codes" => shutdown_codes::run(),
        b"cpuid" => cpuid_leaves(),
        b"vcpus" => vcpus(si),
        b"evtchn-local" => evtchn::local(si),
        b"evtchn-ping" => evtchn::ping_pong(si, true),
        b"evtchn-pong" => evtchn::ping_pong(si, false),
        b"evtchn-hostile" => evtchn::hostile(si),
        b"evtchn-die" => evtchn::die(si),
        b"evtchn-smp" => evtchn::smp(si),
        b"evtchn-timer-race" => evtchn::timer_race(si),
        b"grant-a" => grant::granter(si),
        b"grant-b" => grant::mapper(si),
        b"grant-die-a" => grant::dying_granter(si),
        b"grant-die-b" => grant::survivor(si),
        b"mmu" => mmu::run(si),
        b"trapped-write" => mmu::trapped_write(si),
        b"ring3-remap" => ring3_remap(si, 0),
        b"ring3-remap-l2" => ring3_remap(si, 1),
        b"cr3-bypass" => mmu::cr3_bypass(si),
        b"unpin-vcpus" => mmu::unpin_vcpus(si),
        b"big-ram" => mmu::big_ram(si),
        b"blk" => blk::blk(si),
        b"blk-overflow" => blk::overflow(si),
        b"blk-flush" => blk::flush(si),
        b"blk-idle" => blk::idle(si),
        b"pvcons" => blk::pvcons(si),
        b"emu-blk" => emu::emu_blk(si),
        b"emu-errors" => emu::emu_errors(si),
        b"uart" => emu::uart(),
        b"pt" => emu::pt(si),
        b"pt-spin" => emu::pt_spin(si),
        b"pt-fill" => emu::pt_fill(si),
        b"soak" => soak::soak(si),
        b"cmdline" => {
            let mut c = Console::new();
            c.write_bytes(b"cmdline=");
            c.write_bytes(cmd);
            c.write_bytes(b"\n");
            drop(c);
            poweroff(0)
        }
        _ => {
            println!("unknown scenario");
            poweroff(3)
        }
    }
}

/// Sleeps in `SCHEDOP_BLOCK` until the host stops the domain (the scenarios that use it
/// unmask no event channel, so nothing sets `upcall_pending`; a return only loops).
pub fn idle() -> ! {
    loop {
        let _ = no_pointer_call(Op::SchedOp, SCHEDOP_BLOCK, 0, 0);
    }
}

/// For scenarios the host should have ended: report and fail.
fn survived(name: &str) -> ! {
    println!("{name}: survived");
    poweroff(1)
}

/// `scenario=exit code=N`: power off with code N, passed to hv as is.
fn exit(cmd: &[u8]) -> ! {
    match cmdline::value(cmd, b"code").and_then(cmdline::parse_u64) {
        Some(code) => shutdown(SHUTDOWN_POWEROFF, code),
        None => {
            println!("exit: missing or bad code=");
            shutdown(SHUTDOWN_CRASH, 0)
        }
    }
}

fn triple_fault() -> ! {
    println!("triple-fault: ud2 with an empty IDT");
    let empty = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately makes every exception undeliverable, then raises one: the
    // CPU escalates #UD -> #GP -> #DF -> triple fault, which ends the domain.
    unsafe {
        arch::load_idt(&empty);
        core::arch::asm!("ud2", options(nomem, nostack));
    }
    survived("triple-fault")
}

fn bad_port() -> ! {
    // SAFETY: port 0x80 is not an hv port: the hypervisor ends the domain.
    unsafe { arch::outb(0x80, 0) };
    survived("bad-port")
}

fn bad_port_in() -> ! {
    // SAFETY: an IN from the hypercall port is not a hypercall: the hypervisor ends the
    // domain.
    unsafe { arch::inb(HYPERCALL_PORT) };
    survived("bad-port-in")
}

fn mmio_write(si: &StartInfo) -> ! {
    // SAFETY: with CR0.WP clear, ring 0 ignores the read-only mapping of the page-table
    // pool; the pool is a read-only memslot, so the write exits to the hypervisor,
    // which ends the domain. Nothing in this kernel reads the pool.
    unsafe {
        arch::write_cr0(arch::read_cr0() & !arch::CR0_WP);
        core::ptr::write_volatile(si.pt_pool_gpa as *mut u64, 0xdead_beef);
    }
    survived("mmio-write")
}

/// A zeroed, readable buffer of more than `CONSOLE_WRITE_MAX` bytes (in `.bss`).
struct Zeroes(UnsafeCell<[u8; CONSOLE_WRITE_MAX as usize + 8]>);
// SAFETY: nothing ever writes the buffer; only its address is used.
unsafe impl Sync for Zeroes {}
static ZEROES: Zeroes = Zeroes(UnsafeCell::new([0; CONSOLE_WRITE_MAX as usize + 8]));

/// `console_io(CONSOLEIO_WRITE, len, gpa)` through the raw primitive.
fn raw_console_write(len: u64, gpa: u64) -> i64 {
    // SAFETY: the hypervisor only reads guest memory for CONSOLEIO_WRITE (and must
    // refuse bad ranges, which is what is being tested).
    unsafe { hypercall3(Op::ConsoleIo, CONSOLEIO_WRITE, len, gpa) }
}

fn console_efault(si: &StartInfo) -> ! {
    let ram_end = si.nr_pages.wrapping_mul(PAGE_SIZE);
    let valid = guest_sdk::virt_to_phys(ZEROES.0.get());
    let past_end = raw_console_write(16, ram_end);
    let overflow = raw_console_write(16, u64::MAX - 7);
    let cross = raw_console_write(16, ram_end.wrapping_sub(8));
    let too_long = raw_console_write(CONSOLE_WRITE_MAX + 1, valid);
    let zero_len = raw_console_write(0, valid);
    println!("efault_past_end={past_end}");
    println!("efault_overflow={overflow}");
    println!("efault_cross={cross}");
    println!("too_long={too_long}");
    println!("zero_len={zero_len}");
    poweroff(0)
}

/// A raw hypercall whose arguments are no pointers: `hypercalls` uses it for calls the
/// hypervisor must refuse without effect (shutdowns with a bad reason or code included)
/// and for harmless ones.
fn no_pointer_call(op: impl guest_sdk::hypercall::OpNumber, a1: u64, a2: u64, a3: u64) -> i64 {
    // SAFETY: no argument is a pointer, so the hypervisor touches no guest memory; the
    // calls made through this either change nothing or are refused.
    unsafe { hypercall3(op, a1, a2, a3) }
}

fn hypercalls() -> ! {
    let unknown_op = no_pointer_call(99u64, 0, 0, 0);
    let version_bad_cmd = no_pointer_call(Op::Version, 77, 0, 0);
    let sched_bad_cmd = no_pointer_call(Op::SchedOp, 77, 0, 0);
    let bad_reason = no_pointer_call(Op::SchedOp, SCHEDOP_SHUTDOWN, 7, 0);
    let bad_code = no_pointer_call(Op::SchedOp, SCHEDOP_SHUTDOWN, SHUTDOWN_POWEROFF, 1000);
    let yield_rc = no_pointer_call(Op::SchedOp, SCHEDOP_YIELD, 0, 0);
    let version = no_pointer_call(Op::Version, VERSION_GET, 0, 0);
    let features = no_pointer_call(Op::Version, VERSION_FEATURES, 0, 0);
    println!("unknown_op={unknown_op}");
    println!("version_bad_cmd={version_bad_cmd}");
    println!("sched_bad_cmd={sched_bad_cmd}");
    println!("shutdown_bad_reason={bad_reason}");
    println!("shutdown_bad_code={bad_code}");
    println!("yield={yield_rc}");
    println!("version={version:#x}");
    println!("features={features:#x}");
    poweroff(0)
}

fn cpuid_leaves() -> ! {
    let (sig, max_leaf) = cpuid::signature();
    let v = cpuid::cpuid(guest_sdk::hv_abi::cpuid::LEAF_VERSION);
    let features = v.ebx as u64 | (v.ecx as u64) << 32;
    let mut c = Console::new();
    c.write_bytes(b"cpuid_sig=");
    c.write_bytes(&sig);
    c.write_bytes(b"\n");
    drop(c);
    println!("cpuid_max_leaf={max_leaf:#x}");
    println!("cpuid_version={:#x}", v.eax);
    println!("cpuid_features={features:#x}");
    println!("cpuid_port={:#x}", v.edx);
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// cpl3: a hypercall from ring 3, reported through an exception (`ud2`).

/// The IDT (only written by `cpl3` on vCPU 0 before it is loaded).
#[repr(C, align(16))]
struct Idt(UnsafeCell<[IdtEntry; 256]>);
// SAFETY: written once by vCPU 0 before `lidt`, read only by the CPU afterwards.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([IdtEntry::MISSING; 256]));

/// A 16-byte-aligned stack.
#[repr(C, align(16))]
struct Stack<const N: usize>(UnsafeCell<[u8; N]>);
// SAFETY: each stack is handed to exactly one execution context (ring 3 or vCPU 1).
unsafe impl<const N: usize> Sync for Stack<N> {}
impl<const N: usize> Stack<N> {
    const fn new() -> Self {
        Stack(UnsafeCell::new([0; N]))
    }
    /// One past the highest byte (16-byte aligned).
    fn top(&self) -> u64 {
        guest_sdk::virt_to_phys(self.0.get()) + N as u64
    }
}

static USER_STACK: Stack<4096> = Stack::new();

extern "C" {
    /// Ring-3 code: the version hypercall, result stored in `CPL3_RESULT`, `ud2`.
    fn tg_user_entry();
    /// The ring-3 hypercall instruction inside `tg_user_entry`.
    fn tg_user_out();
    /// The `ud2` through which ring 3 reports, after storing into `CPL3_RESULT`.
    fn tg_user_report();
    /// Ring-3 code: reads the u64 at `R3_ADDR` into `R3_VALUE`, then `ud2`.
    fn tg_r3_read();
    /// The `ud2` of `tg_r3_read`.
    fn tg_r3_read_ud();
    /// #UD gate: calls `fault_handler(6, rip, 0, cr2, cs, rflags)`.
    fn tg_ud_stub();
    /// #GP gate: calls `fault_handler(13, rip, error, cr2, cs, rflags)`.
    fn tg_gp_stub();
    /// #PF gate: calls `fault_handler(14, rip, error, cr2, cs, rflags)`.
    fn tg_pf_stub();
}

core::arch::global_asm!(
    ".pushsection .text.tg_stubs, \"ax\"",
    // Ring 3: the boot TSS I/O bitmap lets `out` reach the hypervisor, which decides.
    ".global tg_user_entry",
    "tg_user_entry:",
    "    mov eax, {op_version}",
    "    xor edi, edi",
    ".global tg_user_out",
    "tg_user_out:",
    "    out {port}, al",
    // Report through #UD: `int n` from ring 3 is not delivered on every KVM (PVM
    // answers it with #UD), an exception is. The handler recognises this RIP.
    "    mov [rip + {result}], rax",
    ".global tg_user_report",
    "tg_user_report:",
    "    ud2",
    "2:  pause",
    "    jmp 2b",
    // Ring 3: read the u64 at the address in R3_ADDR, store it in R3_VALUE, report.
    ".global tg_r3_read",
    "tg_r3_read:",
    "    mov rax, [rip + {r3_addr}]",
    "    mov rax, [rax]",
    "    mov [rip + {r3_value}], rax",
    ".global tg_r3_read_ud",
    "tg_r3_read_ud:",
    "    ud2",
    "4:  pause",
    "    jmp 4b",
    // Ring 0 gates. The handler never returns, so the frame is simply abandoned.
    ".global tg_ud_stub",
    "tg_ud_stub:",
    "    push 0",
    "    mov edi, 6",
    "    jmp 3f",
    ".global tg_gp_stub",
    "tg_gp_stub:",
    "    mov edi, 13",
    "    jmp 3f",
    ".global tg_pf_stub",
    "tg_pf_stub:",
    "    mov edi, 14",
    // Frame: error code, RIP, CS, RFLAGS, RSP, SS.
    "3:  mov rdx, [rsp]",
    "    mov rsi, [rsp + 8]",
    "    mov rcx, cr2",
    "    mov r8, [rsp + 16]",
    "    mov r9, [rsp + 24]",
    "    and rsp, -16",
    "    call {fault}",
    "    ud2",
    ".popsection",
    op_version = const Op::Version as u64,
    port = const HYPERCALL_PORT,
    result = sym CPL3_RESULT,
    r3_addr = sym R3_ADDR,
    r3_value = sym R3_VALUE,
    fault = sym fault_handler,
);

/// The result of the ring-3 hypercall, stored by ring 3 (the boot mapping is
/// user-accessible) before it reports through `ud2`.
static CPL3_RESULT: AtomicU64 = AtomicU64::new(0);

/// An exception: the `ud2` by which ring 3 reports (print the result, power off), or
/// an unexpected fault (report it and crash).
extern "C" fn fault_handler(
    vector: u64,
    rip: u64,
    error: u64,
    cr2: u64,
    cs: u64,
    rflags: u64,
) -> ! {
    if vector == 6 && cs & 3 == 3 && rip == tg_r3_read_ud as *const () as u64 {
        ring3_remap_next()
    }
    if vector == 6 && cs & 3 == 3 && rip == tg_user_report as *const () as u64 {
        let value = CPL3_RESULT.load(Ordering::SeqCst);
        println!("cpl3_version={}", value as i64);
        poweroff(0)
    }
    println!("fault={vector}");
    let user_out = tg_user_out as *const () as u64;
    if vector == 13 && cs & 3 == 3 && rip == user_out {
        // The CPU refused `out` at CPL 3 although ring 3 runs with IOPL 3 and the boot
        // TSS's I/O bitmap allows the hypercall port: the hypercall never reached hv.
        println!("cpl3_version=gp");
    }
    println!(
        "fault_rip={rip:#x} fault_error={error:#x} fault_cr2={cr2:#x} fault_cs={cs:#x} \
         fault_rflags={rflags:#x}"
    );
    guest_sdk::crash()
}

/// Loads the test IDT: #UD, #GP and #PF gates into `fault_handler`.
fn load_test_idt() {
    let table = IDT.0.get();
    // SAFETY: the IDT is written before it is loaded, and only by this function.
    unsafe {
        let t = &mut *table;
        t[6] = IdtEntry::interrupt_gate(tg_ud_stub as *const () as u64, 0);
        t[13] = IdtEntry::interrupt_gate(tg_gp_stub as *const () as u64, 0);
        t[14] = IdtEntry::interrupt_gate(tg_pf_stub as *const () as u64, 0);
    }
    let idtr = DescriptorTablePointer {
        limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16,
        base: guest_sdk::virt_to_phys(table),
    };
    // SAFETY: the table is static and its gates point at the stubs above.
    unsafe { arch::load_idt(&idtr) };
}

// ---------------------------------------------------------------------------------
// ring3-remap: ring 3 reads a page, ring 0 remaps it with update_va_mapping, ring 3
// must read the new frame (page-table coherence, SPEC 8.5.7).

/// The virtual address ring 3 reads.
static R3_ADDR: AtomicU64 = AtomicU64::new(0);
/// What ring 3 read last.
static R3_VALUE: AtomicU64 = AtomicU64::new(0);
/// The frame the address is remapped to.
static R3_NEW_FRAME: AtomicU64 = AtomicU64::new(0);
/// How many ring-3 reads have been reported.
static R3_STAGE: AtomicU64 = AtomicU64::new(0);
/// 0: remap with update_va_mapping; 1: swap the L2 entry for a new L1 table.
static R3_MODE: AtomicU64 = AtomicU64::new(0);
/// A free page-table pool frame (mode 1).
static R3_FREE_FRAME: AtomicU64 = AtomicU64::new(0);

/// Mode 1: copy the L1 table that maps `x` into a free pool frame with `x` now mapping
/// `b`, then point the L2 entry at the copy (an upper-level change).
fn swap_l2(x: u64, b: u64) -> bool {
    use guest_sdk::hv_abi::mmu::{MmuUpdate, PTE_ADDR_MASK};
    let rd = |gpa: u64| {
        // SAFETY: page tables are readable (pool mapped read-only, identity).
        unsafe { core::ptr::read_volatile(gpa as *const u64) }
    };
    let mut table = arch::read_cr3() & PTE_ADDR_MASK;
    for shift in [39u32, 30] {
        table = rd(table + ((x >> shift) & 511) * 8) & PTE_ADDR_MASK;
    }
    let l2e = table + ((x >> 21) & 511) * 8;
    let l1 = rd(l2e) & PTE_ADDR_MASK;
    let f = R3_FREE_FRAME.load(Ordering::SeqCst);
    let mut reqs = [MmuUpdate::default(); 512];
    for (i, r) in reqs.iter_mut().enumerate() {
        *r = MmuUpdate {
            ptr: f + i as u64 * 8,
            val: rd(l1 + i as u64 * 8),
        };
    }
    let i = ((x >> 12) & 511) as usize;
    reqs[i].val = b | (reqs[i].val & 0xFFF);
    // SAFETY: the copy maps what the old L1 mapped, except x, which only ring 3 uses.
    unsafe {
        guest_sdk::mmu::mmu_update(&reqs).1.is_ok()
            && guest_sdk::mmu::mmu_update(&[MmuUpdate {
                ptr: l2e,
                val: f | (rd(l2e) & 0xFFF),
            }])
            .1
            .is_ok()
    }
}

fn enter_ring3_read() -> ! {
    // SAFETY: `tg_r3_read` is user-accessible code (boot identity map, U set) that only
    // reads R3_ADDR's target and reports through #UD, whose gate is loaded.
    unsafe {
        arch::enter_user(
            tg_r3_read as *const () as u64,
            USER_STACK.top(),
            arch::RFLAGS_RESERVED,
        )
    }
}

fn ring3_remap(si: &StartInfo, mode: u64) -> ! {
    R3_MODE.store(mode, Ordering::SeqCst);
    R3_FREE_FRAME.store(
        si.pt_pool_gpa + si.nr_pt_frames * PAGE_SIZE,
        Ordering::SeqCst,
    );
    let x = (si.first_free_gpa + 48 * PAGE_SIZE) & !(PAGE_SIZE - 1);
    let b = x + PAGE_SIZE;
    // SAFETY: two free RAM pages, identity-mapped and writable.
    unsafe {
        core::ptr::write_volatile(x as *mut u64, 0xAAAA_0001);
        core::ptr::write_volatile(b as *mut u64, 0xBBBB_0002);
    }
    R3_ADDR.store(x, Ordering::SeqCst);
    R3_NEW_FRAME.store(b, Ordering::SeqCst);
    if mode == 1 && si.nr_vcpus >= 2 {
        // vCPU 1 keeps running in the guest while vCPU 0 changes an upper-level entry:
        // the hypervisor must pause it around the memslot zap.
        start_vcpu1();
        println!("vcpu1 spinning");
    }
    load_test_idt();
    enter_ring3_read()
}

/// Called (in ring 0, from the #UD handler) after each ring-3 read.
fn ring3_remap_next() -> ! {
    use guest_sdk::hv_abi::mmu::{PTE_P, PTE_U, PTE_W, UVMF_INVLPG};
    let stage = R3_STAGE.fetch_add(1, Ordering::SeqCst);
    let value = R3_VALUE.load(Ordering::SeqCst);
    if stage == 0 {
        println!("r3_before={value:#x}");
        let x = R3_ADDR.load(Ordering::SeqCst);
        let b = R3_NEW_FRAME.load(Ordering::SeqCst);
        let ok = if R3_MODE.load(Ordering::SeqCst) == 1 {
            swap_l2(x, b)
        } else {
            let val = b | PTE_P | PTE_W | PTE_U;
            // SAFETY: only ring 3 uses this page, and it is stopped.
            unsafe { guest_sdk::mmu::update_va_mapping(x, val, UVMF_INVLPG) }.is_ok()
        };
        println!("remap_ok={}", u8::from(ok));
        enter_ring3_read()
    }
    println!("r3_after={value:#x}");
    poweroff(0)
}

fn cpl3() -> ! {
    load_test_idt();
    // Ring 3 runs `tg_user_entry` (identity-mapped, user-accessible RAM) on its own
    // stack; the TSS's rsp0 (top of the boot stack) takes the exception, overwriting
    // this function's frame, which is never returned to.
    // SAFETY: the gates lead to handlers that never return; see above for the stacks.
    unsafe {
        arch::enter_user(
            tg_user_entry as *const () as u64,
            USER_STACK.top(),
            arch::RFLAGS_RESERVED | arch::RFLAGS_IOPL3,
        )
    }
}

// ---------------------------------------------------------------------------------
// vcpus: start vCPU 1 and hear from it.

static VCPU1_STACK: Stack<16384> = Stack::new();
/// Set by vCPU 1 to its start argument.
static VCPU1_FLAG: AtomicU64 = AtomicU64::new(0);

/// vCPU 1's entry point (RDI = the context's `arg`).
extern "C" fn vcpu1_entry(arg: u64) -> ! {
    println!("vcpu1 arg={arg}");
    VCPU1_FLAG.store(arg, Ordering::Release);
    loop {
        spin_loop();
    }
}

/// `vcpu_op(cmd, vcpu)` through the raw primitive.
fn raw_vcpu_op(cmd: u64, vcpu: u64) -> i64 {
    // SAFETY: UP of an uninitialised, missing or running vCPU must be refused; IS_UP
    // has no effect.
    unsafe { hypercall3(Op::VcpuOp, cmd, vcpu, 0) }
}

fn vcpus(si: &StartInfo) -> ! {
    if si.nr_vcpus < 2 || !Features(si.features).contains(Features::VCPU_OP) {
        println!(
            "vcpus: skipped (nr_vcpus={}, features={:#x})",
            si.nr_vcpus, si.features
        );
        poweroff(0)
    }
    start_vcpu1();
    println!("vcpu1_is_up={}", raw_vcpu_op(VCPUOP_IS_UP, 1));
    println!("vcpu_up_again={}", raw_vcpu_op(VCPUOP_UP, 1));
    println!("vcpu_bad={}", raw_vcpu_op(VCPUOP_UP, 99));
    println!("vcpus ok");
    poweroff(0)
}

/// Starts vCPU 1 in `vcpu1_entry` (which reports and then spins forever) and waits
/// until it runs.
fn start_vcpu1() {
    const ARG: u64 = 42;
    let ctx = VcpuContext {
        rip: vcpu1_entry as *const () as u64,
        rsp: VCPU1_STACK.top() - 8,
        cr3: arch::read_cr3() & 0x000f_ffff_ffff_f000,
        arg: ARG,
        reserved: [0; 4],
    };
    if let Err(e) = guest_sdk::vcpu_initialise(1, &ctx) {
        println!("vcpu_initialise failed: {e}");
        guest_sdk::crash()
    }
    // SAFETY: the context starts `vcpu1_entry` (never returns, touches only the console
    // and an atomic) on a stack reserved for vCPU 1, with the current page tables.
    if let Err(e) = unsafe { guest_sdk::vcpu_up(1) } {
        println!("vcpu_up failed: {e}");
        guest_sdk::crash()
    }
    // Wait for vCPU 1, yielding the physical CPU to it; give up after a long while.
    let mut tries: u32 = 0;
    while VCPU1_FLAG.load(Ordering::Acquire) != ARG {
        tries += 1;
        if tries > 2_000_000 {
            println!("vcpus: timeout waiting for vcpu 1");
            guest_sdk::crash()
        }
        let _ = guest_sdk::sched_yield();
    }
}
