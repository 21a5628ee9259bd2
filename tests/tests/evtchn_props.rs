//! Property test: hv-core's event channels against the reference model
//! (tests::evtchn_model) over random operation sequences on three real (created, not
//! running) domains. After every operation the results and everything a guest can
//! observe must agree: each port's status, the pending bits, and `upcall_pending`.

use std::sync::Arc;

use hv_abi::evtchn::{
    EVTCHNSTAT_CLOSED, EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_IPI, EVTCHNSTAT_UNBOUND, EVTCHNSTAT_VIRQ,
};
use hv_abi::layout::SHARED_INFO_GPA;
use hv_core::domain::{Domain, DomainShared};
use hv_core::evtchn;
use hv_core::registry::Registry;
use hv_core::{ConsoleSink, DomainConfig, KernelImage};
use proptest::prelude::*;
use tests::evtchn_model::{Model, State, DOMID_SELF};

const DOMS: u32 = 3;
const VCPUS: u32 = 2;
/// Ports the operations name: 0 (invalid), 1..=8 (where allocations land), and 4096.
const PORTS: [u32; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 4096];

#[derive(Clone, Debug)]
enum Op {
    AllocUnbound(u32, u32),
    BindInterdomain(u32, u32, u32),
    BindIpi(u32, u32),
    BindVirq(u32, u32, u32),
    Send(u32, u32),
    Close(u32, u32),
    Unmask(u32, u32),
    BindVcpu(u32, u32, u32),
    Mask(u32, u32, bool),
    Ack(u32, u32, u32),
    Kill(u32),
}

fn dom() -> impl Strategy<Value = u32> {
    1..=DOMS
}

fn remote() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 1..=DOMS, 1 => Just(DOMID_SELF), 1 => Just(77u32)]
}

fn port() -> impl Strategy<Value = u32> {
    prop::sample::select(PORTS.to_vec())
}

fn vcpu() -> impl Strategy<Value = u32> {
    0..=VCPUS
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (dom(), remote()).prop_map(|(d, r)| Op::AllocUnbound(d, r)),
        4 => (dom(), remote(), port()).prop_map(|(d, r, p)| Op::BindInterdomain(d, r, p)),
        2 => (dom(), vcpu()).prop_map(|(d, v)| Op::BindIpi(d, v)),
        1 => (dom(), 0..2u32, vcpu()).prop_map(|(d, q, v)| Op::BindVirq(d, q, v)),
        6 => (dom(), port()).prop_map(|(d, p)| Op::Send(d, p)),
        2 => (dom(), port()).prop_map(|(d, p)| Op::Close(d, p)),
        2 => (dom(), port()).prop_map(|(d, p)| Op::Unmask(d, p)),
        1 => (dom(), port(), vcpu()).prop_map(|(d, p, v)| Op::BindVcpu(d, p, v)),
        2 => (dom(), 1..=8u32, any::<bool>()).prop_map(|(d, p, m)| Op::Mask(d, p, m)),
        2 => (dom(), 1..=8u32, 0..VCPUS).prop_map(|(d, p, v)| Op::Ack(d, p, v)),
        1 => dom().prop_map(Op::Kill),
    ]
}

struct Real {
    _registry: Arc<Registry>,
    doms: Vec<Domain>,
}

impl Real {
    fn new() -> Real {
        let image = KernelImage::from_elf(tests::TEST_GUEST).expect("test guest");
        let registry = Registry::new();
        let kvm = tests::kvm();
        let doms = (1..=DOMS)
            .map(|id| {
                let config = DomainConfig {
                    name: format!("prop{id}"),
                    domid: id,
                    vcpus: VCPUS,
                    mem_bytes: 4 << 20,
                    console: ConsoleSink::Discard,
                    ..DomainConfig::default()
                };
                Domain::create_in(&kvm, &registry, config, &image).expect("create domain")
            })
            .collect();
        Real {
            _registry: registry,
            doms,
        }
    }

    fn d(&self, id: u32) -> &Arc<DomainShared> {
        self.doms[(id - 1) as usize].shared()
    }

    fn word(&self, id: u32, base: u64, p: u32) -> (u64, u64) {
        let gpa = SHARED_INFO_GPA + base + u64::from(p / 64) * 8;
        (
            gpa,
            self.d(id).mem.read_obj::<u64>(gpa).expect("shared_info"),
        )
    }

    fn set_bit(&self, id: u32, base: u64, p: u32, on: bool) {
        let (gpa, w) = self.word(id, base, p);
        let b = 1u64 << (p % 64);
        let w = if on { w | b } else { w & !b };
        self.d(id).mem.write_obj(gpa, &w).expect("shared_info");
    }
}

