//! `evtchn_pingpong` and `evtchn_pingpong_poll`: the ping-pong of [`super::irq_floor`],
//! between two real hv domains over an interdomain event channel, through hv's full path.
//!
//! Two domains of one [`Hypervisor`], connected with [`Hypervisor::connect`] before they
//! run (the host writes each guest's port into its image, at [`PORT_OFF`]). Each runs
//! hand-assembled 64-bit ring-0 code in hv's boot state. A round trip: A sends
//! (`event_channel_op(EVTCHNOP_SEND, port)`, an exit; hv marks B's port pending, sets
//! B's `pending_sel` and `upcall_pending`, writes B's irqfd) → B wakes, handles the event
//! and sends back → A wakes, handles it and sends again.
//!
//! **Upcall** ([`Wait::Upcall`]): each guest loads an IDT (inside its image), sets its
//! upcall vector with `vcpu_op(VCPUOP_SET_UPCALL_VECTOR, 0, VECTOR)` and idles in
//! `sti; hlt` (hv's in-kernel local APIC absorbs the `hlt`). Its upcall handler does what
//! a 2-level guest must do, minimally: clear `upcall_pending`, exchange `pending_sel` with
//! 0, `lock btr` the port's pending bit and, if it was set, send to the peer (the exit
//! that passes the ball); then EOI and `iretq`. A counts the events it handled, after
//! its send, and powers off after `rounds` of them.
//!
//! **Poll** ([`Wait::Poll`]): no IDT, no vector, no interrupt: each guest waits with
//! `sched_op(SCHEDOP_POLL, &SchedPoll { ports: [port], nr_ports: 1, timeout: 0 })`, then
//! `lock btr`s the pending bit itself (polling again if it was clear) and sends.
//!
//! A's first send comes from `main`, after its vector is set. B may receive it before
//! it has set its vector (no interrupt is raised then), so B, once its vector is set,
//! runs its handler once through a hand-built interrupt frame: the `lock btr` finds the
//! bit set or clear, so the event is handled exactly once either way.
//!
//! The host times from [`Hypervisor::start`] until A stops (hv's stop notification, no
//! polling), then destroys B. `hv bench` reports the difference of a
//! [`ROUNDS_LONG`]-round and a [`ROUNDS_SHORT`]-round run, so creation, boot and
//! shutdown cancel out, exactly as for [`super::irq_floor`].

use crate::conv::{imm32, imm8};
use std::time::{Duration, Instant};

use hv_abi::evtchn::EVTCHNOP_SEND;
use hv_abi::hypercall::{VCPUOP_SET_UPCALL_VECTOR, X2APIC_EOI_MSR};
use hv_abi::layout::{KERNEL_MIN_GPA, SHARED_INFO_GPA};
use hv_abi::sched::SCHEDOP_POLL;
use hv_abi::Op;
use kvm_ioctls::Kvm;

use super::irq_floor::{interrupt_gate, ROUNDS_LONG as FLOOR_LONG, ROUNDS_SHORT as FLOOR_SHORT};
use super::{shutdown_code, BenchError};
use crate::console::ConsoleSink;
use crate::domain::{DomainConfig, DomainError};
use crate::hypervisor::Hypervisor;
use crate::loader::KernelImage;
use crate::outcome::Outcome;

/// Round trips of the short and the long run (the same as the floor's).
pub const ROUNDS_SHORT: u64 = FLOOR_SHORT;
/// See [`ROUNDS_SHORT`].
pub const ROUNDS_LONG: u64 = FLOOR_LONG;

/// How each guest waits for the peer's event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `sti; hlt`, woken by the upcall interrupt.
    Upcall,
    /// `sched_op(SCHEDOP_POLL)` on the one port, no interrupt.
    Poll,
}

/// The upcall vector both guests set.
pub const VECTOR: u8 = 0x40;
/// RAM of each domain: the smallest hv accepts.
const RAM: u64 = 2 << 20;
/// A run that has not finished after this long is stuck (a lost event).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Offsets in the image (loaded at `KERNEL_MIN_GPA`): `main` at 0, the handler at
/// `HANDLER_OFF`, data from `PORT_OFF`, the IDT at `IDT_OFF`.
const HANDLER_OFF: usize = 0x100;
/// u32: this guest's port (written by the host after `connect`).
pub const PORT_OFF: usize = 0x200;
/// u64: events A has handled.
pub const COUNT_OFF: usize = 0x208;
/// u64: events A handles before it powers off.
const ROUNDS_OFF: usize = 0x210;
/// The IDTR operand of `lidt`: u16 limit, u64 base.
const IDTR_OFF: usize = 0x220;
/// `SchedPoll` (24 bytes).
const POLL_OFF: usize = 0x240;
/// The u32 port array `SchedPoll.ports_gpa` points at (written by the host).
pub const POLL_PORTS_OFF: usize = 0x260;
/// The IDT: vectors 0..=VECTOR, 16 bytes each.
const IDT_OFF: usize = 0x400;
const IMAGE_LEN: usize = IDT_OFF + (VECTOR as usize + 1) * 16;

