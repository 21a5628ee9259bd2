//! `irq_floor`: the floor of an event-channel ping-pong, built from raw KVM mechanisms
//! only (no hv domain, no hypercall, no event channel).
//!
//! Two bare KVM VMs, each with the in-kernel irqchip, one vCPU on its own host thread,
//! its local APIC in x2APIC mode (as hv sets up its domains, see [`crate::upcall`]),
//! and one eventfd registered as an irqfd whose GSI is routed as an MSI to that vCPU
//! with vector [`VECTOR`]. Both guests run the same 64-bit ring-0 code in hv's boot
//! state (identity page tables, GDT, TSS) with an IDT holding one interrupt gate:
//!
//! ```text
//! main:     out  PORT, al       ; A only: the first serve (B starts at idle)
//! idle:     sti                 ; interrupts on; the shadow covers the hlt
//!           hlt                 ; in-kernel irqchip: KVM blocks, no exit
//!           jmp  idle
//! handler:  out  PORT, al       ; exit: the host thread writes the PEER's irqfd
//!           mov  ecx, 0x80B     ; x2APIC EOI register
//!           xor  eax, eax
//!           xor  edx, edx
//!           wrmsr               ; EOI (handled in the kernel)
//!           iretq               ; back to idle
//! ```
//!
//! A's host thread, on each `out` exit, writes B's irqfd; B's handler does `out`; B's
//! host thread writes A's irqfd; A's handler does `out`, and so on. One round trip is
//! A's exit → B's handler → B's exit → A's handler → A's next exit. The handler
//! reaches its `out` with interrupts off, so the EOI, `iretq` and return to `hlt` run
//! while the peer works, off the measured path; an interrupt that arrives before the
//! `iretq` stays pending in the APIC until then. The host counts A's exits (the
//! handler's count) and timestamps both sides' exits, which gives the split below.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hv_abi::layout;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{kvm_err, BenchError};
use crate::boot;
use crate::domain::DomainError;
use crate::memory::DomainMemory;
use crate::upcall::UpcallError;

/// Round trips of the short and the long run (their difference is reported).
pub const ROUNDS_SHORT: u64 = 200;
/// See [`ROUNDS_SHORT`].
pub const ROUNDS_LONG: u64 = 1_200;

/// Repetitions `hv bench` takes the median of (a repetition is ~30 ms on an idle machine;
/// the ping-pong needs both vCPU threads on a CPU at once, so it is the most sensitive to
/// other load of all the benchmarks).
pub const REPS: usize = 11;

/// The interrupt vector both guests take.
pub const VECTOR: u8 = 0x40;
/// The port both guests write to exit (bare VMs: the host sees every port).
const PORT: u16 = 0xE8;
/// The irqfd's GSI (above the 24 legacy IOAPIC pins, as hv uses).
const GSI: u32 = 24;
/// RAM of each guest: the smallest hv accepts; the code sits at 1 MiB.
const RAM: u64 = 2 << 20;
/// The IDT (vectors 0..=VECTOR, 16 bytes each), in the page hv reserves at 0x4000.
const IDT_GPA: u64 = 0x4000;
/// `main`, then `handler` at `HANDLER_OFFSET` after it.
const CODE_GPA: u64 = layout::KERNEL_MIN_GPA;
const HANDLER_OFFSET: u64 = 0x100;
/// A run that has not finished after this long is stuck (a lost interrupt).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Guest A's `main`: serve once, then idle.
#[rustfmt::skip]
const MAIN_A: [u8; 7] = [
    0xE6, const { crate::conv::imm8(PORT as u64) }, // out  PORT, al    ; the first serve
    0xFB,             // idle: sti
    0xF4,             // hlt
    0xEB, 0xFC,       // jmp  idle (-4)
    0xCC,             // int3 (never reached)
];
/// Guest B's `main`: idle from the start.
#[rustfmt::skip]
const MAIN_B: [u8; 5] = [
    0xFB,             // idle: sti
    0xF4,             // hlt
    0xEB, 0xFC,       // jmp  idle (-4)
    0xCC,             // int3 (never reached)
];
/// The interrupt handler of both guests.
#[rustfmt::skip]
const HANDLER: [u8; 15] = [
    0xE6, const { crate::conv::imm8(PORT as u64) },             // out  PORT, al      ; exit: the peer is raised
    0xB9, 0x0B, 0x08, 0x00, 0x00, // mov  ecx, 0x80B    ; x2APIC EOI register
    0x31, 0xC0,                   // xor  eax, eax
    0x31, 0xD2,                   // xor  edx, edx
    0x0F, 0x30,                   // wrmsr              ; EOI
    0x48, 0xCF,                   // iretq              ; back to idle
];

