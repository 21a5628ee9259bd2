//! Event-channel, upcall, timer and scheduling scenarios, with raw hypercalls (the
//! host side is tested, not the SDK's wrappers).
//!
//! | scenario | output |
//! | --- | --- |
//! | `evtchn-local` | one domain: IPI upcalls, masking, flood coalescing, status, close, bad ports, VIRQ_TIMER + block, poll timeout, loopback interdomain |
//! | `evtchn-ping` / `evtchn-pong` | two connected domains: `rounds=N` round trips; pong blocks, replies |
//! | `evtchn-hostile` | bind to a port not offered, foreign ports, dead peer (needs a connected peer `evtchn-die`) |
//! | `evtchn-die` | connected: waits for one event, then powers off (exit 7) |
//! | `evtchn-timer-race` | `rounds=N` timers armed just ahead and cancelled: none fires after its cancel returned |
//! | `evtchn-smp` | 2 vCPUs: an IPI port bound to vCPU 1, a port moved to vCPU 1 with `BIND_VCPU`, each taken by vCPU 1's own upcall vector |

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use guest_sdk::arch::{self, DescriptorTablePointer, IdtEntry};
use guest_sdk::hv_abi::evtchn::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindVcpu, EvtchnStatus,
    EVTCHNOP_ALLOC_UNBOUND, EVTCHNOP_BIND_INTERDOMAIN, EVTCHNOP_BIND_IPI, EVTCHNOP_BIND_VCPU,
    EVTCHNOP_BIND_VIRQ, EVTCHNOP_CLOSE, EVTCHNOP_SEND, EVTCHNOP_STATUS, EVTCHNOP_UNMASK,
    VIRQ_TIMER,
};
use guest_sdk::hv_abi::hypercall::VCPUOP_SET_UPCALL_VECTOR;
use guest_sdk::hv_abi::layout::SHARED_INFO_GPA;
use guest_sdk::hv_abi::sched::{SchedPoll, SCHEDOP_BLOCK, SCHEDOP_POLL};
use guest_sdk::hv_abi::shared_info::{SharedInfo, VcpuTimeInfo};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::Op;
use guest_sdk::hypercall::{hypercall1, hypercall2, hypercall3};
use guest_sdk::{cmdline, poweroff, println};

/// The upcall vector the scenarios use.
const VECTOR: u64 = 0x40;

/// How far ahead `evtchn-local` arms the timer it cancels.
const CANCEL_AHEAD_NS: u64 = 50_000_000;

/// Upcalls taken (incremented by the handler).
static UPCALLS: AtomicU64 = AtomicU64::new(0);
/// Ports the handler saw pending (cleared them), as a count.
static EVENTS: AtomicU64 = AtomicU64::new(0);
/// The last port the handler saw.
static LAST_PORT: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Idt(UnsafeCell<[IdtEntry; 256]>);
// SAFETY: written once by vCPU 0 before `lidt`, read only by the CPU afterwards.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([IdtEntry::MISSING; 256]));

extern "C" {
    /// vCPU 0's upcall gate: saves the caller-saved registers, calls
    /// `tg_upcall_on(0)`, restores them, `iretq`.
    fn tg_upcall_stub();
    /// vCPU 1's upcall gate (vector `VECTOR + 1`): the same with `tg_upcall_on(1)`.
    fn tg_upcall1_stub();
}

/// Upcalls taken by vCPU 1.
static UPCALLS1: AtomicU64 = AtomicU64::new(0);
/// The last port vCPU 1's handler saw.
static LAST_PORT1: AtomicU64 = AtomicU64::new(0);

// Two gates, one per vCPU: each saves RDI, puts its vCPU index there (the handler's
// argument) and joins the common body.
core::arch::global_asm!(
    ".pushsection .text.tg_upcall_stub, \"ax\"",
    ".global tg_upcall_stub",
    ".global tg_upcall1_stub",
    "tg_upcall_stub:",
    "push rdi",
    "xor edi, edi",
    "jmp 2f",
    "tg_upcall1_stub:",
    "push rdi",
    "mov edi, 1",
    "2:",
    "push rax", "push rcx", "push rdx", "push rsi",
    "push r8", "push r9", "push r10", "push r11",
    // 9 pushes + the 5-word frame: RSP is 16-byte aligned minus 8; align for the call.
    "sub rsp, 8",
    "call {handler}",
    "add rsp, 8",
    "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rsi", "pop rdx", "pop rcx", "pop rax",
    "pop rdi",
    "iretq",
    ".popsection",
    handler = sym tg_upcall_on,
);

