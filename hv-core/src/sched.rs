//! `sched_op` (SPEC §8.3): yield, shutdown, and sleeping until events arrive
//! (`SCHEDOP_BLOCK`, `SCHEDOP_POLL`).
//!
//! Uses the domain's event channels, upcalls and clock; owns nothing.

use hv_abi::sched::{
    SchedPoll, SCHEDOP_BLOCK, SCHEDOP_POLL, SCHEDOP_SHUTDOWN, SCHEDOP_YIELD, SCHED_POLL_MAX_PORTS,
    SHUTDOWN_CODE_MAX, SHUTDOWN_CRASH, SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT,
};
use hv_abi::Errno;

use crate::domain::DomainShared;
use crate::guest_arg;
use crate::outcome::{CrashReason, CrashReport, Outcome};

/// What a `sched_op` asks of the calling vCPU.
#[derive(Debug, PartialEq, Eq)]
pub enum Sched {
    /// Return this result and resume.
    Done(Result<u64, Errno>),
    /// The domain shut down: the vCPU stops.
    Shutdown,
}

/// `sched_op(cmd, reason/arg, code)` from vCPU `vcpu` (SPEC §8.3).
pub fn sched_op(dom: &DomainShared, vcpu: u32, cmd: u64, reason: u64, code: u64) -> Sched {
    match cmd {
        SCHEDOP_YIELD => {
            std::thread::yield_now();
            Sched::Done(Ok(0))
        }
        SCHEDOP_SHUTDOWN => {
            // SPEC §8.3: a code above the maximum is refused whatever the reason.
            if code > SHUTDOWN_CODE_MAX {
                return Sched::Done(Err(Errno::EINVAL));
            }
            let outcome = match reason {
                SHUTDOWN_POWEROFF => match u8::try_from(code) {
                    Ok(code) => Outcome::Poweroff { code },
                    Err(_) => return Sched::Done(Err(Errno::EINVAL)),
                },
                SHUTDOWN_REBOOT => Outcome::Reboot,
                SHUTDOWN_CRASH => Outcome::Crash(Box::new(CrashReport::without_regs(
                    vcpu,
                    CrashReason::GuestCrash,
                ))),
                _ => return Sched::Done(Err(Errno::EINVAL)),
            };
            tracing::debug!(vcpu, %outcome, "guest shutdown");
            dom.finish(outcome);
            Sched::Shutdown
        }
        SCHEDOP_BLOCK => {
            dom.evtchn.clear_upcall_mask(vcpu);
            dom.out_of_guest(vcpu, || {
                dom.upcall.wait_until(None, || {
                    dom.evtchn.upcall_pending(vcpu) || dom.is_stopping()
                })
            });
            // Events that arrived while upcalls were masked raised no interrupt: raise
            // it now, so it is taken as soon as the guest runs with RFLAGS.IF set.
            if dom.evtchn.upcall_pending(vcpu) {
                dom.upcall.raise(vcpu);
            }
            Sched::Done(Ok(0))
        }
        SCHEDOP_POLL => Sched::Done(poll(dom, vcpu, reason)),
        _ => Sched::Done(Err(Errno::EINVAL)),
    }
}

/// `SCHEDOP_POLL`: sleeps until one of the ports is pending or the timeout passes.
fn poll(dom: &DomainShared, vcpu: u32, gpa: u64) -> Result<u64, Errno> {
    let p: SchedPoll = guest_arg::copy_in(&dom.mem, gpa)?;
    if p.reserved != 0 || p.nr_ports == 0 || p.nr_ports > SCHED_POLL_MAX_PORTS {
        return Err(Errno::EINVAL);
    }
    let ports: Vec<u32> = guest_arg::copy_in_array(
        &dom.mem,
        p.ports_gpa,
        u64::from(p.nr_ports),
        u64::from(SCHED_POLL_MAX_PORTS),
    )?;
    let nr = const { crate::conv::imm32(hv_abi::shared_info::NR_EVENT_CHANNELS as u64) };
    if ports.iter().any(|p| *p == 0 || *p >= nr) {
        return Err(Errno::EINVAL);
    }
    let deadline = (p.timeout != 0).then(|| dom.time.instant_of(p.timeout));
    dom.out_of_guest(vcpu, || {
        dom.upcall.wait_until(deadline, || {
            dom.is_stopping() || ports.iter().any(|p| dom.evtchn.is_pending(*p))
        })
    });
    Ok(0)
}
