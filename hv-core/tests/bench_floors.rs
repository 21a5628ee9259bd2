//! The raw floors of `hv bench` on real KVM: `irq_floor` (two bare guests ping-pong
//! over irqfd/MSI) and `memcpy_4k`, and the event-channel ping-pong on two hv domains.

use hv_core::bench::irq_floor::irq_floor_split;
use hv_core::bench::memcpy::memcpy_4k_once;

mod common;

/// KVM for a test: `None` only when `HV_SKIP_KVM=1` asks to skip; without a usable
/// /dev/kvm otherwise the test fails, loudly.
fn kvm() -> Option<kvm_ioctls::Kvm> {
    if !common::kvm_available() {
        return None;
    }
    Some(hv_core::domain::open_kvm().expect("open /dev/kvm"))
}

#[test]
fn irq_floor_ping_pong_completes_every_round_in_order() {
    let Some(kvm) = kvm() else { return };
    // Each round needs both guests' interrupt handlers to run: a lost interrupt ends the
    // run with an error, and exits out of causal order are refused.
    for rounds in [1, 37] {
        let r = irq_floor_split(&kvm, rounds).expect("ping-pong");
        assert_eq!(r.rounds, rounds);
        assert!(r.total > std::time::Duration::ZERO);
        // The two halves tile the run exactly: B's i-th exit lies between A's i-th
        // and (i+1)-th.
        assert_eq!(r.a_to_b + r.b_to_a, r.total);
        assert!(r.a_to_b > std::time::Duration::ZERO && r.b_to_a > std::time::Duration::ZERO);
    }
    assert!(irq_floor_split(&kvm, 0).is_err());
}

#[test]
fn memcpy_4k_copies_and_reports_a_rate() {
    let Some(kvm) = kvm() else { return };
    let gbs = memcpy_4k_once(&kvm).expect("memcpy_4k (checks the copied bytes)");
    assert!(gbs.is_finite() && gbs > 0.0, "{gbs}");
}

#[test]
fn evtchn_ping_pong_completes_with_both_waits() {
    use hv_core::bench::evtchn::{evtchn_round_trips, Wait};
    if kvm().is_none() {
        return;
    }
    // A powers off only after handling exactly `rounds` events from B (the run checks
    // A's count, A's poweroff and B's destruction); a lost event ends it with an error.
    for wait in [Wait::Upcall, Wait::Poll] {
        for rounds in [1, 25] {
            let t = evtchn_round_trips(wait, rounds).expect("ping-pong");
            assert!(t > std::time::Duration::ZERO, "{wait:?} {rounds}");
        }
        assert!(evtchn_round_trips(wait, 0).is_err());
    }
}