/// The timing of one ping-pong run.
#[derive(Clone, Copy, Debug)]
pub struct RoundTrips {
    /// Round trips timed.
    pub rounds: u64,
    /// From A's first exit to its last: `rounds` round trips.
    pub total: Duration,
    /// Summed over the rounds: A's exit seen by its host thread → B's exit seen by its
    /// host thread (irqfd write, B woken from `hlt`, interrupt taken, `out`).
    pub a_to_b: Duration,
    /// Summed over the rounds: B's exit → A's next exit.
    pub b_to_a: Duration,
}

/// One guest: field order is drop order (vCPU, then VM, then the memory it maps).
struct FloorVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    irqfd: EventFd,
    _mem: DomainMemory,
}

/// A 16-byte 64-bit interrupt gate: present, DPL 0, kernel code selector.
pub(crate) fn interrupt_gate(handler: u64) -> [u8; 16] {
    let low = (handler & 0xFFFF)
        | (u64::from(layout::SEL_KERNEL_CODE) << 16)
        | (0x8E << 40)
        | (((handler >> 16) & 0xFFFF) << 48);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&low.to_le_bytes());
    g[8..].copy_from_slice(&(handler >> 32).to_le_bytes());
    g
}

fn upcall_err(e: UpcallError) -> BenchError {
    BenchError::Domain(DomainError::from(e))
}

/// Builds one guest: memory, page tables, GDT/TSS, IDT, code; VM with the in-kernel
/// irqchip, irqfd and MSI route; vCPU in long mode with x2APIC enabled.
fn floor_vm(kvm: &Kvm, main: &[u8]) -> Result<FloorVm, BenchError> {
    let (pool, _) = boot::pool_frames_for(RAM, 0);
    let mem = DomainMemory::new("irq_floor", RAM, pool).map_err(DomainError::from)?;
    let w = |gpa, b: &[u8]| mem.write_ram(gpa, b).map_err(DomainError::from);
    w(CODE_GPA, main)?;
    w(CODE_GPA + HANDLER_OFFSET, &HANDLER)?;
    w(
        IDT_GPA + u64::from(VECTOR) * 16,
        &interrupt_gate(CODE_GPA + HANDLER_OFFSET),
    )?;
    let bi = boot::build_page_tables(&mem).map_err(DomainError::from)?;
    boot::write_gdt_tss(&mem).map_err(DomainError::from)?;

    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    super::register_ram_and_pool(&vm, &mem)?;
    // The in-kernel irqchip must exist before the vCPU.
    crate::upcall::create_irqchip(&vm).map_err(upcall_err)?;
    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| upcall_err(UpcallError::EventFd(e)))?;
    vm.register_irqfd(&irqfd, GSI)
        .map_err(kvm_err("register irqfd"))?;
    let route = kvm_irq_routing_entry {
        gsi: GSI,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                // Physical destination: x2APIC id 0, the only vCPU.
                address_lo: 0xFEE0_0000,
                address_hi: 0,
                data: u32::from(VECTOR),
                ..Default::default()
            },
        },
        ..Default::default()
    };
    let table =
        KvmIrqRouting::from_entries(&[route]).map_err(|e| upcall_err(UpcallError::Table(e)))?;
    vm.set_gsi_routing(&table)
        .map_err(kvm_err("set GSI routing"))?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let supported =
        crate::cpuid::supported_cached(kvm).map_err(crate::domain::DomainError::from)?;
    // KVM's table with CPUID.1:ECX.x2APIC set (and hv's leaves, which this guest ignores).
    let cpuid = crate::cpuid::build(&supported, 0, crate::FEATURES)
        .map_err(|e| upcall_err(UpcallError::Table(e)))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    crate::upcall::enable_x2apic(&vcpu, 0).map_err(upcall_err)?;
    let mut sregs = boot::boot_sregs(vcpu.get_sregs().map_err(kvm_err("get sregs"))?, bi.pt_base);
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = (u16::from(VECTOR) + 1) * 16 - 1;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    vcpu.set_regs(&boot::boot_regs(CODE_GPA, layout::BOOT_STACK_TOP - 8, 0))
        .map_err(kvm_err("set regs"))?;
    Ok(FloorVm {
        vcpu,
        _vm: vm,
        irqfd,
        _mem: mem,
    })
}

