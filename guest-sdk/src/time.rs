//! System time, wall clock and the one-shot timer (SPEC.md §6.3, §8.7). Needs the
//! `timer` feature: without it the time records are zero (system time reads as 0)
//! and `set_timer_op` fails.
//!
//! System time is nanoseconds since the domain was created, computed without an exit
//! from the `vcpu_time_info` record in shared_info and `rdtsc`. The timer delivers
//! [`VIRQ_TIMER`](hv_abi::evtchn::VIRQ_TIMER) (bind it with
//! [`evtchn::bind_virq`]) when system time reaches the
//! deadline; [`PeriodicTimer`] re-arms it from the handler to tick.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use hv_abi::layout::SHARED_INFO_GPA;
use hv_abi::shared_info::{SharedInfo, VcpuTimeInfo};
use hv_abi::Op;

use crate::error::{check, Error};
use crate::evtchn;
use crate::hypercall::hypercall1;

/// Scales a TSC delta to nanoseconds with a record's multiplier and shift: the delta
/// is shifted left by `shift` (right if negative), multiplied by `mul` and divided by
/// 2^32 (Xen's `scale_delta`; the same as `hv_core::time::scale_delta`).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    } else {
        delta.checked_shl(shift as u32).unwrap_or(0)
    };
    ((u128::from(d) * u128::from(mul)) >> 32) as u64
}

/// System time at TSC value `tsc` according to record `t`.
pub fn time_at(t: &VcpuTimeInfo, tsc: u64) -> u64 {
    t.system_time.wrapping_add(scale_delta(
        tsc.wrapping_sub(t.tsc_timestamp),
        t.tsc_to_system_mul,
        t.tsc_shift,
    ))
}

/// Reads the time stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no side effect and is allowed at every privilege level
    // unless CR4.TSD is set (hv leaves it clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A consistent copy of vCPU `vcpu`'s time record and a TSC value read while it was
/// current (the version protocol of SPEC §6.3). `None` if `vcpu` >= 32.
pub fn time_info(vcpu: u32) -> Option<(VcpuTimeInfo, u64)> {
    let vi = evtchn::vcpu_info(vcpu)?;
    // SAFETY: the record is in shared_info, identity-mapped for the domain's life; the
    // hypervisor may rewrite it concurrently, so it is read with volatile reads and
    // only used if the version was even and unchanged around the reads.
    unsafe {
        let p = core::ptr::addr_of!((*vi).time);
        let version = core::ptr::addr_of!((*p).version);
        loop {
            let v1 = core::ptr::read_volatile(version);
            fence(Ordering::Acquire);
            let t: VcpuTimeInfo = core::ptr::read_volatile(p);
            let tsc = rdtsc();
            fence(Ordering::Acquire);
            let v2 = core::ptr::read_volatile(version);
            if v1 % 2 == 0 && v1 == v2 {
                return Some((t, tsc));
            }
            core::hint::spin_loop();
        }
    }
}

/// The current system time in nanoseconds, from vCPU 0's record (every vCPU of a
/// domain shares one invariant TSC, so it is right on any vCPU). No exit.
pub fn system_time_ns() -> u64 {
    match time_info(0) {
        Some((t, tsc)) => time_at(&t, tsc),
        None => 0,
    }
}

/// A wall-clock time: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct WallClock {
    /// Seconds since 1970-01-01 00:00:00 UTC.
    pub sec: u64,
    /// Nanoseconds, 0..1_000_000_000.
    pub nsec: u32,
}

/// The wall clock at system time 0 (shared_info's `wc_*` fields, version protocol).
pub fn wallclock_base() -> WallClock {
    let si = SHARED_INFO_GPA as *const SharedInfo;
    // SAFETY: shared_info is identity-mapped for the domain's life; the fields are read
    // with volatile reads and used only if `wc_version` was even and unchanged.
    unsafe {
        let version = core::ptr::addr_of!((*si).wc_version);
        loop {
            let v1 = core::ptr::read_volatile(version);
            fence(Ordering::Acquire);
            let sec = core::ptr::read_volatile(core::ptr::addr_of!((*si).wc_sec));
            let nsec = core::ptr::read_volatile(core::ptr::addr_of!((*si).wc_nsec));
            let hi = core::ptr::read_volatile(core::ptr::addr_of!((*si).wc_sec_hi));
            fence(Ordering::Acquire);
            if v1 % 2 == 0 && v1 == core::ptr::read_volatile(version) {
                return WallClock {
                    sec: u64::from(hi) << 32 | u64::from(sec),
                    nsec,
                };
            }
            core::hint::spin_loop();
        }
    }
}

