//! Sleeping until events arrive (SPEC.md §8.3): `SCHEDOP_BLOCK`, `SCHEDOP_POLL`, and
//! the race-free wait loop built on them. Needs the `evtchn` feature.

use hv_abi::sched::{SchedPoll, SCHEDOP_BLOCK, SCHEDOP_POLL, SCHED_POLL_MAX_PORTS};
use hv_abi::{Errno, Op};

use crate::error::{check, Error};
use crate::evtchn::{self, Port};
use crate::hypercall::{hypercall1, hypercall2};
use crate::upcall;
use crate::{time, virt_to_phys};

/// `sched_op(SCHEDOP_BLOCK)`: clears this vCPU's `upcall_mask` and sleeps until its
/// `upcall_pending` is set (returns at once if it already is). The upcall interrupt is
/// then taken as soon as RFLAGS.IF = 1. Prefer [`block_until`], which closes the race
/// between checking a condition and sleeping.
#[inline]
pub fn block() -> Result<(), Error> {
    // SAFETY: no pointer; the vCPU resumes after the `out` (an upcall may run then).
    let ret = unsafe { hypercall1(Op::SchedOp, SCHEDOP_BLOCK) };
    check(ret).map(|_| ())
}

/// `sched_op(SCHEDOP_POLL)`: sleeps until one of `ports` is pending (masked ports
/// count), or system time reaches `timeout_ns` (absolute, [`crate::time`]; 0 = no
/// timeout). Returns at once if one is already pending; the caller checks which.
/// `ports` must hold 1 to 128 valid ports (else `EINVAL`).
pub fn poll(ports: &[Port], timeout_ns: u64) -> Result<(), Error> {
    if ports.is_empty() || ports.len() > SCHED_POLL_MAX_PORTS as usize {
        return Err(Error::Errno(Errno::EINVAL));
    }
    let p = SchedPoll {
        ports_gpa: virt_to_phys(ports.as_ptr()),
        nr_ports: ports.len() as u32,
        reserved: 0,
        timeout: timeout_ns,
    };
    // SAFETY: the hypervisor only reads `p` and the port array, both borrowed for the
    // call and identity-mapped.
    let ret = unsafe {
        hypercall2(
            Op::SchedOp,
            SCHEDOP_POLL,
            virt_to_phys(&p as *const SchedPoll),
        )
    };
    check(ret).map(|_| ())
}

/// Sleeps in `SCHEDOP_BLOCK` until `cond` holds, running event handlers meanwhile.
///
/// `cond` is typically a check of state that event handlers change. The loop follows
/// SPEC §8.3: it sets `upcall_mask` before its last check, so that an event arriving
/// between the check and the block is not missed (it makes `upcall_pending` set, which
/// makes the block return at once); events found pending while masked are dispatched
/// directly with interrupts off. Works with RFLAGS.IF either way; with IF = 1 handlers
/// also run from the upcall interrupt. Returns with `upcall_mask` clear. A failing
/// block (no `evtchn`) makes it spin until `cond` holds.
pub fn block_until(mut cond: impl FnMut() -> bool) {
    let vcpu = upcall::current_vcpu();
    loop {
        if cond() {
            return;
        }
        evtchn::set_upcall_mask(vcpu, true);
        if evtchn::upcall_pending(vcpu) {
            upcall::unmask_upcalls(vcpu);
            continue;
        }
        if cond() {
            upcall::unmask_upcalls(vcpu);
            return;
        }
        if block().is_err() {
            upcall::unmask_upcalls(vcpu);
            core::hint::spin_loop();
        }
    }
}

/// Sleeps in `SCHEDOP_POLL` on `ports` until `cond` holds or system time reaches
/// `deadline_ns` (0: no deadline); returns whether `cond` held.
///
/// Upcalls are masked (`upcall_mask`) while polling, so events raise no interrupt:
/// when the poll returns, whatever arrived is dispatched directly (interrupts off),
/// and `cond` is checked again. The ports should have handlers and be unmasked (a
/// pending masked port makes every poll return at once, turning the wait into a spin
/// until the deadline). Returns with `upcall_mask` clear.
pub fn poll_until(
    ports: &[Port],
    deadline_ns: u64,
    mut cond: impl FnMut() -> bool,
) -> Result<bool, Error> {
    let vcpu = upcall::current_vcpu();
    loop {
        if cond() {
            return Ok(true);
        }
        if deadline_ns != 0 && time::system_time_ns() >= deadline_ns {
            return Ok(false);
        }
        evtchn::set_upcall_mask(vcpu, true);
        let r = if evtchn::upcall_pending(vcpu) || cond() {
            Ok(())
        } else {
            poll(ports, deadline_ns)
        };
        upcall::unmask_upcalls(vcpu);
        r?;
    }
}