/// What a vCPU thread did after KVM_RUN returned.
enum Step {
    /// The guest wrote [`PORT`].
    Out,
    /// KVM_RUN was interrupted by a signal.
    Interrupted,
}

fn step(vcpu: &mut VcpuFd, who: &str) -> Result<Step, BenchError> {
    match vcpu.run() {
        Ok(VcpuExit::IoOut(PORT, _)) => Ok(Step::Out),
        Ok(other) => Err(BenchError::Guest(format!(
            "irq_floor guest {who}: unexpected exit {other:?}"
        ))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Step::Interrupted),
        Err(e) => Err(kvm_err("run")(e)),
    }
}

fn raise(fd: &EventFd) -> Result<(), BenchError> {
    fd.write(1).map_err(|e| upcall_err(UpcallError::EventFd(e)))
}

/// A's thread: times `rounds` round trips from its first exit; on the last, stops B
/// by raising it once more with `stop` set.
fn run_a(
    vcpu: &mut VcpuFd,
    peer: &EventFd,
    rounds: u64,
    stop: &AtomicBool,
) -> Result<Vec<Instant>, BenchError> {
    let mut exits = Vec::with_capacity(crate::conv::usize_from(rounds) + 1);
    loop {
        match step(vcpu, "A")? {
            Step::Out if stop.load(Ordering::Acquire) => {
                return Err(BenchError::Guest("irq_floor guest A stopped early".into()))
            }
            Step::Out => {
                exits.push(Instant::now());
                if exits.len() as u64 > rounds {
                    stop.store(true, Ordering::Release);
                    raise(peer)?;
                    return Ok(exits);
                }
                raise(peer)?;
            }
            Step::Interrupted if stop.load(Ordering::Acquire) => {
                return Err(BenchError::Guest("irq_floor guest A stopped early".into()))
            }
            Step::Interrupted => {}
        }
    }
}

/// B's thread: raises A on every exit until `stop` is set.
fn run_b(vcpu: &mut VcpuFd, peer: &EventFd, stop: &AtomicBool) -> Result<Vec<Instant>, BenchError> {
    let mut exits = Vec::new();
    loop {
        match step(vcpu, "B")? {
            Step::Out if stop.load(Ordering::Acquire) => return Ok(exits),
            Step::Out => {
                exits.push(Instant::now());
                raise(peer)?;
            }
            Step::Interrupted if stop.load(Ordering::Acquire) => {
                return Err(BenchError::Guest("irq_floor guest B stopped early".into()))
            }
            Step::Interrupted => {}
        }
    }
}