fn vcpu_byte(v: usize, off: usize) -> &'static AtomicU8 {
    // SAFETY: shared_info is identity-mapped RAM for the domain's life; `v` < 32 and
    // `off` is a byte of that vCPU's 64-byte record; accessed atomically only.
    unsafe { &*((SHARED_INFO_GPA as usize + v * 64 + off) as *const AtomicU8) }
}

fn vcpu_sel(v: usize) -> &'static AtomicU64 {
    // SAFETY: as `vcpu_byte`; offset 8 is the 8-aligned `pending_sel`.
    unsafe { &*((SHARED_INFO_GPA as usize + v * 64 + 8) as *const AtomicU64) }
}

/// vCPU 1's upcall handler, called directly (events that arrived while masked).
fn tg_upcall1() {
    tg_upcall_on(1);
}

#[repr(C, align(16))]
struct Stack1(UnsafeCell<[u8; 16384]>);
// SAFETY: used only as vCPU 1's stack.
unsafe impl Sync for Stack1 {}
static STACK1: Stack1 = Stack1(UnsafeCell::new([0; 16384]));

/// vCPU 1: load the IDT, enable interrupts, sleep in SCHEDOP_BLOCK forever (its
/// upcalls run the handler).
extern "C" fn smp_vcpu1(_arg: u64) -> ! {
    // SAFETY: the IDT was filled by vCPU 0 before vCPU 1 was started.
    unsafe {
        arch::load_idt(&DescriptorTablePointer {
            limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: guest_sdk::virt_to_phys(IDT.0.get()),
        });
    }
    sti();
    loop {
        vcpu_byte(1, 1).store(1, Ordering::Release);
        if vcpu_byte(1, 0).load(Ordering::Acquire) != 0 {
            vcpu_byte(1, 1).store(0, Ordering::Release);
            tg_upcall1();
            continue;
        }
        block();
    }
}

/// Spins (yielding) until `f` holds or about a second passes; returns whether it held.
fn wait_for(f: impl Fn() -> bool) -> bool {
    let t0 = now_ns();
    while !f() {
        if now_ns() - t0 > 1_000_000_000 {
            return false;
        }
        // SAFETY: no pointers.
        unsafe { hypercall1(Op::SchedOp, guest_sdk::hv_abi::sched::SCHEDOP_YIELD) };
    }
    true
}

/// `evtchn-smp` (2 vCPUs).
pub fn smp(si: &StartInfo) -> ! {
    if si.nr_vcpus < 2 {
        println!("evtchn-smp: needs 2 vCPUs");
        poweroff(1)
    }
    // SAFETY: vCPU 0 fills the IDT before anyone loads it.
    unsafe {
        (*IDT.0.get())[VECTOR as usize + 1] =
            IdtEntry::interrupt_gate(tg_upcall1_stub as *const () as u64, 0);
    }
    println!("set_vector={}", install_upcall());
    // vCPU 0 sets vCPU 1's vector before vCPU 1 is up.
    // SAFETY: no pointers.
    println!("set_vector1={}", unsafe {
        hypercall3(Op::VcpuOp, VCPUOP_SET_UPCALL_VECTOR, 1, VECTOR + 1)
    });
    sti();
    let ctx = guest_sdk::hv_abi::hypercall::VcpuContext {
        rip: smp_vcpu1 as *const () as u64,
        rsp: guest_sdk::virt_to_phys(STACK1.0.get()) + 16384 - 8,
        cr3: arch::read_cr3() & 0x000f_ffff_ffff_f000,
        arg: 0,
        reserved: [0; 4],
    };
    let up = guest_sdk::vcpu_initialise(1, &ctx).is_ok()
        // SAFETY: vCPU 1 runs `smp_vcpu1` on its own stack with our page tables.
        && unsafe { guest_sdk::vcpu_up(1) }.is_ok();
    println!("vcpu1_up={}", up as u8);

    let mut b = EvtchnBindVcpu {
        vcpu: 1,
        ..Default::default()
    };
    let r = evtchn_op(EVTCHNOP_BIND_IPI, &mut b);
    let ipi1 = b.port;
    println!("bind_ipi1={r}");
    let before0 = UPCALLS.load(Ordering::Acquire);
    port_op(EVTCHNOP_SEND, ipi1.into());
    println!(
        "ipi_reached_vcpu1={}",
        wait_for(|| LAST_PORT1.load(Ordering::Acquire) == ipi1 as u64) as u8
    );
    println!(
        "vcpu0_upcalls_for_ipi1={}",
        UPCALLS.load(Ordering::Acquire) - before0
    );

    // A loopback pair; the receiving end moved to vCPU 1.
    let mut a = EvtchnAllocUnbound {
        remote_dom: 0x7FF0,
        port: 0,
    };
    evtchn_op(EVTCHNOP_ALLOC_UNBOUND, &mut a);
    let mut bi = EvtchnBindInterdomain {
        remote_dom: 0x7FF0,
        remote_port: a.port,
        ..Default::default()
    };
    evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi);
    let mut mv = EvtchnBindVcpu {
        port: a.port,
        vcpu: 1,
        ..Default::default()
    };
    println!("bind_vcpu={}", evtchn_op(EVTCHNOP_BIND_VCPU, &mut mv));
    println!("status_vcpu_after_bind={}", status(a.port).1.vcpu);
    let up1 = UPCALLS1.load(Ordering::Acquire);
    port_op(EVTCHNOP_SEND, bi.local_port.into());
    println!(
        "moved_port_reached_vcpu1={}",
        wait_for(|| LAST_PORT1.load(Ordering::Acquire) == a.port as u64
            && UPCALLS1.load(Ordering::Acquire) > up1) as u8
    );
    let mut mv = EvtchnBindVcpu {
        port: a.port,
        vcpu: 2,
        ..Default::default()
    };
    println!("bind_vcpu_bad={}", evtchn_op(EVTCHNOP_BIND_VCPU, &mut mv));
    println!("evtchn-smp ok");
    poweroff(0)
}

