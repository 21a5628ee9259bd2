//! Property tests: hv-core's event channels against the reference model
//! (tests::evtchn_model) over random operation sequences on three domains' real event
//! channels, on plain memory (no KVM needed). After every operation the results and
//! everything a guest can observe must agree: each port's status, the pending bits,
//! and `upcall_pending`. And a state round trip: channels rebuilt with `from_state`
//! from `state()` (through JSON) and a copy of shared_info give the same result as the
//! originals for every later operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hv_abi::evtchn::{
    EVTCHNSTAT_CLOSED, EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_IPI, EVTCHNSTAT_UNBOUND, EVTCHNSTAT_VIRQ,
};
use hv_abi::layout::SHARED_INFO_GPA;
use hv_core::evtchn::{EventChannels, EvtchnPeers, EvtchnState, HostNotify, UpcallSink};
use hv_core::memory::DomainMemory;
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

/// How events reach a vCPU, without KVM: raises and wake-ups are counted.
#[derive(Debug, Default)]
struct CountingSink {
    raised: AtomicU64,
    wakes: AtomicU64,
}

impl UpcallSink for CountingSink {
    fn raise(&self, _vcpu: u32) {
        self.raised.fetch_add(1, Ordering::Relaxed);
    }

    fn wake_all(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The live domains' event channels, by id (what the registry is to hv).
#[derive(Default)]
struct Peers(Mutex<HashMap<u32, Arc<EventChannels>>>);

impl EvtchnPeers for Peers {
    fn evtchn(&self, domid: u32) -> Option<Arc<EventChannels>> {
        self.0.lock().expect("peers").get(&domid).cloned()
    }
}

/// Three domains' real event channels on plain memory: no KVM, no vCPUs.
struct Real {
    peers: Peers,
    mems: Vec<DomainMemory>,
    evs: Vec<Arc<EventChannels>>,
}

impl Real {
    fn new() -> Real {
        let mut real = Real {
            peers: Peers::default(),
            mems: Vec::new(),
            evs: Vec::new(),
        };
        for id in 1..=DOMS {
            let mem = DomainMemory::new(&format!("prop{id}"), 4 << 20, 1).expect("memory");
            let ev = Arc::new(
                EventChannels::new(id, VCPUS, &mem, Arc::new(CountingSink::default()))
                    .expect("event channels"),
            );
            // Port 1: the PV console's, bound to hv's back-end (as every domain has).
            let console = ev
                .alloc_host(HostNotify(Arc::new(|| {})))
                .expect("console port");
            assert_eq!(console.port, 1);
            real.add(id, mem, ev);
        }
        real
    }

    fn add(&mut self, id: u32, mem: DomainMemory, ev: Arc<EventChannels>) {
        self.peers.0.lock().expect("peers").insert(id, ev.clone());
        self.mems.push(mem);
        self.evs.push(ev);
    }

    /// A copy of this world rebuilt from each domain's state and a copy of its
    /// shared_info page, in fresh memory.
    fn restored(&self, model: &Model) -> Real {
        let mut copy = Real {
            peers: Peers::default(),
            mems: Vec::new(),
            evs: Vec::new(),
        };
        for id in 1..=DOMS {
            let state = self.ev(id).state().expect("state");
            // Through the serialised form, as a snapshot file would carry it.
            let text = serde_json::to_string(&state).expect("serialise");
            let state: EvtchnState = serde_json::from_str(&text).expect("deserialise");
            let mem = DomainMemory::new(&format!("copy{id}"), 4 << 20, 1).expect("memory");
            let mut page = vec![0u8; 4096];
            self.mem(id)
                .read_ram(SHARED_INFO_GPA, &mut page)
                .expect("read");
            mem.write_ram(SHARED_INFO_GPA, &page).expect("write");
            let ev = Arc::new(
                EventChannels::from_state(&state, &mem, Arc::new(CountingSink::default()))
                    .expect("from_state"),
            );
            if model.doms[&id].alive {
                copy.peers.0.lock().expect("peers").insert(id, ev.clone());
            }
            copy.mems.push(mem);
            copy.evs.push(ev);
        }
        copy
    }

    fn ev(&self, id: u32) -> &Arc<EventChannels> {
        &self.evs[(id - 1) as usize]
    }

    fn mem(&self, id: u32) -> &DomainMemory {
        &self.mems[(id - 1) as usize]
    }

    fn kill(&self, id: u32) {
        self.peers.0.lock().expect("peers").remove(&id);
        self.ev(id).destroy(&self.peers);
    }

    fn word(&self, id: u32, base: u64, p: u32) -> (u64, u64) {
        let gpa = SHARED_INFO_GPA + base + u64::from(p / 64) * 8;
        (gpa, self.mem(id).read_obj::<u64>(gpa).expect("shared_info"))
    }

    fn set_bit(&self, id: u32, base: u64, p: u32, on: bool) {
        let (gpa, w) = self.word(id, base, p);
        let b = 1u64 << (p % 64);
        let w = if on { w | b } else { w & !b };
        self.mem(id).write_obj(gpa, &w).expect("shared_info");
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
        let ev = real.ev(*id);
        for p in 1..=8u32 {
            let s = ev
                .status(p)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
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
                ev.is_pending(p),
                m.pending[p as usize],
                "dom {} port {} pending",
                id,
                p
            );
        }
        for v in 0..VCPUS {
            prop_assert_eq!(
                ev.upcall_pending(v),
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
    let (ev, peers) = (real.ev(d0), &real.peers);
    match *op {
        Op::AllocUnbound(_, rem) => {
            prop_assert_eq!(
                r(ev.alloc_unbound(peers, rem)),
                model.alloc_unbound(d0, rem)
            )
        }
        Op::BindInterdomain(_, rem, p) => prop_assert_eq!(
            r(ev.bind_interdomain(peers, rem, p, true)),
            model.bind_interdomain(d0, rem, p)
        ),
        Op::BindIpi(_, v) => prop_assert_eq!(r(ev.bind_ipi(v)), model.bind_ipi(d0, v)),
        Op::BindVirq(_, q, v) => {
            prop_assert_eq!(r(ev.bind_virq(q, v)), model.bind_virq(d0, q, v))
        }
        Op::Send(_, p) => prop_assert_eq!(r(ev.send(peers, p)), model.send(d0, p)),
        Op::Close(_, p) => prop_assert_eq!(r(ev.close(peers, p)), model.close(d0, p)),
        Op::Unmask(_, p) => prop_assert_eq!(r(ev.unmask(p)), model.unmask(d0, p)),
        Op::BindVcpu(_, p, v) => {
            prop_assert_eq!(r(ev.bind_vcpu(p, v)), model.bind_vcpu(d0, p, v))
        }
        Op::Mask(_, p, on) => {
            real.set_bit(d0, MASK, p, on);
            model.set_mask(d0, p, on);
        }
        Op::Ack(_, p, v) => {
            real.set_bit(d0, PENDING, p, false);
            let gpa = SHARED_INFO_GPA + u64::from(v) * 64;
            real.mem(d0).write_obj(gpa, &0u8).expect("shared_info");
            model.ack(d0, p, v);
        }
        Op::Kill(_) => {
            real.kill(d0);
            model.kill(d0);
        }
    }
    check(real, model)
}

fn model() -> Model {
    let mut model = Model::default();
    for id in 1..=DOMS {
        model.add(id, VCPUS);
    }
    model
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn event_channels_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let real = Real::new();
        let mut model = model();
        for op in &ops {
            apply(&real, &mut model, op)?;
        }
    }

    #[test]
    fn restored_event_channels_behave_as_the_originals(
        before in prop::collection::vec(op(), 0..60),
        after in prop::collection::vec(op(), 1..60),
    ) {
        let real = Real::new();
        let mut model = model();
        for op in &before {
            apply(&real, &mut model, op)?;
        }
        let copy = real.restored(&model);
        let mut copy_model = model.clone();
        for op in &after {
            // Both worlds are checked against the model (and so against each other).
            apply(&real, &mut model, op)?;
            apply(&copy, &mut copy_model, op)?;
        }
        for id in 1..=DOMS {
            prop_assert_eq!(real.ev(id).state().ok(), copy.ev(id).state().ok());
        }
    }
}

#[test]
fn hostile_states_are_refused() {
    let mem = DomainMemory::new("bad", 4 << 20, 1).expect("memory");
    let sink = || -> Arc<dyn UpcallSink> { Arc::new(CountingSink::default()) };
    let ev = EventChannels::new(1, 2, &mem, sink()).expect("event channels");
    ev.bind_virq(0, 1).expect("virq");
    ev.bind_ipi(0).expect("ipi");
    let good = ev.state().expect("state");
    assert!(EventChannels::from_state(&good, &mem, sink()).is_ok());
    type Edit = (&'static str, fn(&mut EvtchnState));
    let edits: [Edit; 8] = [
        ("version", |s| s.version = 99),
        ("no vCPUs", |s| s.nr_vcpus = 0),
        ("too many vCPUs", |s| s.nr_vcpus = 1000),
        ("port 0", |s| s.ports[0].port = 0),
        ("port 4096", |s| s.ports[0].port = 4096),
        ("vCPU out of range", |s| s.ports[0].vcpu = 2),
        ("duplicate port", |s| {
            let p = s.ports[0];
            s.ports.push(p)
        }),
        ("virq out of range", |s| {
            s.ports[0].what = hv_core::evtchn::SavedPort::Virq(100)
        }),
    ];
    for (what, edit) in edits {
        let mut s = good.clone();
        edit(&mut s);
        let e = EventChannels::from_state(&s, &mem, sink());
        assert!(e.is_err(), "{what}: accepted");
    }
}
