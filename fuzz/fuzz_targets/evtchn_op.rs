//! Fuzzes the event-channel hypercall (`event_channel_op`) of three domains on plain
//! memory (no KVM): arbitrary commands, arguments (addresses in or out of RAM) and
//! argument contents, and domains dying midway. It must never panic, and after every
//! operation each domain's ports must be consistent with their peers': an
//! interdomain port's peer is alive and points back to it.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use hv_abi::layout::SHARED_INFO_GPA;
use hv_core::evtchn::{
    event_channel_op, EventChannels, EvtchnPeers, HostNotify, PortState, UpcallSink,
};
use hv_core::memory::DomainMemory;
use libfuzzer_sys::fuzz_target;

const DOMS: u32 = 3;
const VCPUS: u32 = 2;
const RAM: u64 = 2 << 20;
/// Where the argument structures are written (a page of RAM above shared_info).
const ARG_AREA: u64 = 0x10000;
/// Ports checked for consistency (allocations land low; a long input allocates at
/// most one port per operation).
const CHECKED_PORTS: u32 = 512;

#[derive(Debug, Default)]
struct Sink;

impl UpcallSink for Sink {
    fn raise(&self, _vcpu: u32) {}
    fn wake_all(&self) {}
}

#[derive(Default)]
struct Peers(Mutex<HashMap<u32, Arc<EventChannels>>>);

impl EvtchnPeers for Peers {
    fn evtchn(&self, domid: u32) -> Option<Arc<EventChannels>> {
        self.0.lock().expect("peers").get(&domid).cloned()
    }
}

struct World {
    peers: Peers,
    mems: &'static [DomainMemory],
    evs: Vec<Arc<EventChannels>>,
}

/// The domains' memory, created once per process (a fresh memfd per run would cost
/// most of the run); every page a run can touch is zeroed at the start of the next,
/// so each run sees fresh memory.
fn memories() -> &'static [DomainMemory] {
    static MEMS: OnceLock<Vec<DomainMemory>> = OnceLock::new();
    let mems = MEMS.get_or_init(|| {
        (1..=DOMS)
            .map(|id| DomainMemory::new(&format!("fuzz{id}"), RAM, 1).expect("memory"))
            .collect()
    });
    let zero = [0u8; 4096];
    for mem in mems {
        for gpa in [SHARED_INFO_GPA, ARG_AREA, ARG_AREA + 4096, RAM - 4096] {
            mem.write_ram(gpa, &zero).expect("zero");
        }
    }
    mems
}

fn world() -> World {
    let mut w = World {
        peers: Peers::default(),
        mems: memories(),
        evs: Vec::new(),
    };
    for (i, mem) in w.mems.iter().enumerate() {
        let id = i as u32 + 1;
        let ev = Arc::new(EventChannels::new(id, VCPUS, mem, Arc::new(Sink)).expect("evtchn"));
        // Port 1: the PV console's, bound to hv's back-end, as in every domain.
        let console = ev
            .alloc_host(HostNotify(Arc::new(|| {})))
            .expect("console port");
        assert_eq!(console.port, 1);
        w.peers.0.lock().expect("peers").insert(id, ev.clone());
        w.evs.push(ev);
    }
    w
}

/// Every live domain's interdomain ports point to a live peer's port that points back.
fn check(w: &World) {
    let live: Vec<u32> = (1..=DOMS)
        .filter(|id| w.peers.evtchn(*id).is_some())
        .collect();
    let states: HashMap<u32, Vec<PortState>> = live
        .iter()
        .map(|&id| {
            let t = w.evs[(id - 1) as usize].lock().expect("port table");
            (id, (0..CHECKED_PORTS).map(|p| t.state(p)).collect())
        })
        .collect();
    for (&id, ports) in &states {
        assert_eq!(ports[0], PortState::Free, "port 0 of domain {id} allocated");
        for (p, s) in ports.iter().enumerate() {
            if let PortState::Interdomain {
                remote,
                remote_port,
            } = *s
            {
                let peer = states
                    .get(&remote)
                    .unwrap_or_else(|| panic!("dom {id} port {p}: peer {remote} is not alive"));
                let back = peer.get(remote_port as usize).copied();
                assert_eq!(
                    back,
                    Some(PortState::Interdomain {
                        remote: id,
                        remote_port: p as u32
                    }),
                    "dom {id} port {p} -> dom {remote} port {remote_port}"
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    // Initial argument-area contents of each domain.
    let (init, ops) = data.split_at(data.len().min(64));
    for mem in w.mems {
        mem.write_ram(ARG_AREA, init).expect("arg area");
    }
    // Each operation: domain, command, argument mode, offset, 8 bytes.
    for op in ops.chunks_exact(12) {
        let idx = usize::from(op[0] % 4);
        let bytes: [u8; 8] = op[4..12].try_into().expect("8 bytes");
        let raw = u64::from_le_bytes(bytes);
        if idx == 3 {
            // A domain dies: out of the registry, then its ports closed.
            let id = u32::from(op[1] % 3) + 1;
            if w.peers.0.lock().expect("peers").remove(&id).is_some() {
                w.evs[(id - 1) as usize].destroy(&w.peers);
            }
            check(&w);
            continue;
        }
        let (ev, mem) = (&w.evs[idx], &w.mems[idx]);
        if w.peers.evtchn(ev.domid()).is_none() {
            continue;
        }
        // Commands 0..=9 and one unknown; sometimes any number.
        let cmd = if op[1] >= 0xF0 {
            raw >> 32
        } else {
            u64::from(op[1] % 11)
        };
        mem.write_ram(ARG_AREA + u64::from(op[3] % 56), &bytes)
            .expect("arg area");
        let arg = match op[2] {
            // A port (SEND, CLOSE, UNMASK) or an address in the argument area.
            0..=127 if matches!(cmd, 3 | 4 | 9) => u64::from(op[2] % 16),
            0..=199 => ARG_AREA + u64::from(op[2] % 64),
            // Straddling the end of RAM.
            200..=230 => RAM - u64::from(op[2] - 199),
            // Beyond RAM, or (so that no run leaves state where the next would find
            // it) within the argument area.
            _ if raw >= RAM => raw,
            _ => ARG_AREA + raw % 4096,
        };
        let _ = event_channel_op(ev, mem, &w.peers, cmd, arg);
        check(&w);
    }
    // Every domain dies; then no port is left interdomain.
    for id in 1..=DOMS {
        if w.peers.0.lock().expect("peers").remove(&id).is_some() {
            w.evs[(id - 1) as usize].destroy(&w.peers);
        }
    }
    for ev in &w.evs {
        let t = ev.lock().expect("port table");
        for p in 0..CHECKED_PORTS {
            assert!(
                !matches!(t.state(p), PortState::Interdomain { .. }),
                "dom {} port {p} still interdomain after every domain died",
                ev.domid()
            );
        }
    }
});
