//! System time and the one-shot timers of `set_timer_op` (SPEC.md 6.3, 8.7).
//!
//! System time is nanoseconds since the domain was created. Each vCPU's
//! `vcpu_time_info` in shared_info lets the guest compute it from `rdtsc` without an
//! exit: the record holds a (TSC, system time) pair sampled when the vCPU starts, and
//! the TSC frequency as Xen's 32.32 multiplier and shift.
//!
//! Timers are served by one process-wide thread that sleeps until the earliest
//! deadline, so a thousand idle domains cost one thread, not a thousand.
//!
//! Each vCPU's timer is a generation number behind a mutex. Setting or cancelling the
//! timer bumps it; an expiry raises `VIRQ_TIMER` only if its generation is still the
//! current one, and checks and raises under the same lock. So once `set_timer_op`
//! returns, no earlier setting of that vCPU's timer can still fire: an expiry either
//! raised its event before the call took the lock, or sees the new generation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use hv_abi::evtchn::VIRQ_TIMER;
use hv_abi::shared_info::{SharedInfo, VcpuInfo, VcpuTimeInfo};
use hv_abi::{layout, Errno};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::evtchn::EventChannels;
use crate::memory::DomainMemory;

/// MSR_IA32_TSC.
const MSR_TSC: u32 = 0x10;

/// A domain's clock and per-vCPU timer state. Expiries raise `VIRQ_TIMER` through
/// the domain's event channels, which it holds.
#[derive(Debug)]
pub struct DomainTime {
    t0: Instant,
    evtchn: Arc<EventChannels>,
    /// Set when the domain stops: no timer fires any more.
    stopped: AtomicBool,
    /// Per vCPU: the timer's generation, bumped whenever it is set or cancelled, so
    /// stale expiries are ignored. Expiries check and raise under this lock.
    timer_gen: Vec<Mutex<u64>>,
}

/// What [`DomainTime::arm`] did with a `set_timer_op` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// The timer was cancelled (timeout 0).
    Cancelled,
    /// The timeout had already passed: the event was raised during the call.
    Raised,
    /// The timer is due at this instant, with this generation (for [`DomainTime::fire`]).
    At(Instant, u64),
}

impl DomainTime {
    /// A clock starting now, for `nr_vcpus` vCPUs, raising timers on `evtchn`.
    pub fn new(nr_vcpus: u32, evtchn: Arc<EventChannels>) -> DomainTime {
        DomainTime {
            t0: Instant::now(),
            evtchn,
            stopped: AtomicBool::new(false),
            timer_gen: (0..nr_vcpus).map(|_| Mutex::new(0)).collect(),
        }
    }

    /// System time now, in ns.
    pub fn now_ns(&self) -> u64 {
        crate::conv::duration_ns(self.t0.elapsed())
    }

    /// The host instant of system time `ns`.
    pub fn instant_of(&self, ns: u64) -> Instant {
        self.t0 + Duration::from_nanos(ns)
    }

    /// Sets vCPU `vcpu`'s one-shot timer to absolute system time `timeout` ns (0
    /// cancels), replacing any earlier setting. A timeout already passed is raised at
    /// once with `raise`, under the timer's lock. `EINVAL` for a vCPU out of range.
    pub fn arm(&self, vcpu: u32, timeout: u64, raise: impl FnOnce()) -> Result<Armed, Errno> {
        let slot = self.timer_gen.get(vcpu as usize).ok_or(Errno::EINVAL)?;
        let mut gen = slot.lock().map_err(|_| Errno::EIO)?;
        *gen = gen.wrapping_add(1);
        if timeout == 0 {
            return Ok(Armed::Cancelled);
        }
        if timeout <= self.now_ns() {
            raise();
            return Ok(Armed::Raised);
        }
        Ok(Armed::At(self.instant_of(timeout), *gen))
    }

    /// An expiry of vCPU `vcpu`'s timer set with generation `gen`: calls `raise` if
    /// that setting is still the current one (not set again, not cancelled), holding
    /// the timer's lock meanwhile so that a concurrent [`arm`](Self::arm) waits for it.
    /// Returns whether it raised.
    pub fn fire(&self, vcpu: u32, gen: u64, raise: impl FnOnce()) -> bool {
        let Some(Ok(current)) = self.timer_gen.get(vcpu as usize).map(Mutex::lock) else {
            return false;
        };
        if *current != gen || self.stopped.load(Ordering::Acquire) {
            return false;
        }
        raise();
        true
    }

    /// The domain is stopping: no timer fires from now on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// `set_timer_op(timeout)` for vCPU `vcpu`: arms its one-shot timer at absolute
    /// system time `timeout` ns (0 cancels), raising `VIRQ_TIMER` when it expires.
    pub fn set_timer_op(self: &Arc<Self>, vcpu: u32, timeout: u64) -> Result<u64, Errno> {
        let armed = self.arm(vcpu, timeout, || self.evtchn.raise_virq(vcpu, VIRQ_TIMER))?;
        let Armed::At(at, gen) = armed else {
            return Ok(0);
        };
        timer_thread()
            .send(TimerReq {
                at,
                time: Arc::downgrade(self),
                vcpu,
                gen,
            })
            .map_err(|_| Errno::EIO)?;
        Ok(0)
    }