/// Shared-info fields of vCPU 0 and the pending bitmap.
const UPCALL_PENDING: u32 = imm32(SHARED_INFO_GPA);
const PENDING_SEL: u32 = imm32(SHARED_INFO_GPA + 8);
const EVTCHN_PENDING: u32 = imm32(SHARED_INFO_GPA + 2048);

const HC: u8 = imm8(hv_abi::hypercall::HYPERCALL_PORT as u64);

/// The guest-physical address of image offset `off`, as a disp32/imm32.
fn at(off: usize) -> [u8; 4] {
    // The images are a few KiB just above KERNEL_MIN_GPA (a 32-bit address).
    u32::try_from(KERNEL_MIN_GPA + off as u64)
        .expect("bench image address fits 32 bits")
        .to_le_bytes()
}

/// Appends `bytes`.
fn emit(c: &mut Vec<u8>, bytes: &[u8]) {
    c.extend_from_slice(bytes);
}

/// Appends a 2-byte `jcc`/`jmp rel8` with a placeholder; returns where to patch.
fn jump(c: &mut Vec<u8>, opcode: u8) -> usize {
    c.extend_from_slice(&[opcode, 0]);
    c.len() - 1
}

/// Points the rel8 at `site` (from [`jump`]) to `target` (offsets in the same block).
fn patch(c: &mut [u8], site: usize, target: usize) {
    let rel = target as i64 - (site as i64 + 1);
    // The blocks are a few dozen bytes: rel always fits.
    let rel = i8::try_from(rel).expect("rel8 jump within a block");
    c[site] = rel.to_le_bytes()[0];
}

/// `event_channel_op(EVTCHNOP_SEND, port)` with the port loaded into ESI first.
fn send_code(c: &mut Vec<u8>) {
    emit(c, &[0x8B, 0x34, 0x25]); //                 mov  esi, [PORT]
    emit(c, &at(PORT_OFF));
    send_esi(c);
}

/// `event_channel_op(EVTCHNOP_SEND, esi)`.
fn send_esi(c: &mut Vec<u8>) {
    emit(c, &[0xB8]); //                             mov  eax, event_channel_op
    emit(c, &(Op::EventChannelOp as u32).to_le_bytes());
    emit(c, &[0xBF]); //                             mov  edi, EVTCHNOP_SEND
    emit(c, &const { imm32(EVTCHNOP_SEND) }.to_le_bytes());
    emit(c, &[0xE6, HC]); //                         out  0xE8, al  ; exit: the peer is raised
}

/// `lock btr [evtchn_pending], rsi`: clears the port's pending bit (bit `rsi` of the
/// bitmap: word rsi / 64, bit rsi % 64); CF = whether it was set.
fn btr_port_rsi(c: &mut Vec<u8>) {
    emit(c, &[0xF0, 0x48, 0x0F, 0xB3, 0x34, 0x25]); // lock btr [EVTCHN_PENDING], rsi
    emit(c, &EVTCHN_PENDING.to_le_bytes());
}

/// A only: counts the event just handled; powers off after ROUNDS. Returns the site of
/// the jump to the shutdown code.
fn count_code(c: &mut Vec<u8>) -> usize {
    emit(c, &[0x48, 0xFF, 0x04, 0x25]); //           inc  qword [COUNT]
    emit(c, &at(COUNT_OFF));
    emit(c, &[0x48, 0x8B, 0x04, 0x25]); //           mov  rax, [COUNT]
    emit(c, &at(COUNT_OFF));
    emit(c, &[0x48, 0x3B, 0x04, 0x25]); //           cmp  rax, [ROUNDS]
    emit(c, &at(ROUNDS_OFF));
    jump(c, 0x73) //                                 jae  shutdown
}