/// The current wall-clock time: [`wallclock_base`] + [`system_time_ns`].
pub fn wallclock() -> WallClock {
    let base = wallclock_base();
    let total = u64::from(base.nsec) + system_time_ns();
    WallClock {
        sec: base.sec + total / 1_000_000_000,
        nsec: (total % 1_000_000_000) as u32,
    }
}

/// `set_timer_op(deadline_ns)`: arms this vCPU's one-shot timer for absolute system
/// time `deadline_ns` (replacing any armed one; fires at once if it is past). 0
/// cancels.
pub fn set_timer(deadline_ns: u64) -> Result<(), Error> {
    // SAFETY: no pointer; the only effect is a later VIRQ_TIMER event.
    let ret = unsafe { hypercall1(Op::SetTimerOp, deadline_ns) };
    check(ret).map(|_| ())
}

/// Cancels this vCPU's timer (`set_timer_op(0)`).
pub fn cancel_timer() -> Result<(), Error> {
    set_timer(0)
}

/// A periodic tick on one vCPU's one-shot timer, usable as a `static`: [`start`]
/// arms the first deadline, and the `VIRQ_TIMER` handler calls [`on_tick`], which
/// re-arms the next one. Deadlines are `start + k * period`, so the tick does not
/// drift; ticks missed (a deadline already past when re-arming) are skipped and
/// counted.
///
/// [`start`]: PeriodicTimer::start
/// [`on_tick`]: PeriodicTimer::on_tick
#[derive(Debug, Default)]
pub struct PeriodicTimer {
    period: AtomicU64,
    next: AtomicU64,
    missed: AtomicU64,
}

impl PeriodicTimer {
    /// A stopped timer.
    pub const fn new() -> Self {
        PeriodicTimer {
            period: AtomicU64::new(0),
            next: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        }
    }

    /// Starts ticking every `period_ns` (at least 1) from now; returns the first
    /// deadline. Must run on the vCPU whose timer it uses.
    pub fn start(&self, period_ns: u64) -> Result<u64, Error> {
        let period = period_ns.max(1);
        let first = system_time_ns().saturating_add(period);
        self.period.store(period, Ordering::Release);
        self.next.store(first, Ordering::Release);
        self.missed.store(0, Ordering::Release);
        set_timer(first)?;
        Ok(first)
    }

    /// Called on each `VIRQ_TIMER` event: if the timer runs and its deadline has
    /// passed, arms the next deadline and returns `Some(deadline that expired)`;
    /// otherwise (stopped, or an early or stale event) returns `None`.
    pub fn on_tick(&self) -> Option<u64> {
        let period = self.period.load(Ordering::Acquire);
        let due = self.next.load(Ordering::Acquire);
        if period == 0 {
            return None;
        }
        let now = system_time_ns();
        if now < due {
            return None;
        }
        let mut next = due.saturating_add(period);
        if next <= now {
            let behind = (now - due) / period;
            self.missed.fetch_add(behind, Ordering::AcqRel);
            next = due.saturating_add((behind + 1).saturating_mul(period));
        }
        self.next.store(next, Ordering::Release);
        // A failing re-arm leaves the timer stopped; the caller sees no more ticks.
        if set_timer(next).is_err() {
            self.period.store(0, Ordering::Release);
        }
        Some(due)
    }

    /// Stops ticking and cancels the timer.
    pub fn stop(&self) -> Result<(), Error> {
        self.period.store(0, Ordering::Release);
        cancel_timer()
    }

    /// The period in ns, 0 when stopped.
    pub fn period(&self) -> u64 {
        self.period.load(Ordering::Acquire)
    }

    /// Deadlines skipped because they were already past when re-arming.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_like_xen() {
        // 2 GHz TSC: shift 0 and mul 2^31 (half a ns per tick).
        assert_eq!(scale_delta(2_000, 1 << 31, 0), 1_000);
        assert_eq!(scale_delta(2_000, 1 << 31, -1), 500);
        assert_eq!(scale_delta(1_000, 1 << 31, 1), 1_000);
        assert_eq!(
            scale_delta(u64::MAX, u32::MAX, 0),
            ((u128::from(u64::MAX) * u128::from(u32::MAX)) >> 32) as u64
        );
        assert_eq!(scale_delta(1, 1, 100), 0);
        let t = VcpuTimeInfo {
            tsc_timestamp: 1_000,
            system_time: 5,
            tsc_to_system_mul: 1 << 31,
            ..Default::default()
        };
        assert_eq!(time_at(&t, 3_000), 1_005);
    }
}