    /// Writes the wall clock at system time 0 into shared_info.
    pub fn publish_wallclock(&self, mem: &DomainMemory) {
        let since_t0 = self.t0.elapsed();
        let Some(at_t0) = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| d.checked_sub(since_t0))
        else {
            return;
        };
        let base = layout::SHARED_INFO_GPA;
        let off = |f: usize| base + f as u64;
        let secs = at_t0.as_secs();
        let _ = mem.write_obj(off(core::mem::offset_of!(SharedInfo, wc_version)), &1u32);
        let _ = mem.write_obj(
            off(core::mem::offset_of!(SharedInfo, wc_sec)),
            &u32::try_from(secs & u64::from(u32::MAX)).unwrap_or(0), // low 32 bits; wc_sec_hi below
        );
        let _ = mem.write_obj(
            off(core::mem::offset_of!(SharedInfo, wc_nsec)),
            &at_t0.subsec_nanos(),
        );
        let _ = mem.write_obj(
            off(core::mem::offset_of!(SharedInfo, wc_sec_hi)),
            &((secs >> 32) as u32),
        );
        let _ = mem.write_obj(off(core::mem::offset_of!(SharedInfo, wc_version)), &2u32);
    }

    /// Samples vCPU `vcpu`'s TSC and publishes its `vcpu_time_info`. Runs on the
    /// vCPU's thread before it first enters the guest.
    pub fn publish_vcpu(&self, mem: &DomainMemory, fd: &VcpuFd, vcpu: u32) -> Result<(), String> {
        let khz = fd
            .get_tsc_khz()
            .map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_TSC,
            ..Default::default()
        }])
        .map_err(|e| format!("{e:?}"))?;
        let before = self.now_ns();
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| format!("read the guest TSC: {e}"))?;
        let after = self.now_ns();
        if n != 1 {
            return Err("read the guest TSC: KVM returned no value".into());
        }
        let tsc = msrs.as_slice()[0].data;
        let (mul, shift) = time_scale(u64::from(khz) * 1000);
        let gpa = layout::SHARED_INFO_GPA
            + u64::from(vcpu) * size_of::<VcpuInfo>() as u64
            + core::mem::offset_of!(VcpuInfo, time) as u64;
        let old: VcpuTimeInfo = mem.read_obj(gpa).map_err(|e| e.to_string())?;
        let mut rec = VcpuTimeInfo {
            version: old.version.wrapping_add(1) | 1,
            tsc_timestamp: tsc,
            system_time: before + (after - before) / 2,
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            ..Default::default()
        };
        mem.write_obj(gpa, &rec).map_err(|e| e.to_string())?;
        rec.version = rec.version.wrapping_add(1);
        mem.write_obj(gpa, &rec).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Xen's `set_time_scale`: (multiplier, shift) such that
/// ns = ((tsc_delta << shift, or >> -shift) * multiplier) >> 32.
pub fn time_scale(ticks_per_sec: u64) -> (u32, i8) {
    const NS: u64 = 1_000_000_000;
    let mut tps = ticks_per_sec.max(1);
    let mut shift: i8 = 0;
    while tps > NS * 2 {
        tps >>= 1;
        shift -= 1;
    }
    // tps <= 2e9 < 2^32 after the loop above.
    let mut tps32 = u32::try_from(tps).unwrap_or(u32::MAX);
    while tps32 as u64 <= NS {
        tps32 <<= 1;
        shift += 1;
    }
    // tps32 > NS here, so (NS << 32) / tps32 < 2^32.
    (
        u32::try_from((NS << 32) / u64::from(tps32)).unwrap_or(u32::MAX),
        shift,
    )
}

/// Scales a TSC delta to ns with a (multiplier, shift) pair (what guests do).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta >> shift.unsigned_abs()
    } else {
        delta << shift.unsigned_abs()
    };
    // (d * mul) >> 32 < 2^64 * 2^32 >> 32 = 2^64: always fits.
    u64::try_from((u128::from(d) * u128::from(mul)) >> 32).unwrap_or(u64::MAX)
}

struct TimerReq {
    at: Instant,
    time: Weak<DomainTime>,
    vcpu: u32,
    gen: u64,
}

fn timer_thread() -> &'static Sender<TimerReq> {
    static TX: OnceLock<Sender<TimerReq>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded();
        let spawned = std::thread::Builder::new()
            .name("hv-timers".into())
            .spawn(move || run_timers(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the timer thread");
        }
        tx
    })
}