/// `main` and the upcall handler of the upcall variant.
fn upcall_code(first_serve: bool) -> (Vec<u8>, Vec<u8>) {
    let mut m = Vec::new();
    emit(&mut m, &[0x0F, 0x01, 0x1C, 0x25]); //      lidt [IDTR]
    emit(&mut m, &at(IDTR_OFF));
    emit(&mut m, &[0xB8]); //                        mov  eax, vcpu_op
    emit(&mut m, &(Op::VcpuOp as u32).to_le_bytes());
    emit(&mut m, &[0xBF]); //                        mov  edi, VCPUOP_SET_UPCALL_VECTOR
    emit(
        &mut m,
        &const { imm32(VCPUOP_SET_UPCALL_VECTOR) }.to_le_bytes(),
    );
    emit(&mut m, &[0x31, 0xF6]); //                  xor  esi, esi      ; vCPU 0
    emit(&mut m, &[0xBA, VECTOR, 0, 0, 0]); //       mov  edx, VECTOR
    emit(&mut m, &[0xE6, HC]); //                    out  0xE8, al
    emit(&mut m, &[0x48, 0x85, 0xC0]); //            test rax, rax
    emit(&mut m, &[0x74, 0x02]); //                  jz   +2
    emit(&mut m, &[0x0F, 0x0B]); //                  ud2                ; refused: crash
    if first_serve {
        send_code(&mut m); //                        the first serve
    } else {
        // Catch an event that arrived before the vector was set (no interrupt was raised
        // for it): run the handler once through an interrupt frame built by hand (PVM's
        // emulator does not take a software `int`).
        emit(&mut m, &[0x48, 0x89, 0xE0]); //        mov  rax, rsp
        emit(&mut m, &[0x6A, 0x10]); //              push SEL_KERNEL_DATA ; SS
        emit(&mut m, &[0x50]); //                    push rax             ; RSP
        emit(&mut m, &[0x9C]); //                    pushfq               ; RFLAGS (IF = 0)
        emit(&mut m, &[0x6A, 0x08]); //              push SEL_KERNEL_CODE ; CS
        emit(&mut m, &[0xE8]); //                    call handler         ; RIP; iretq returns
        let next = m.len() + 4;
        let rel =
            i32::try_from(HANDLER_OFF as i64 - next as i64).expect("rel32 call within the image");
        emit(&mut m, &rel.to_le_bytes());
    }
    let idle = m.len();
    emit(&mut m, &[0xFB]); //                        idle: sti  ; the shadow covers the hlt
    emit(&mut m, &[0xF4]); //                        hlt        ; in-kernel APIC: no exit
    let j = jump(&mut m, 0xEB); //                   jmp  idle
    patch(&mut m, j, idle);

    // The handler. The interrupted code is the idle loop (or `main`'s call, right
    // before it), which keeps nothing in registers: no registers are saved.
    let mut h = Vec::new();
    emit(&mut h, &[0xC6, 0x04, 0x25]); //            mov  byte [upcall_pending], 0
    emit(&mut h, &UPCALL_PENDING.to_le_bytes());
    emit(&mut h, &[0]);
    emit(&mut h, &[0x31, 0xC0]); //                  xor  eax, eax
    emit(&mut h, &[0x48, 0x87, 0x04, 0x25]); //      xchg [pending_sel], rax  ; atomic
    emit(&mut h, &PENDING_SEL.to_le_bytes());
    emit(&mut h, &[0x8B, 0x34, 0x25]); //            mov  esi, [PORT]
    emit(&mut h, &at(PORT_OFF));
    btr_port_rsi(&mut h); //                         lock btr [evtchn_pending], rsi
    let none = jump(&mut h, 0x73); //                jnc  eoi   ; not pending: nothing to do
    send_esi(&mut h); //                             send: the ball is passed
    let stop = first_serve.then(|| count_code(&mut h));
    let eoi = h.len();
    patch(&mut h, none, eoi);
    emit(&mut h, &[0xB9]); //                        eoi: mov ecx, 0x80B  ; x2APIC EOI
    emit(&mut h, &X2APIC_EOI_MSR.to_le_bytes());
    emit(&mut h, &[0x31, 0xC0]); //                  xor  eax, eax
    emit(&mut h, &[0x31, 0xD2]); //                  xor  edx, edx
    emit(&mut h, &[0x0F, 0x30]); //                  wrmsr
    emit(&mut h, &[0x48, 0xCF]); //                  iretq
    if let Some(stop) = stop {
        let at = h.len();
        patch(&mut h, stop, at);
        emit(&mut h, &shutdown_code()); //           shutdown: sched_op(SHUTDOWN, POWEROFF, 0)
    }
    (m, h)
}