fn shared() -> *mut SharedInfo {
    SHARED_INFO_GPA as *mut SharedInfo
}

fn vcpu0_pending() -> &'static AtomicU8 {
    vcpu_byte(0, 0)
}

fn vcpu0_mask() -> &'static AtomicU8 {
    vcpu_byte(0, 1)
}

fn pending_word(w: usize) -> &'static AtomicU64 {
    // SAFETY: shared_info is identity-mapped RAM for the domain's life; `w` < 64 (callers
    // index by port / 64); changed concurrently by the hypervisor, so accessed atomically.
    unsafe { &*(core::ptr::addr_of_mut!((*shared()).evtchn_pending[w]) as *const AtomicU64) }
}

fn mask_word(w: usize) -> &'static AtomicU64 {
    // SAFETY: as `pending_word`.
    unsafe { &*(core::ptr::addr_of_mut!((*shared()).evtchn_mask[w]) as *const AtomicU64) }
}

fn is_pending(port: u32) -> bool {
    pending_word(port as usize / 64).load(Ordering::Acquire) & (1 << (port % 64)) != 0
}

fn set_mask(port: u32, on: bool) {
    let w = mask_word(port as usize / 64);
    let b = 1u64 << (port % 64);
    if on {
        w.fetch_or(b, Ordering::AcqRel);
    } else {
        w.fetch_and(!b, Ordering::AcqRel);
    }
}

/// The upcall handler of vCPU `v` (Xen's 2-level scan over its record), then the
/// x2APIC EOI. vCPU 0 counts into `UPCALLS`/`EVENTS`/`LAST_PORT`, vCPU 1 into
/// `UPCALLS1`/`LAST_PORT1`.
extern "C" fn tg_upcall_on(v: u64) {
    let v = v as usize;
    let (upcalls, last) = if v == 0 {
        (&UPCALLS, &LAST_PORT)
    } else {
        (&UPCALLS1, &LAST_PORT1)
    };
    upcalls.fetch_add(1, Ordering::AcqRel);
    vcpu_byte(v, 0).store(0, Ordering::Release);
    let sel = vcpu_sel(v).swap(0, Ordering::AcqRel);
    for w in 0..64usize {
        if sel & (1 << w) == 0 {
            continue;
        }
        let ready = pending_word(w).load(Ordering::Acquire) & !mask_word(w).load(Ordering::Acquire);
        for b in 0..64 {
            if ready & (1 << b) != 0 {
                pending_word(w).fetch_and(!(1 << b), Ordering::AcqRel);
                if v == 0 {
                    EVENTS.fetch_add(1, Ordering::AcqRel);
                }
                last.store((w * 64 + b) as u64, Ordering::Release);
            }
        }
    }
    // SAFETY: x2APIC EOI (ring 0; hv put the local APIC in x2APIC mode).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0x80Bu32, in("eax") 0u32, in("edx") 0u32, options(nostack));
    }
}