fn run_timers(rx: Receiver<TimerReq>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut reqs: std::collections::HashMap<u64, TimerReq> = Default::default();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        let got = match next {
            Some(at) => rx.recv_deadline(at),
            None => rx
                .recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(r) => {
                seq += 1;
                heap.push(Reverse((r.at, seq)));
                reqs.insert(seq, r);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while let Some(Reverse((at, id))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(r) = reqs.remove(&id) {
                fire(&r);
            }
        }
    }
}

fn fire(r: &TimerReq) {
    let Some(time) = r.time.upgrade() else {
        return;
    };
    time.fire(r.vcpu, r.gen, || time.evtchn.raise_virq(r.vcpu, VIRQ_TIMER));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    #[derive(Debug)]
    struct NoUpcalls;
    impl crate::evtchn::UpcallSink for NoUpcalls {
        fn raise(&self, _vcpu: u32) {}
        fn wake_all(&self) {}
    }

    /// A clock for `nr_vcpus` vCPUs on plain memory (no KVM).
    fn clock(nr_vcpus: u32) -> DomainTime {
        let mem = DomainMemory::new("time-test", 4 << 20, 1).expect("memory");
        let ev = EventChannels::new(1, nr_vcpus, &mem, Arc::new(NoUpcalls)).expect("evtchn");
        DomainTime::new(nr_vcpus, Arc::new(ev))
    }

    fn armed_at(time: &DomainTime, vcpu: u32, ahead_ns: u64) -> u64 {
        match time.arm(vcpu, time.now_ns() + ahead_ns, || panic!("raised early")) {
            Ok(Armed::At(_, gen)) => gen,
            other => panic!("arm gave {other:?}"),
        }
    }

    #[test]
    fn a_cancel_waits_for_an_expiry_that_is_raising() {
        // The race of defect 2: an expiry has checked the generation and is raising
        // the event when the guest cancels. The cancel must not return before the
        // raise is done (else the guest sees its cancelled timer fire afterwards).
        let time = Arc::new(clock(1));
        let gen = armed_at(&time, 0, 60_000_000_000);
        let raised = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let expiry = {
            let (time, raised) = (time.clone(), raised.clone());
            std::thread::spawn(move || {
                time.fire(0, gen, || {
                    started_tx.send(()).expect("main thread waits");
                    std::thread::sleep(Duration::from_millis(100));
                    raised.store(true, Ordering::SeqCst);
                })
            })
        };
        started_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the expiry started raising");
        assert_eq!(
            time.arm(0, 0, || panic!("a cancel raises nothing")),
            Ok(Armed::Cancelled)
        );
        assert!(
            raised.load(Ordering::SeqCst),
            "the cancel returned while the expiry was still raising"
        );
        assert!(expiry.join().expect("expiry thread"));
        // The cancelled setting is dead now: its expiry raises nothing.
        assert!(!time.fire(0, gen, || panic!("stale expiry raised")));
    }

    #[test]
    fn no_expiry_of_a_cancelled_or_replaced_timer_raises() {
        let time = clock(2);
        let g1 = armed_at(&time, 1, 60_000_000_000);
        let g2 = armed_at(&time, 1, 60_000_000_000);
        assert_ne!(g1, g2);
        assert!(!time.fire(1, g1, || panic!("replaced setting raised")));
        // vCPU 0's timer is independent of vCPU 1's.
        let g0 = armed_at(&time, 0, 60_000_000_000);
        assert!(time.fire(0, g0, || {}));
        assert_eq!(time.arm(1, 0, || {}), Ok(Armed::Cancelled));
        assert!(!time.fire(1, g2, || panic!("cancelled setting raised")));
        assert_eq!(time.arm(2, 0, || {}), Err(Errno::EINVAL));
        assert!(!time.fire(2, 0, || panic!("no such vCPU")));
        // A timeout already passed raises during the call.
        let mut raised = false;
        assert_eq!(time.arm(0, 1, || raised = true), Ok(Armed::Raised));
        assert!(raised);
    }

    #[test]
    fn concurrent_expiries_and_cancels_never_raise_after_a_cancel_returned() {
        // Many rounds of an expiry thread racing a cancel: after each cancel returns,
        // the count of raises must not change any more for that setting.
        let time = Arc::new(clock(1));
        let raises = Arc::new(AtomicU32::new(0));
        for _ in 0..2000 {
            let gen = armed_at(&time, 0, 60_000_000_000);
            let expiry = {
                let (time, raises) = (time.clone(), raises.clone());
                std::thread::spawn(move || {
                    time.fire(0, gen, || {
                        std::thread::yield_now();
                        raises.fetch_add(1, Ordering::SeqCst);
                    })
                })
            };
            std::thread::yield_now();
            time.arm(0, 0, || {}).expect("cancel");
            let after_cancel = raises.load(Ordering::SeqCst);
            let fired = expiry.join().expect("expiry thread");
            assert_eq!(
                raises.load(Ordering::SeqCst),
                after_cancel,
                "an expiry raised after the cancel returned (it fired: {fired})"
            );
        }
    }

    #[test]
    fn scale_matches_frequency() {
        for hz in [
            1_000_000u64,
            999_999_999,
            1_000_000_000,
            2_400_000_000,
            3_187_654_000,
        ] {
            let (mul, shift) = time_scale(hz);
            // One second of ticks is one second of ns, within 1 ppm.
            let ns = scale_delta(hz, mul, shift);
            assert!(
                (ns as i64 - 1_000_000_000).abs() < 1_000,
                "{hz} Hz gives {ns} ns"
            );
        }
    }
}