/// `main` of the poll variant (no handler).
fn poll_code(first_serve: bool) -> Vec<u8> {
    let mut m = Vec::new();
    if first_serve {
        send_code(&mut m); //                        the first serve
    }
    let wait = m.len();
    emit(&mut m, &[0xB8]); //                        wait: mov eax, sched_op
    emit(&mut m, &(Op::SchedOp as u32).to_le_bytes());
    emit(&mut m, &[0xBF]); //                        mov  edi, SCHEDOP_POLL
    emit(&mut m, &const { imm32(SCHEDOP_POLL) }.to_le_bytes());
    emit(&mut m, &[0xBE]); //                        mov  esi, POLL     ; &SchedPoll
    emit(&mut m, &at(POLL_OFF));
    emit(&mut m, &[0xE6, HC]); //                    out  0xE8, al      ; sleeps until pending
    emit(&mut m, &[0x8B, 0x34, 0x25]); //            mov  esi, [PORT]
    emit(&mut m, &at(PORT_OFF));
    btr_port_rsi(&mut m); //                         lock btr [evtchn_pending], rsi
    let j = jump(&mut m, 0x73); //                   jnc  wait  ; woken for nothing: poll again
    patch(&mut m, j, wait);
    send_esi(&mut m); //                             send: the ball is passed
    let stop = first_serve.then(|| count_code(&mut m));
    let j = jump(&mut m, 0xEB); //                   jmp  wait
    patch(&mut m, j, wait);
    if let Some(stop) = stop {
        let at = m.len();
        patch(&mut m, stop, at);
        emit(&mut m, &shutdown_code()); //           shutdown: sched_op(SHUTDOWN, POWEROFF, 0)
    }
    m
}

/// The whole image of one guest: code, data (port 0 until the host writes it), IDT.
pub fn guest_image(wait: Wait, first_serve: bool, rounds: u64) -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_LEN];
    let put = |img: &mut Vec<u8>, off: usize, b: &[u8]| img[off..off + b.len()].copy_from_slice(b);
    match wait {
        Wait::Upcall => {
            let (m, h) = upcall_code(first_serve);
            put(&mut img, 0, &m);
            put(&mut img, HANDLER_OFF, &h);
            let handler = KERNEL_MIN_GPA + HANDLER_OFF as u64;
            put(
                &mut img,
                IDT_OFF + usize::from(VECTOR) * 16,
                &interrupt_gate(handler),
            );
        }
        Wait::Poll => put(&mut img, 0, &poll_code(first_serve)),
    }
    put(&mut img, ROUNDS_OFF, &rounds.to_le_bytes());
    let limit = (u16::from(VECTOR) + 1) * 16 - 1;
    put(&mut img, IDTR_OFF, &limit.to_le_bytes());
    put(
        &mut img,
        IDTR_OFF + 2,
        &(KERNEL_MIN_GPA + IDT_OFF as u64).to_le_bytes(),
    );
    // SchedPoll { ports_gpa, nr_ports: 1, reserved: 0, timeout: 0 }.
    put(
        &mut img,
        POLL_OFF,
        &(KERNEL_MIN_GPA + POLL_PORTS_OFF as u64).to_le_bytes(),
    );
    put(&mut img, POLL_OFF + 8, &1u32.to_le_bytes());
    img
}

fn config(name: &str, domid: u32) -> DomainConfig {
    DomainConfig {
        name: name.into(),
        domid,
        mem_bytes: RAM,
        console: ConsoleSink::Discard,
        ..DomainConfig::default()
    }
}