const PENDING: u64 = 2048;
const MASK: u64 = 2560;

fn r<T>(x: Result<T, hv_abi::Errno>) -> Result<T, i64> {
    x.map_err(|e| e.to_ret())
}

fn status_of(st: State) -> (u32, u32, u32) {
    match st {
        State::Closed => (EVTCHNSTAT_CLOSED, 0, 0),
        State::Unbound(d) => (EVTCHNSTAT_UNBOUND, d, 0),
        State::Interdomain(d, p) => (EVTCHNSTAT_INTERDOMAIN, d, p),
        State::Virq(v) => (EVTCHNSTAT_VIRQ, v, 0),
        State::Ipi => (EVTCHNSTAT_IPI, 0, 0),
    }
}

fn check(real: &Real, model: &Model) -> Result<(), TestCaseError> {
    for (id, m) in &model.doms {
        if !m.alive {
            continue;
        }
        let d = real.d(*id);
        for p in 1..=8u32 {
            let s = evtchn::status(d, p).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let (st, v) = m.state(p);
            let (kind, rd, rp) = status_of(st);
            prop_assert_eq!(
                (s.status, s.remote_dom_or_virq, s.remote_port),
                (kind, rd, rp),
                "dom {} port {} status",
                id,
                p
            );
            if st != State::Closed {
                prop_assert_eq!(s.vcpu, v, "dom {} port {} vcpu", id, p);
            }
            prop_assert_eq!(
                d.evtchn.is_pending(p),
                m.pending[p as usize],
                "dom {} port {} pending",
                id,
                p
            );
        }
        for v in 0..VCPUS {
            prop_assert_eq!(
                d.evtchn.upcall_pending(v),
                m.upcall_pending[v as usize],
                "dom {} vcpu {} upcall_pending",
                id,
                v
            );
        }
    }
    Ok(())
}

fn apply(real: &Real, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let alive = |d: u32| model.doms.get(&d).is_some_and(|x| x.alive);
    let d0 = match op {
        Op::AllocUnbound(d, ..)
        | Op::BindInterdomain(d, ..)
        | Op::BindIpi(d, _)
        | Op::BindVirq(d, ..)
        | Op::Send(d, _)
        | Op::Close(d, _)
        | Op::Unmask(d, _)
        | Op::BindVcpu(d, ..)
        | Op::Mask(d, ..)
        | Op::Ack(d, ..)
        | Op::Kill(d) => *d,
    };
    // A dead domain makes no hypercalls.
    if !alive(d0) {
        return Ok(());
    }
    let d = real.d(d0);
    match *op {
        Op::AllocUnbound(_, rem) => {
            prop_assert_eq!(
                r(evtchn::alloc_unbound(d, rem)),
                model.alloc_unbound(d0, rem)
            )
        }
        Op::BindInterdomain(_, rem, p) => prop_assert_eq!(
            r(evtchn::bind_interdomain(d, rem, p, true)),
            model.bind_interdomain(d0, rem, p)
        ),
        Op::BindIpi(_, v) => prop_assert_eq!(r(evtchn::bind_ipi(d, v)), model.bind_ipi(d0, v)),
        Op::BindVirq(_, q, v) => {
            prop_assert_eq!(r(evtchn::bind_virq(d, q, v)), model.bind_virq(d0, q, v))
        }
        Op::Send(_, p) => prop_assert_eq!(r(evtchn::send(d, p)), model.send(d0, p)),
        Op::Close(_, p) => prop_assert_eq!(r(evtchn::close(d, p)), model.close(d0, p)),
        Op::Unmask(_, p) => prop_assert_eq!(r(evtchn::unmask(d, p)), model.unmask(d0, p)),
        Op::BindVcpu(_, p, v) => {
            prop_assert_eq!(r(evtchn::bind_vcpu(d, p, v)), model.bind_vcpu(d0, p, v))
        }
        Op::Mask(_, p, on) => {
            real.set_bit(d0, MASK, p, on);
            model.set_mask(d0, p, on);
        }
        Op::Ack(_, p, v) => {
            real.set_bit(d0, PENDING, p, false);
            let gpa = SHARED_INFO_GPA + u64::from(v) * 64;
            d.mem.write_obj(gpa, &0u8).expect("shared_info");
            model.ack(d0, p, v);
        }
        Op::Kill(_) => {
            d.destroy();
            model.kill(d0);
        }
    }
    check(real, model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn event_channels_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        if !tests::kvm_available() {
            return Ok(());
        }
        let real = Real::new();
        let mut model = Model::default();
        for id in 1..=DOMS {
            model.add(id, VCPUS);
        }
        for op in &ops {
            apply(&real, &mut model, op)?;
        }
    }
}
