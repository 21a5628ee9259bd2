//! System time and the one-shot timers of `set_timer_op` (SPEC.md 6.3, 8.7).
//!
//! System time is nanoseconds since the domain was created. Each vCPU's
//! `vcpu_time_info` in shared_info lets the guest compute it from `rdtsc` without an
//! exit: the record holds a (TSC, system time) pair sampled when the vCPU starts, and
//! the TSC frequency as Xen's 32.32 multiplier and shift.
//!
//! Timers are served by one process-wide thread that sleeps until the earliest
//! deadline, so a thousand idle domains cost one thread, not a thousand.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use hv_abi::evtchn::VIRQ_TIMER;
use hv_abi::shared_info::{SharedInfo, VcpuInfo, VcpuTimeInfo};
use hv_abi::{layout, Errno};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::domain::DomainShared;
use crate::memory::DomainMemory;

/// MSR_IA32_TSC.
const MSR_TSC: u32 = 0x10;

/// A domain's clock and per-vCPU timer state.
#[derive(Debug)]
pub struct DomainTime {
    t0: Instant,
    /// Per vCPU: bumped whenever its timer is set or cancelled, so stale expiries are
    /// ignored.
    timer_gen: Vec<AtomicU64>,
}

impl DomainTime {
    /// A clock starting now, for `nr_vcpus` vCPUs.
    pub fn new(nr_vcpus: u32) -> DomainTime {
        DomainTime {
            t0: Instant::now(),
            timer_gen: (0..nr_vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// System time now, in ns.
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// The host instant of system time `ns`.
    pub fn instant_of(&self, ns: u64) -> Instant {
        self.t0 + Duration::from_nanos(ns)
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
            &(secs as u32),
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
    let mut tps32 = tps as u32;
    while tps32 as u64 <= NS {
        tps32 <<= 1;
        shift += 1;
    }
    (((NS << 32) / u64::from(tps32)) as u32, shift)
}

/// Scales a TSC delta to ns with a (multiplier, shift) pair (what guests do).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta >> (-shift) as u32
    } else {
        delta << shift as u32
    };
    ((u128::from(d) * u128::from(mul)) >> 32) as u64
}

struct TimerReq {
    at: Instant,
    dom: Weak<DomainShared>,
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
    let Some(dom) = r.dom.upgrade() else {
        return;
    };
    let current = dom
        .time
        .timer_gen
        .get(r.vcpu as usize)
        .map(|g| g.load(Ordering::Acquire));
    if current == Some(r.gen) && !dom.is_stopping() {
        crate::evtchn::raise_virq(&dom, r.vcpu, VIRQ_TIMER);
    }
}

/// `set_timer_op(timeout)` for vCPU `vcpu`: arms its one-shot timer at absolute
/// system time `timeout` ns (0 cancels).
pub fn set_timer_op(dom: &DomainShared, vcpu: u32, timeout: u64) -> Result<u64, Errno> {
    let g = dom.time.timer_gen.get(vcpu as usize).ok_or(Errno::EINVAL)?;
    let gen = g.fetch_add(1, Ordering::AcqRel) + 1;
    if timeout == 0 {
        return Ok(0);
    }
    if timeout <= dom.time.now_ns() {
        crate::evtchn::raise_virq(dom, vcpu, VIRQ_TIMER);
        return Ok(0);
    }
    let weak = dom
        .registry
        .get(dom.domid)
        .map(|a| std::sync::Arc::downgrade(&a))
        .ok_or(Errno::ESRCH)?;
    let at = dom.time.instant_of(timeout);
    timer_thread()
        .send(TimerReq {
            at,
            dom: weak,
            vcpu,
            gen,
        })
        .map_err(|_| Errno::EIO)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