/// Runs the ping-pong for `rounds` round trips; returns the time from the domains'
/// start until A powered off (creation before and B's destruction after not included).
pub fn evtchn_round_trips(wait: Wait, rounds: u64) -> Result<Duration, BenchError> {
    if rounds == 0 {
        return Err(BenchError::Guest(
            "evtchn_pingpong needs at least one round".into(),
        ));
    }
    let mut hv = Hypervisor::new(crate::domain::open_kvm()?);
    let ia = KernelImage::from_code(KERNEL_MIN_GPA, &guest_image(wait, true, rounds));
    let ib = KernelImage::from_code(KERNEL_MIN_GPA, &guest_image(wait, false, 0));
    let a = hv.create_domain(config("pingpong-a", hv.free_domid()), &ia)?;
    let b = hv.create_domain(config("pingpong-b", hv.free_domid()), &ib)?;
    let (pa, pb) = hv.connect(a, b)?;
    for (id, port) in [(a, pa), (b, pb)] {
        let d = hv.domain(id).ok_or(DomainError::BadDomainId(id))?;
        let mem = &d.shared().mem;
        for off in [PORT_OFF, POLL_PORTS_OFF] {
            mem.write_ram(KERNEL_MIN_GPA + off as u64, &port.to_le_bytes())
                .map_err(DomainError::from)?;
        }
    }
    let t0 = Instant::now();
    let running = hv.start();
    let (da, db) = {
        let mut ds = running.domains();
        match (ds.next(), ds.next()) {
            (Some(x), Some(y)) => (x.clone(), y.clone()),
            _ => return Err(BenchError::Guest("evtchn_pingpong: domains missing".into())),
        }
    };
    // DomainShared::request_stop sets the flag, then notifies vcpu_cv under the
    // vcpu_states lock: waiting on it with the flag as predicate misses no stop.
    let stopped = match da.vcpu_states.lock() {
        Ok(g) => match da
            .vcpu_cv
            .wait_timeout_while(g, TIMEOUT, |_| !da.is_stopping())
        {
            Ok((_, r)) => !r.timed_out(),
            Err(_) => false,
        },
        Err(_) => false,
    };
    let t = t0.elapsed();
    db.finish(Outcome::Destroyed);
    if !stopped {
        running.destroy_all();
    }
    let results = running.wait();
    let a_count = {
        let mut b = [0u8; 8];
        da.mem
            .read_ram(KERNEL_MIN_GPA + COUNT_OFF as u64, &mut b)
            .map_err(DomainError::from)?;
        u64::from_le_bytes(b)
    };
    if !stopped {
        let ends: Vec<String> = results
            .iter()
            .map(|r| match &r.report {
                Ok(rep) => format!("{}: {}", r.name, rep.outcome),
                Err(e) => format!("{}: {e}", r.name),
            })
            .collect();
        return Err(BenchError::Guest(format!(
            "evtchn_pingpong ({wait:?}): no end after {TIMEOUT:?}, {a_count} of {rounds} rounds ({})",
            ends.join("; ")
        )));
    }
    for (i, r) in results.iter().enumerate() {
        match &r.report {
            Ok(rep)
                if (i == 0 && matches!(rep.outcome, Outcome::Poweroff { code: 0 }))
                    || (i == 1 && matches!(rep.outcome, Outcome::Destroyed)) => {}
            Ok(rep) => {
                return Err(BenchError::Guest(format!(
                    "evtchn_pingpong ({wait:?}) {}: {}",
                    r.name, rep.outcome
                )))
            }
            Err(e) => return Err(BenchError::Guest(format!("{}: {e}", r.name))),
        }
    }
    if a_count != rounds {
        return Err(BenchError::Guest(format!(
            "evtchn_pingpong ({wait:?}): A handled {a_count} events for {rounds} rounds"
        )));
    }
    Ok(t)
}

/// us per round trip through hv's event channels: the difference of a long and a
/// short run.
pub fn evtchn_once(wait: Wait) -> Result<f64, BenchError> {
    let short = evtchn_round_trips(wait, ROUNDS_SHORT)?;
    let long = evtchn_round_trips(wait, ROUNDS_LONG)?;
    Ok((long.as_secs_f64() - short.as_secs_f64()) * 1e6 / (ROUNDS_LONG - ROUNDS_SHORT) as f64)
}

/// [`evtchn_once`] with upcalls.
pub fn evtchn_pingpong_once(_kvm: &Kvm) -> Result<f64, BenchError> {
    evtchn_once(Wait::Upcall)
}

/// [`evtchn_once`] with `SCHEDOP_POLL`.
pub fn evtchn_pingpong_poll_once(_kvm: &Kvm) -> Result<f64, BenchError> {
    evtchn_once(Wait::Poll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_blocks_fit_their_places() {
        for first in [true, false] {
            let (m, h) = upcall_code(first);
            assert!(m.len() <= HANDLER_OFF, "main {}", m.len());
            assert!(h.len() <= PORT_OFF - HANDLER_OFF, "handler {}", h.len());
            assert!(poll_code(first).len() <= PORT_OFF);
            for w in [Wait::Upcall, Wait::Poll] {
                let img = guest_image(w, first, 5);
                assert_eq!(img.len(), IMAGE_LEN);
                if let Ok(dir) = std::env::var("HV_DUMP_GUESTS") {
                    let name = format!("{dir}/{w:?}-{first}.bin");
                    std::fs::write(name, &img).unwrap();
                }
            }
        }
    }
}