/// Runs the ping-pong for `rounds` round trips and returns its timing.
pub fn irq_floor_split(kvm: &Kvm, rounds: u64) -> Result<RoundTrips, BenchError> {
    if rounds == 0 {
        return Err(BenchError::Guest(
            "irq_floor needs at least one round".into(),
        ));
    }
    let a = floor_vm(kvm, &MAIN_A)?;
    let b = floor_vm(kvm, &MAIN_B)?;
    // A handler for the kick signal, so that a stuck KVM_RUN can be interrupted.
    crate::vcpu::install_kick_handler()?;
    let stop = AtomicBool::new(false);
    let FloorVm {
        vcpu: mut vcpu_a,
        _vm: _vm_a,
        irqfd: irq_a,
        _mem: _mem_a,
    } = a;
    let FloorVm {
        vcpu: mut vcpu_b,
        _vm: _vm_b,
        irqfd: irq_b,
        _mem: _mem_b,
    } = b;
    let (a_exits, b_exits) = std::thread::scope(|s| {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (tid_tx, tid_rx) = mpsc::channel::<(usize, libc::pthread_t)>();
        let (stop, irq_a, irq_b) = (&stop, &irq_a, &irq_b);
        let done_a = done_tx.clone();
        let tid_a = tid_tx.clone();
        let ta = std::thread::Builder::new()
            .name("irq_floor-A".into())
            .spawn_scoped(s, move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tid_a.send((0, unsafe { libc::pthread_self() }));
                let r = run_a(&mut vcpu_a, irq_b, rounds, stop);
                let _ = done_a.send(());
                r
            })
            .map_err(DomainError::Thread)?;
        let tb = std::thread::Builder::new()
            .name("irq_floor-B".into())
            .spawn_scoped(s, move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tid_tx.send((1, unsafe { libc::pthread_self() }));
                let r = run_b(&mut vcpu_b, irq_a, stop);
                let _ = done_tx.send(());
                r
            })
            .map_err(DomainError::Thread)?;
        // Both threads send their id first thing, so these do not block for long.
        let mut tids: Vec<(usize, libc::pthread_t)> = tid_rx.iter().take(2).collect();
        tids.sort_by_key(|t| t.0);
        let deadline = Instant::now() + TIMEOUT;
        let mut finished = 0;
        while finished < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
            finished += 1;
        }
        let timed_out = finished < 2;
        if timed_out {
            // A lost interrupt leaves a vCPU halted in the kernel: raise both guests and
            // kick both threads out of KVM_RUN until they have returned.
            stop.store(true, Ordering::Release);
            while !(ta.is_finished() && tb.is_finished()) {
                for (t, fd) in [(&ta, irq_a), (&tb, irq_b)] {
                    if !t.is_finished() {
                        let _ = fd.write(1);
                    }
                }
                // A thread's id stays valid until it is joined (below), so kicking
                // one that has just returned is harmless.
                for (t, (_, tid)) in [&ta, &tb].into_iter().zip(&tids) {
                    if !t.is_finished() {
                        crate::vcpu::kick(*tid);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let join = |r: std::thread::Result<Result<Vec<Instant>, BenchError>>| {
            r.unwrap_or_else(|_| Err(BenchError::Guest("irq_floor thread panicked".into())))
        };
        let (ra, rb) = (join(ta.join()), join(tb.join()));
        if timed_out {
            return Err(BenchError::Guest(format!(
                "irq_floor: no progress after {TIMEOUT:?} (interrupt lost?)"
            )));
        }
        Ok::<_, BenchError>((ra?, rb?))
    })?;
    // A exited rounds + 1 times, B once after each of A's first `rounds` exits.
    if a_exits.len() as u64 != rounds + 1 || b_exits.len() as u64 != rounds {
        return Err(BenchError::Guest(format!(
            "irq_floor: {} exits of A and {} of B for {rounds} rounds",
            a_exits.len(),
            b_exits.len()
        )));
    }
    // Causality: B's i-th exit follows A's i-th (A stamps it before raising B) and
    // precedes A's next (B stamps it before raising A).
    let (mut a_to_b, mut b_to_a) = (Duration::ZERO, Duration::ZERO);
    for (i, &tb) in b_exits.iter().enumerate() {
        if tb < a_exits[i] || a_exits[i + 1] < tb {
            return Err(BenchError::Guest(format!(
                "irq_floor: exits out of order at round {i}"
            )));
        }
        a_to_b += tb - a_exits[i];
        b_to_a += a_exits[i + 1] - tb;
    }
    let r = RoundTrips {
        rounds,
        total: a_exits[crate::conv::usize_from(rounds)] - a_exits[0],
        a_to_b,
        b_to_a,
    };
    let mut each: Vec<f64> = a_exits
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e6)
        .collect();
    each.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: usize| each[(each.len() - 1) * p / 100];
    tracing::debug!(
        rounds,
        us_per_round = r.total.as_secs_f64() * 1e6 / rounds as f64,
        p10_us = pct(10),
        p50_us = pct(50),
        p90_us = pct(90),
        a_to_b_us = r.a_to_b.as_secs_f64() * 1e6 / rounds as f64,
        b_to_a_us = r.b_to_a.as_secs_f64() * 1e6 / rounds as f64,
        "irq_floor run"
    );
    Ok(r)
}

/// The time of `rounds` ping-pong round trips between two bare KVM guests over
/// irqfd/MSI, timed from A's first exit to its last.
pub fn irq_floor_round_trip(kvm: &Kvm, rounds: u64) -> Result<Duration, BenchError> {
    Ok(irq_floor_split(kvm, rounds)?.total)
}

/// us per round trip: the difference of a long and a short run.
pub fn irq_floor_once(kvm: &Kvm) -> Result<f64, BenchError> {
    let short = irq_floor_round_trip(kvm, ROUNDS_SHORT)?;
    let long = irq_floor_round_trip(kvm, ROUNDS_LONG)?;
    Ok((long.as_secs_f64() - short.as_secs_f64()) * 1e6 / (ROUNDS_LONG - ROUNDS_SHORT) as f64)
}