/// vCPU 0's upcall handler, called directly (events that arrived while masked).
fn tg_upcall() {
    tg_upcall_on(0);
}

fn install_upcall() -> i64 {
    // SAFETY: vCPU 0 fills the IDT before loading it; the stub is a valid handler.
    unsafe {
        let t = &mut *IDT.0.get();
        t[VECTOR as usize] = IdtEntry::interrupt_gate(tg_upcall_stub as *const () as u64, 0);
        arch::load_idt(&DescriptorTablePointer {
            limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: guest_sdk::virt_to_phys(IDT.0.get()),
        });
    }
    // SAFETY: no pointers.
    unsafe { hypercall3(Op::VcpuOp, VCPUOP_SET_UPCALL_VECTOR, 0, VECTOR) }
}

fn sti() {
    // SAFETY: the upcall gate is installed.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

fn cli() {
    // SAFETY: disabling interrupts is always allowed in ring 0.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

fn evtchn_op<T>(cmd: u64, arg: &mut T) -> i64 {
    // SAFETY: `arg` is a valid, identity-mapped structure of the command's type.
    unsafe {
        hypercall2(
            Op::EventChannelOp,
            cmd,
            guest_sdk::virt_to_phys(arg as *mut T),
        )
    }
}

fn port_op(cmd: u64, port: u64) -> i64 {
    // SAFETY: no pointers.
    unsafe { hypercall2(Op::EventChannelOp, cmd, port) }
}

fn bind_ipi() -> (i64, u32) {
    let mut b = EvtchnBindVcpu::default();
    let r = evtchn_op(EVTCHNOP_BIND_IPI, &mut b);
    (r, b.port)
}

fn status(port: u32) -> (i64, EvtchnStatus) {
    let mut s = EvtchnStatus {
        port,
        ..Default::default()
    };
    let r = evtchn_op(EVTCHNOP_STATUS, &mut s);
    (r, s)
}

fn block() -> i64 {
    // SAFETY: no pointers.
    unsafe { hypercall1(Op::SchedOp, SCHEDOP_BLOCK) }
}

fn poll(ports: &[u32], timeout: u64) -> i64 {
    let mut p = SchedPoll {
        ports_gpa: guest_sdk::virt_to_phys(ports.as_ptr()),
        nr_ports: ports.len() as u32,
        reserved: 0,
        timeout,
    };
    // SAFETY: `p` and the port array are valid, identity-mapped.
    unsafe {
        hypercall2(
            Op::SchedOp,
            SCHEDOP_POLL,
            guest_sdk::virt_to_phys(&mut p as *mut SchedPoll),
        )
    }
}

/// System time from vCPU 0's time record and the TSC (no exit).
fn now_ns() -> u64 {
    // SAFETY: shared_info is identity-mapped; the record is read with the version
    // protocol (volatile reads, retry while odd or changed).
    unsafe {
        let p = core::ptr::addr_of!((*shared()).vcpu_info[0].time);
        loop {
            let v1 = core::ptr::read_volatile(core::ptr::addr_of!((*p).version));
            core::sync::atomic::fence(Ordering::Acquire);
            let t: VcpuTimeInfo = core::ptr::read_volatile(p);
            let tsc = core::arch::x86_64::_rdtsc();
            core::sync::atomic::fence(Ordering::Acquire);
            let v2 = core::ptr::read_volatile(core::ptr::addr_of!((*p).version));
            if v1 % 2 == 1 || v1 != v2 {
                continue;
            }
            let delta = tsc.wrapping_sub(t.tsc_timestamp);
            let d = if t.tsc_shift < 0 {
                delta >> (-t.tsc_shift) as u32
            } else {
                delta << t.tsc_shift as u32
            };
            return t.system_time + ((d as u128 * t.tsc_to_system_mul as u128) >> 32) as u64;
        }
    }
}

fn set_timer(abs_ns: u64) -> i64 {
    // SAFETY: no pointers.
    unsafe { hypercall1(Op::SetTimerOp, abs_ns) }
}

/// `evtchn-local`: everything one domain can do alone.
pub fn local(_si: &StartInfo) -> ! {
    println!("set_vector={}", install_upcall());
    // SAFETY: no pointers.
    println!("set_vector_bad={}", unsafe {
        hypercall3(Op::VcpuOp, VCPUOP_SET_UPCALL_VECTOR, 0, 0x10)
    });
    let (r, ipi) = bind_ipi();
    println!("bind_ipi={r}");
    println!("ipi_port={ipi}");
    sti();
    println!("send={}", port_op(EVTCHNOP_SEND, ipi.into()));
    println!("upcalls_after_send={}", UPCALLS.load(Ordering::Acquire));
    println!("last_port={}", LAST_PORT.load(Ordering::Acquire));

    // Masked port: stays pending, no upcall; unmask delivers it.
    set_mask(ipi, true);
    let before = UPCALLS.load(Ordering::Acquire);
    port_op(EVTCHNOP_SEND, ipi.into());
    println!(
        "masked_upcalls={}",
        UPCALLS.load(Ordering::Acquire) - before
    );
    println!("masked_pending={}", is_pending(ipi) as u8);
    println!("unmask={}", port_op(EVTCHNOP_UNMASK, ipi.into()));
    println!(
        "unmasked_upcalls={}",
        UPCALLS.load(Ordering::Acquire) - before
    );

    // Flood with upcalls masked: coalesces into one pending event and one upcall.
    cli();
    vcpu0_mask().store(1, Ordering::Release);
    let before = UPCALLS.load(Ordering::Acquire);
    let events_before = EVENTS.load(Ordering::Acquire);
    let mut failed = 0;
    for _ in 0..1000 {
        if port_op(EVTCHNOP_SEND, ipi.into()) != 0 {
            failed += 1;
        }
    }
    println!("flood_failed={failed}");
    println!(
        "flood_upcall_pending={}",
        vcpu0_pending().load(Ordering::Acquire)
    );
    vcpu0_mask().store(0, Ordering::Release);
    // As a guest unmasking upcalls must: handle what is pending.
    tg_upcall();
    sti();
    println!("flood_upcalls={}", UPCALLS.load(Ordering::Acquire) - before);
    println!(
        "flood_events={}",
        EVENTS.load(Ordering::Acquire) - events_before
    );

    let (r, s) = status(ipi);
    println!("status={r} status_kind={} status_vcpu={}", s.status, s.vcpu);
    println!("status_free={}", status(4000).1.status);
    println!("bind_vcpu_ipi={}", {
        let mut b = EvtchnBindVcpu {
            port: ipi,
            vcpu: 0,
            ..Default::default()
        };
        evtchn_op(EVTCHNOP_BIND_VCPU, &mut b)
    });
    println!("close={}", port_op(EVTCHNOP_CLOSE, ipi.into()));
    println!("send_closed={}", port_op(EVTCHNOP_SEND, ipi.into()));
    println!("close_again={}", port_op(EVTCHNOP_CLOSE, ipi.into()));
    println!("unmask_closed={}", port_op(EVTCHNOP_UNMASK, ipi.into()));
    println!("send_port0={}", port_op(EVTCHNOP_SEND, 0));
    println!("send_port4096={}", port_op(EVTCHNOP_SEND, 4096));
    println!("send_huge={}", port_op(EVTCHNOP_SEND, 1 << 40));
    println!("status_bad={}", status(5000).0);
    println!("bad_cmd={}", port_op(2, 1));
    println!("bad_gpa={}", unsafe_bad_gpa());
    let mut b = EvtchnBindVcpu {
        virq: 0,
        vcpu: 7,
        ..Default::default()
    };
    println!("bind_ipi_bad_vcpu={}", evtchn_op(EVTCHNOP_BIND_IPI, &mut b));
    let mut b = EvtchnBindVcpu {
        virq: 9,
        vcpu: 0,
        ..Default::default()
    };
    println!("bind_virq_bad={}", evtchn_op(EVTCHNOP_BIND_VIRQ, &mut b));

    // VIRQ_TIMER: arm 2 ms ahead, block until it fires.
    let mut b = EvtchnBindVcpu {
        virq: VIRQ_TIMER,
        vcpu: 0,
        ..Default::default()
    };
    let r = evtchn_op(EVTCHNOP_BIND_VIRQ, &mut b);
    let timer_port = b.port;
    println!("bind_virq={r}");
    let mut again = EvtchnBindVcpu {
        virq: VIRQ_TIMER,
        vcpu: 0,
        ..Default::default()
    };
    println!(
        "bind_virq_again={}",
        evtchn_op(EVTCHNOP_BIND_VIRQ, &mut again)
    );
    println!("send_virq={}", port_op(EVTCHNOP_SEND, timer_port.into()));
    let t0 = now_ns();
    let before = UPCALLS.load(Ordering::Acquire);
    println!("set_timer={}", set_timer(t0 + 2_000_000));
    let fired = || UPCALLS.load(Ordering::Acquire) != before;
    let mut blocks = 0;
    while !fired() && blocks < 100 {
        block_unless(&fired);
        blocks += 1;
    }
    let waited = now_ns() - t0;
    println!(
        "timer_fired={}",
        (UPCALLS.load(Ordering::Acquire) > before) as u8
    );
    println!("timer_blocks_lt_100={}", (blocks < 100) as u8);
    println!(
        "timer_port_seen={}",
        (LAST_PORT.load(Ordering::Acquire) == timer_port as u64) as u8
    );
    println!("timer_waited_ge_2ms={}", (waited >= 2_000_000) as u8);
    println!("timer_waited_lt_1s={}", (waited < 1_000_000_000) as u8);
    // A cancelled timer does not fire. Armed 50 ms ahead and cancelled by the next
    // hypercall; a cancel that returned after the deadline (a machine so loaded that
    // 50 ms passed in between) proves nothing, so such an attempt is made again, up
    // to 5 times (`cancel_in_time` says whether one was in time).
    let (_, quiet) = bind_ipi();
    let mut attempt = 0;
    let (before, deadline, cancel, in_time) = loop {
        let before = UPCALLS.load(Ordering::Acquire);
        let deadline = now_ns() + CANCEL_AHEAD_NS;
        set_timer(deadline);
        let cancel = set_timer(0);
        let in_time = now_ns() < deadline;
        attempt += 1;
        if in_time || attempt == 5 {
            break (before, deadline, cancel, in_time);
        }
        // A late timer may have fired before its cancel: let its upcall arrive
        // before the next attempt counts again.
        poll(&[quiet], now_ns() + 5_000_000);
    };
    println!("cancel={cancel}");
    println!("cancel_in_time={}", in_time as u8);

    // Poll with a timeout on a port nobody sends to.
    let t0 = now_ns();
    println!("poll={}", poll(&[quiet], t0 + 3_000_000));
    let waited = now_ns() - t0;
    println!("poll_waited_ge_3ms={}", (waited >= 3_000_000) as u8);
    println!("poll_bad_port={}", poll(&[0], 0));
    println!("poll_too_many={}", poll(&[quiet; 129], 0));
    // Sleep past the cancelled deadline, then count.
    poll(&[quiet], deadline + 5_000_000);
    println!(
        "timer_after_cancel={}",
        UPCALLS.load(Ordering::Acquire) - before
    );
    // Poll returns at once for a pending (masked) port.
    set_mask(quiet, true);
    port_op(EVTCHNOP_SEND, quiet.into());
    println!("poll_pending={}", poll(&[quiet], 0));

    // Loopback interdomain: allocate for ourselves, bind, send both ways.
    let mut a = EvtchnAllocUnbound {
        remote_dom: 0x7FF0,
        port: 0,
    };
    let r = evtchn_op(EVTCHNOP_ALLOC_UNBOUND, &mut a);
    println!("alloc_self={r}");
    let mut bi = EvtchnBindInterdomain {
        remote_dom: 0x7FF0,
        remote_port: a.port,
        ..Default::default()
    };
    println!(
        "bind_self={}",
        evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi)
    );
    let before = EVENTS.load(Ordering::Acquire);
    port_op(EVTCHNOP_SEND, bi.local_port.into());
    println!(
        "loopback_port_seen={}",
        (LAST_PORT.load(Ordering::Acquire) == a.port as u64) as u8
    );
    println!(
        "loopback_events={}",
        (EVENTS.load(Ordering::Acquire) > before) as u8
    );
    let (_, s) = status(bi.local_port);
    println!(
        "loopback_status={} loopback_remote_port_ok={}",
        s.status,
        (s.remote_port == a.port) as u8
    );
    port_op(EVTCHNOP_CLOSE, a.port.into());
    println!("peer_closed_status={}", status(bi.local_port).1.status);
    println!(
        "send_after_peer_close={}",
        port_op(EVTCHNOP_SEND, bi.local_port.into())
    );
    let mut a2 = EvtchnAllocUnbound {
        remote_dom: 4242,
        port: 0,
    };
    println!(
        "alloc_unknown_dom={}",
        evtchn_op(EVTCHNOP_ALLOC_UNBOUND, &mut a2)
    );
    println!("evtchn-local ok");
    poweroff(0)
}

fn unsafe_bad_gpa() -> i64 {
    // SAFETY: a GPA far outside RAM: the hypervisor must answer -EFAULT.
    unsafe { hypercall2(Op::EventChannelOp, EVTCHNOP_STATUS, 1 << 40) }
}

fn peer_port(si: &StartInfo, peer: &[u8]) -> u32 {
    let cmd = si.cmdline_bytes();
    let mut key = [0u8; 40];
    let prefix = b"evtchn.";
    key[..prefix.len()].copy_from_slice(prefix);
    key[prefix.len()..prefix.len() + peer.len()].copy_from_slice(peer);
    cmdline::value(cmd, &key[..prefix.len() + peer.len()])
        .and_then(cmdline::parse_u64)
        .unwrap_or(0) as u32
}

fn peer_domid(si: &StartInfo, peer: &[u8]) -> u32 {
    let cmd = si.cmdline_bytes();
    let mut key = [0u8; 40];
    let prefix = b"domid.";
    key[..prefix.len()].copy_from_slice(prefix);
    key[prefix.len()..prefix.len() + peer.len()].copy_from_slice(peer);
    cmdline::value(cmd, &key[..prefix.len() + peer.len()])
        .and_then(cmdline::parse_u64)
        .unwrap_or(u64::MAX) as u32
}

/// Sleeps in `SCHEDOP_BLOCK` until `done` holds, the race-free way, with RFLAGS.IF set
/// throughout (SPEC §8.3): upcalls are masked *before* the last check of `done`, so an
/// event that arrives between that check and the block sets `upcall_pending` (the
/// block then returns at once) instead of being consumed by an upcall the check did
/// not see; events found pending while masked are handled directly. The block unmasks
/// atomically; the hypervisor raises the upcall again on return if one is pending.
///
/// (Checking `done` only *before* masking lost wake-ups: an upcall taken between the
/// check and the mask consumed the event and cleared `upcall_pending`, and the block
/// then slept forever. That was the ping-pong hang.)
fn block_until(done: impl Fn() -> bool) {
    while !done() {
        block_unless(&done);
    }
}

/// One step of [`block_until`]: masks upcalls, then handles what is pending, or
/// returns if `done` holds, or sleeps in `SCHEDOP_BLOCK`.
fn block_unless(done: &impl Fn() -> bool) {
    vcpu0_mask().store(1, Ordering::Release);
    if vcpu0_pending().load(Ordering::Acquire) != 0 {
        // Something arrived while masked: handle it instead of sleeping.
        vcpu0_mask().store(0, Ordering::Release);
        tg_upcall();
        return;
    }
    if done() {
        vcpu0_mask().store(0, Ordering::Release);
        return;
    }
    block();
}

/// Waits (blocking) until the handler has counted more than `seen` events.
fn wait_event(seen: u64) -> u64 {
    block_until(|| EVENTS.load(Ordering::Acquire) > seen);
    EVENTS.load(Ordering::Acquire)
}

/// `evtchn-ping peer=NAME rounds=N`: N round trips; `evtchn-pong`: answers.
pub fn ping_pong(si: &StartInfo, ping: bool) -> ! {
    let cmd = si.cmdline_bytes();
    let peer = cmdline::value(cmd, b"peer").unwrap_or(b"");
    let rounds = cmdline::value(cmd, b"rounds")
        .and_then(cmdline::parse_u64)
        .unwrap_or(10);
    let port = peer_port(si, peer);
    println!("port={port}");
    install_upcall();
    sti();
    let mut seen = 0;
    let t0 = now_ns();
    for _ in 0..rounds {
        if ping {
            port_op(EVTCHNOP_SEND, port.into());
            seen = wait_event(seen);
        } else {
            seen = wait_event(seen);
            port_op(EVTCHNOP_SEND, port.into());
        }
    }
    let dt = now_ns() - t0;
    println!("rounds_done={rounds}");
    println!(
        "last_port_ok={}",
        (LAST_PORT.load(Ordering::Acquire) == port as u64) as u8
    );
    if ping {
        println!("round_trip_ns={}", dt / rounds.max(1));
    }
    poweroff(0)
}

/// `evtchn-timer-race rounds=N`: arms VIRQ_TIMER a little ahead (0 to 1.5 ms) and
/// cancels it with the next hypercall, N times, on a masked port (no upcalls: the
/// pending bit is the observation). A timer may fire before its cancel returned (the
/// bit is then set when the cancel returns); once the cancel returned, the bit must
/// not become set any more (checked after sleeping past the deadline).
pub fn timer_race(si: &StartInfo) -> ! {
    let rounds = cmdline::value(si.cmdline_bytes(), b"rounds")
        .and_then(cmdline::parse_u64)
        .unwrap_or(300);
    let mut b = EvtchnBindVcpu {
        virq: VIRQ_TIMER,
        vcpu: 0,
        ..Default::default()
    };
    let r = evtchn_op(EVTCHNOP_BIND_VIRQ, &mut b);
    let port = b.port;
    set_mask(port, true);
    let (_, quiet) = bind_ipi();
    println!("bind_virq={r}");
    let (mut fired_before, mut cancelled, mut late_fires, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut max_gap = 0;
    for i in 0..rounds {
        pending_word(port as usize / 64).fetch_and(!(1 << (port % 64)), Ordering::AcqRel);
        let t0 = now_ns();
        let deadline = t0 + (i % 16) * 100_000;
        if set_timer(deadline) != 0 || set_timer(0) != 0 {
            errors += 1;
        }
        max_gap = max_gap.max(now_ns() - t0);
        let at_cancel = is_pending(port);
        poll(&[quiet], deadline.max(now_ns()) + 2_000_000);
        let later = is_pending(port);
        if at_cancel {
            fired_before += 1;
        } else if later {
            late_fires += 1;
        } else {
            cancelled += 1;
        }
    }
    println!("timer_race_rounds={rounds}");
    println!("timer_race_errors={errors}");
    println!("timer_race_fired_before_cancel={fired_before}");
    println!("timer_race_cancelled={cancelled}");
    println!("timer_race_fired_after_cancel={late_fires}");
    // The longest time from arming to the cancel's return (how late a cancel can be).
    println!("timer_race_max_arm_to_cancel_ns={max_gap}");
    poweroff(0)
}

/// `evtchn-die`: connected to a peer; waits for one event from it, then powers off
/// with code 7.
pub fn die(_si: &StartInfo) -> ! {
    install_upcall();
    sti();
    wait_event(0);
    poweroff(7)
}

/// `evtchn-hostile peer=NAME`: the peer (`evtchn-die`) allocates nothing and dies.
pub fn hostile(si: &StartInfo) -> ! {
    let cmd = si.cmdline_bytes();
    let peer = cmdline::value(cmd, b"peer").unwrap_or(b"");
    let port = peer_port(si, peer);
    let peer_id = peer_domid(si, peer);
    println!("port={port} peer_id={peer_id}");
    // Bind to the peer's end of our connection: it is bound already, not offered.
    let (_, s) = status(port);
    let mut bi = EvtchnBindInterdomain {
        remote_dom: peer_id,
        remote_port: s.remote_port,
        ..Default::default()
    };
    println!(
        "bind_not_offered={}",
        evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi)
    );
    // A port of ours offered to a third domain cannot be bound by us... and a port we
    // offered to the peer is not ours to bind either.
    let mut a = EvtchnAllocUnbound {
        remote_dom: peer_id,
        port: 0,
    };
    println!(
        "alloc_for_peer={}",
        evtchn_op(EVTCHNOP_ALLOC_UNBOUND, &mut a)
    );
    let mut bi = EvtchnBindInterdomain {
        remote_dom: 0x7FF0,
        remote_port: a.port,
        ..Default::default()
    };
    println!(
        "bind_offered_to_other={}",
        evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi)
    );
    let mut bi = EvtchnBindInterdomain {
        remote_dom: peer_id,
        remote_port: 4096,
        ..Default::default()
    };
    println!(
        "bind_bad_port={}",
        evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi)
    );
    let mut bi = EvtchnBindInterdomain {
        remote_dom: peer_id,
        remote_port: 1,
        reserved: 1,
        ..Default::default()
    };
    println!(
        "bind_reserved={}",
        evtchn_op(EVTCHNOP_BIND_INTERDOMAIN, &mut bi)
    );
    // Tell the peer to die, then wait until it is gone: our port becomes unbound.
    port_op(EVTCHNOP_SEND, port.into());
    let mut tries = 0;
    while status(port).1.status != 1 && tries < 2000 {
        poll(&[port], now_ns() + 1_000_000);
        tries += 1;
    }
    println!("after_peer_death_status={}", status(port).1.status);
    println!(
        "send_after_peer_death={}",
        port_op(EVTCHNOP_SEND, port.into())
    );
    let mut a = EvtchnAllocUnbound {
        remote_dom: peer_id,
        port: 0,
    };
    println!(
        "alloc_for_dead={}",
        evtchn_op(EVTCHNOP_ALLOC_UNBOUND, &mut a)
    );
    println!("evtchn-hostile ok");
    poweroff(0)
}
