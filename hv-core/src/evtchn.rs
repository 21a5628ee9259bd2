//! Event channels, Xen's 2-level ABI (SPEC.md 8.6).
//!
//! Each domain has a port table (host memory, behind a mutex) and the pending and mask
//! bitmaps in its shared_info page (guest memory, changed with atomic operations so
//! the guest can change them at the same time). Delivery sets the pending bit, and
//! when the port is not masked, the vCPU's selector and `upcall_pending`; it raises
//! the upcall interrupt only when `upcall_pending` goes from 0 to 1 and the vCPU's
//! `upcall_mask` is clear. A flood of sends therefore coalesces in the pending bit.
//!
//! Ports bound to one of hv's own back-ends ([`PortState::Host`], the peer being
//! `DOMID_HV`): a guest's send calls the back-end's [`HostNotify`] (which wakes its
//! thread), and the back-end delivers events to the guest with
//! [`EventChannels::notify_guest`].
//!
//! What this module owns and may call: a domain's [`EventChannels`] own the port
//! table, their view of the shared_info page (through a [`DomainMemory`] handle that
//! keeps it mapped), an [`UpcallSink`] (how an event interrupts a vCPU and wakes the
//! blocked ones) and their domain id. Other domains' channels are found through an
//! [`EvtchnPeers`] passed to each operation that names one (the registry implements
//! it). Nothing here needs KVM: the sink is a trait, the memory plain memory.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hv_abi::device::DOMID_HV;
use hv_abi::evtchn::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindVcpu, EvtchnStatus,
    EVTCHNOP_ALLOC_UNBOUND, EVTCHNOP_BIND_INTERDOMAIN, EVTCHNOP_BIND_IPI, EVTCHNOP_BIND_VCPU,
    EVTCHNOP_BIND_VIRQ, EVTCHNOP_CLOSE, EVTCHNOP_SEND, EVTCHNOP_STATUS, EVTCHNOP_UNMASK,
    EVTCHNSTAT_CLOSED, EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_IPI, EVTCHNSTAT_UNBOUND, EVTCHNSTAT_VIRQ,
    NR_VIRQS,
};
use hv_abi::grant::DOMID_SELF;
use hv_abi::shared_info::{SharedInfo, VcpuInfo, MAX_VCPUS, NR_EVENT_CHANNELS};
use hv_abi::{layout, Errno};

use crate::guest_arg::{copy_in, copy_out};
use crate::memory::DomainMemory;

/// How events reach a domain's vCPUs (implemented by [`crate::upcall::Upcall`]).
pub trait UpcallSink: Send + Sync + fmt::Debug {
    /// Raises the upcall interrupt on vCPU `vcpu`.
    fn raise(&self, vcpu: u32);
    /// Wakes every vCPU sleeping in `SCHEDOP_BLOCK` or `SCHEDOP_POLL` to re-check.
    fn wake_all(&self);
}

/// Finds other live domains' event channels by domain id (implemented by the
/// registry). A domain that died is not found.
pub trait EvtchnPeers {
    /// The event channels of live domain `domid`.
    fn evtchn(&self, domid: u32) -> Option<Arc<EventChannels>>;
}

/// What a port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Not allocated.
    Free,
    /// Allocated for `remote` to bind.
    Unbound {
        /// The domain allowed to bind.
        remote: u32,
    },
    /// Connected to `remote_port` of `remote`.
    Interdomain {
        /// The peer domain.
        remote: u32,
        /// The peer's port.
        remote_port: u32,
    },
    /// Bound to a virtual IRQ.
    Virq(u32),
    /// An inter-processor interrupt port.
    Ipi,
    /// Bound to a back-end of hv itself (peer `DOMID_HV`); `id` names the binding.
    Host {
        /// Which binding ([`HostPort`]); a port bound again gets a new id.
        id: u64,
    },
}

/// What a back-end in hv runs when its guest sends on the port bound to it (from the
/// sending vCPU's thread, with no lock held): typically a wake-up of the back-end's
/// thread. It must not block.
#[derive(Clone)]
pub struct HostNotify(pub Arc<dyn Fn() + Send + Sync>);

impl fmt::Debug for HostNotify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostNotify")
    }
}

/// A port of a domain bound to a back-end of hv ([`bind_host`], [`alloc_host`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// The guest's port number.
    pub port: u32,
    id: u64,
}

/// Binding ids of host ports.
static NEXT_HOST_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Clone, Copy, Debug)]
struct Port {
    state: PortState,
    vcpu: u32,
}

/// A domain's port table. It grows with the highest port allocated (most domains use
/// a handful of ports, and a full table would cost 32 KiB per domain).
#[derive(Debug)]
pub struct PortTable {
    ports: Vec<Port>,
    /// Per vCPU, the port bound to each virtual IRQ (0: none).
    virqs: Vec<[u32; NR_VIRQS as usize]>,
    /// The back-ends behind ports in state `Host`, by port.
    host: HashMap<u32, HostNotify>,
}

impl PortTable {
    fn new(nr_vcpus: u32) -> PortTable {
        PortTable {
            // Port 0 is never allocated.
            ports: vec![FREE],
            virqs: vec![[0; NR_VIRQS as usize]; nr_vcpus as usize],
            host: HashMap::new(),
        }
    }

    fn alloc(&mut self, state: PortState, vcpu: u32) -> Result<u32, Errno> {
        let p = match (1..self.ports.len()).find(|p| self.ports[*p].state == PortState::Free) {
            Some(p) => p,
            None if self.ports.len() < NR_EVENT_CHANNELS => {
                self.ports.push(FREE);
                self.ports.len() - 1
            }
            None => return Err(Errno::ENOSPC),
        };
        self.ports[p] = Port { state, vcpu };
        u32::try_from(p).map_err(|_| Errno::ENOSPC)
    }

    /// Port `p` (Free beyond the table's end).
    fn at(&self, p: usize) -> Port {
        self.ports.get(p).copied().unwrap_or(FREE)
    }

    /// Port `p` for changing; the caller has checked that it is allocated.
    fn at_mut(&mut self, p: usize) -> Option<&mut Port> {
        self.ports.get_mut(p)
    }

    fn get(&self, port: u32) -> Result<Port, Errno> {
        let p = valid_port(port)?;
        let port = self.at(p);
        if port.state == PortState::Free {
            return Err(Errno::EBADF);
        }
        Ok(port)
    }

    /// The state of `port` (Free for out-of-range ports).
    pub fn state(&self, port: u32) -> PortState {
        self.ports
            .get(port as usize)
            .map_or(PortState::Free, |p| p.state)
    }
}

const FREE: Port = Port {
    state: PortState::Free,
    vcpu: 0,
};

fn valid_port(port: u32) -> Result<usize, Errno> {
    if port == 0 || port as usize >= NR_EVENT_CHANNELS {
        return Err(Errno::EINVAL);
    }
    Ok(port as usize)
}

/// The atomically accessed view of a shared_info page.
#[repr(C)]
struct VcpuInfoAtomic {
    upcall_pending: AtomicU8,
    upcall_mask: AtomicU8,
    pad0: [u8; 6],
    pending_sel: AtomicU64,
    rest: [u64; 6],
}

#[repr(C)]
struct SharedInfoAtomic {
    vcpu_info: [VcpuInfoAtomic; MAX_VCPUS],
    pending: [AtomicU64; NR_EVENT_CHANNELS / 64],
    mask: [AtomicU64; NR_EVENT_CHANNELS / 64],
}

const _: () = {
    assert!(size_of::<VcpuInfoAtomic>() == size_of::<VcpuInfo>());
    assert!(core::mem::offset_of!(VcpuInfoAtomic, pending_sel) == 8);
    assert!(
        core::mem::offset_of!(SharedInfoAtomic, pending)
            == core::mem::offset_of!(SharedInfo, evtchn_pending)
    );
    assert!(
        core::mem::offset_of!(SharedInfoAtomic, mask)
            == core::mem::offset_of!(SharedInfo, evtchn_mask)
    );
    assert!(size_of::<SharedInfoAtomic>() <= size_of::<SharedInfo>());
};

/// A domain's event channels.
pub struct EventChannels {
    domid: u32,
    nr_vcpus: u32,
    table: Mutex<PortTable>,
    /// Keeps the mapping of `shared_info` alive.
    mem: DomainMemory,
    /// Host address of the shared_info page inside `mem`'s mapping.
    shared_info: usize,
    upcall: Arc<dyn UpcallSink>,
}

impl fmt::Debug for EventChannels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventChannels")
            .field("domid", &self.domid)
            .field("nr_vcpus", &self.nr_vcpus)
            .finish_non_exhaustive()
    }
}

/// Errors creating event channels.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// The domain's memory has no shared_info page where the layout puts it.
    #[error("the domain's memory has no shared_info page at {0:#x}")]
    NoSharedInfo(u64),
    /// A saved state is not one this hv can rebuild.
    #[error("event-channel state refused: {0}")]
    BadState(String),
}

/// Version of [`EvtchnState`]'s layout.
pub const EVTCHN_STATE_VERSION: u32 = 1;

/// What a saved port is (see [`PortState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedPort {
    /// Allocated for `remote` to bind.
    Unbound {
        /// The domain allowed to bind.
        remote: u32,
    },
    /// Connected to `remote_port` of `remote`.
    Interdomain {
        /// The peer domain.
        remote: u32,
        /// The peer's port.
        remote_port: u32,
    },
    /// Bound to a virtual IRQ.
    Virq(u32),
    /// An inter-processor interrupt port.
    Ipi,
    /// Bound to one of hv's back-ends. Restored without a back-end: sends on it do
    /// nothing until a back-end takes it again ([`EventChannels::take_host`]).
    Host,
}

/// One allocated port of an [`EvtchnState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPortEntry {
    /// The port number.
    pub port: u32,
    /// The vCPU it notifies.
    pub vcpu: u32,
    /// What it is.
    pub what: SavedPort,
}

/// A domain's event channels as plain data: everything but the pending and mask
/// bits and the vCPUs' upcall flags, which live in shared_info (guest memory, saved
/// with it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EvtchnState {
    /// [`EVTCHN_STATE_VERSION`].
    pub version: u32,
    /// The domain id.
    pub domid: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Allocated ports, in port order.
    pub ports: Vec<SavedPortEntry>,
}

impl EventChannels {
    /// Event channels of domain `domid` with `nr_vcpus` vCPUs, whose shared_info page
    /// is at [`layout::SHARED_INFO_GPA`] in `mem`, delivering through `upcall`.
    pub fn new(
        domid: u32,
        nr_vcpus: u32,
        mem: &DomainMemory,
        upcall: Arc<dyn UpcallSink>,
    ) -> Result<EventChannels, EvtchnError> {
        let gpa = layout::SHARED_INFO_GPA;
        mem.check_ram(gpa, size_of::<SharedInfo>() as u64)
            .map_err(|_| EvtchnError::NoSharedInfo(gpa))?;
        let shared_info = mem
            .host_address(gpa)
            .map_err(|_| EvtchnError::NoSharedInfo(gpa))?;
        Ok(EventChannels {
            domid,
            nr_vcpus,
            table: Mutex::new(PortTable::new(nr_vcpus)),
            mem: mem.clone(),
            shared_info: crate::conv::usize_from(shared_info),
            upcall,
        })
    }

    /// The domain id these channels belong to.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// The port table as plain data.
    pub fn state(&self) -> Result<EvtchnState, Errno> {
        let t = self.lock()?;
        let ports = t
            .ports
            .iter()
            .enumerate()
            .filter_map(|(port, p)| {
                let what = match p.state {
                    PortState::Free => return None,
                    PortState::Unbound { remote } => SavedPort::Unbound { remote },
                    PortState::Interdomain {
                        remote,
                        remote_port,
                    } => SavedPort::Interdomain {
                        remote,
                        remote_port,
                    },
                    PortState::Virq(v) => SavedPort::Virq(v),
                    PortState::Ipi => SavedPort::Ipi,
                    PortState::Host { .. } => SavedPort::Host,
                };
                Some(SavedPortEntry {
                    port: u32::try_from(port).ok()?,
                    vcpu: p.vcpu,
                    what,
                })
            })
            .collect();
        Ok(EvtchnState {
            version: EVTCHN_STATE_VERSION,
            domid: self.domid,
            nr_vcpus: self.nr_vcpus,
            ports,
        })
    }

    /// Event channels rebuilt from `state` (checked as hostile input: version, port
    /// numbers, vCPUs, virtual IRQs, duplicates) over `mem` and `upcall`, as
    /// [`new`](Self::new). Peers are not checked here: a restored interdomain port
    /// whose peer is gone behaves as one whose peer died.
    pub fn from_state(
        state: &EvtchnState,
        mem: &DomainMemory,
        upcall: Arc<dyn UpcallSink>,
    ) -> Result<EventChannels, EvtchnError> {
        let bad = |what: String| EvtchnError::BadState(what);
        if state.version != EVTCHN_STATE_VERSION {
            return Err(bad(format!(
                "version {} (this hv reads {EVTCHN_STATE_VERSION})",
                state.version
            )));
        }
        if state.nr_vcpus == 0 || state.nr_vcpus as usize > MAX_VCPUS {
            return Err(bad(format!("{} vCPUs", state.nr_vcpus)));
        }
        let ev = EventChannels::new(state.domid, state.nr_vcpus, mem, upcall)?;
        {
            let mut t = ev.table.lock().map_err(|_| bad("poisoned table".into()))?;
            for e in &state.ports {
                let p = valid_port(e.port).map_err(|_| bad(format!("port {}", e.port)))?;
                if e.vcpu >= state.nr_vcpus {
                    return Err(bad(format!("port {} notifies vCPU {}", e.port, e.vcpu)));
                }
                let st = match e.what {
                    SavedPort::Unbound { remote } => PortState::Unbound { remote },
                    SavedPort::Interdomain {
                        remote,
                        remote_port,
                    } => {
                        valid_port(remote_port)
                            .map_err(|_| bad(format!("port {} peer port", e.port)))?;
                        PortState::Interdomain {
                            remote,
                            remote_port,
                        }
                    }
                    SavedPort::Virq(v) => {
                        let slot = t
                            .virqs
                            .get_mut(e.vcpu as usize)
                            .and_then(|s| s.get_mut(v as usize))
                            .ok_or_else(|| bad(format!("port {} virq {v}", e.port)))?;
                        if *slot != 0 {
                            return Err(bad(format!("virq {v} of vCPU {} twice", e.vcpu)));
                        }
                        *slot = e.port;
                        PortState::Virq(v)
                    }
                    SavedPort::Ipi => PortState::Ipi,
                    SavedPort::Host => PortState::Host {
                        id: NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed),
                    },
                };
                if t.ports.len() <= p {
                    t.ports.resize(p + 1, FREE);
                }
                if t.ports[p].state != PortState::Free {
                    return Err(bad(format!("port {} twice", e.port)));
                }
                t.ports[p] = Port {
                    state: st,
                    vcpu: e.vcpu,
                };
            }
        }
        Ok(ev)
    }

    /// A back-end takes port `port`, restored as bound to hv ([`SavedPort::Host`]),
    /// with `notify`. `EINVAL` unless the port is such a port without a back-end.
    pub fn take_host(&self, port: u32, notify: HostNotify) -> Result<HostPort, Errno> {
        let p = valid_port(port)?;
        let mut t = self.lock()?;
        let PortState::Host { id } = t.at(p).state else {
            return Err(Errno::EINVAL);
        };
        if t.host.contains_key(&port) {
            return Err(Errno::EINVAL);
        }
        t.host.insert(port, notify);
        Ok(HostPort { port, id })
    }

    fn si(&self) -> &SharedInfoAtomic {
        let _keeps_it_mapped = &self.mem;
        // SAFETY: `shared_info` is the page-aligned host address of the shared_info page
        // inside `self.mem`'s mapping (checked in `new`), which `self` keeps alive; the
        // guest writes it concurrently, so it is only accessed through atomics.
        unsafe { &*(self.shared_info as *const SharedInfoAtomic) }
    }

    /// Locks the port table.
    pub fn lock(&self) -> Result<MutexGuard<'_, PortTable>, Errno> {
        self.table.lock().map_err(|_| Errno::EIO)
    }

    /// True if `port`'s pending bit is set.
    pub fn is_pending(&self, port: u32) -> bool {
        let p = port as usize;
        p < NR_EVENT_CHANNELS && self.si().pending[p / 64].load(Ordering::Acquire) & bit(p) != 0
    }

    /// True if vCPU `vcpu` has `upcall_pending` set.
    pub fn upcall_pending(&self, vcpu: u32) -> bool {
        self.si()
            .vcpu_info
            .get(vcpu as usize)
            .is_some_and(|v| v.upcall_pending.load(Ordering::Acquire) != 0)
    }

    /// Clears vCPU `vcpu`'s `upcall_mask` (`SCHEDOP_BLOCK`).
    pub fn clear_upcall_mask(&self, vcpu: u32) {
        if let Some(v) = self.si().vcpu_info.get(vcpu as usize) {
            v.upcall_mask.store(0, Ordering::Release);
        }
    }

    /// Steps 3-4 of delivery: selector, `upcall_pending`, and the interrupt.
    fn notify_vcpu(&self, port: usize, vcpu: u32) {
        let Some(vi) = self.si().vcpu_info.get(vcpu as usize) else {
            return;
        };
        vi.pending_sel.fetch_or(1 << (port / 64), Ordering::AcqRel);
        let was = vi.upcall_pending.swap(1, Ordering::AcqRel);
        if was == 0 && vi.upcall_mask.load(Ordering::Acquire) == 0 {
            self.upcall.raise(vcpu);
        }
    }

    /// Delivers an event on `port` to `vcpu` (SPEC 8.6 steps 1-4).
    fn deliver(&self, port: u32, vcpu: u32) {
        let p = port as usize;
        if p == 0 || p >= NR_EVENT_CHANNELS {
            return;
        }
        let si = self.si();
        let old = si.pending[p / 64].fetch_or(bit(p), Ordering::AcqRel);
        if old & bit(p) != 0 {
            return;
        }
        if si.mask[p / 64].load(Ordering::Acquire) & bit(p) == 0 {
            self.notify_vcpu(p, vcpu);
        }
        self.upcall.wake_all();
    }

    fn clear_pending(&self, port: u32) {
        let p = port as usize;
        if p < NR_EVENT_CHANNELS {
            self.si().pending[p / 64].fetch_and(!bit(p), Ordering::AcqRel);
        }
    }

    /// Resolves a domain id given by a guest (`DOMID_SELF` is this domain).
    fn resolve(&self, peers: &dyn EvtchnPeers, domid: u32) -> Result<Arc<EventChannels>, Errno> {
        let id = if domid == u32::from(DOMID_SELF) {
            self.domid
        } else {
            domid
        };
        peers.evtchn(id).ok_or(Errno::ESRCH)
    }

    /// Allocates a port for `remote` to bind (`DOMID_HV`: one of hv's back-ends,
    /// through `dev_op`).
    pub fn alloc_unbound(&self, peers: &dyn EvtchnPeers, remote: u32) -> Result<u32, Errno> {
        let remote = if remote == u32::from(DOMID_HV) {
            remote
        } else {
            self.resolve(peers, remote)?.domid
        };
        self.lock()?.alloc(PortState::Unbound { remote }, 0)
    }

    /// Binds `port`, which must be unbound for `DOMID_HV` (else `EINVAL`), to a
    /// back-end of hv: from now on a send on it runs `notify`.
    pub fn bind_host(&self, port: u32, notify: HostNotify) -> Result<HostPort, Errno> {
        let p = valid_port(port)?;
        let mut t = self.lock()?;
        if t.at(p).state
            != (PortState::Unbound {
                remote: u32::from(DOMID_HV),
            })
        {
            return Err(Errno::EINVAL);
        }
        let id = NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = t.at_mut(p) {
            slot.state = PortState::Host { id };
        }
        t.host.insert(port, notify);
        Ok(HostPort { port, id })
    }

    /// Allocates a new port bound to a back-end of hv at once (the PV console's port,
    /// given to the guest in start_info).
    pub fn alloc_host(&self, notify: HostNotify) -> Result<HostPort, Errno> {
        let id = NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed);
        let mut t = self.lock()?;
        let port = t.alloc(PortState::Host { id }, 0)?;
        t.host.insert(port, notify);
        drop(t);
        self.clear_pending(port);
        Ok(HostPort { port, id })
    }

    /// The back-end lets go of `hp`: if the guest has not closed or rebound the port
    /// meanwhile, it becomes unbound for `DOMID_HV` again (and may be connected anew).
    pub fn unbind_host(&self, hp: HostPort) {
        let Ok(mut t) = self.lock() else { return };
        let Some(slot) = t.at_mut(hp.port as usize) else {
            return;
        };
        if slot.state == (PortState::Host { id: hp.id }) {
            slot.state = PortState::Unbound {
                remote: u32::from(DOMID_HV),
            };
            t.host.remove(&hp.port);
        }
    }

    /// The back-end of `hp` notifies its guest: an event on the port, if it is still
    /// bound to that back-end (else nothing). Returns whether it was.
    pub fn notify_guest(&self, hp: HostPort) -> bool {
        let vcpu = match self.lock() {
            Ok(t) => match t.at(hp.port as usize) {
                Port {
                    state: PortState::Host { id },
                    vcpu,
                } if id == hp.id => vcpu,
                _ => return false,
            },
            Err(_) => return false,
        };
        self.deliver(hp.port, vcpu);
        true
    }

    /// Binds a new port to `remote_port` of `remote`, which must be unbound and
    /// allocated for this domain. Returns the local port.
    pub fn bind_interdomain(
        &self,
        peers: &dyn EvtchnPeers,
        remote: u32,
        remote_port: u32,
        mark_pending: bool,
    ) -> Result<u32, Errno> {
        let rdom = self.resolve(peers, remote)?;
        let rp = valid_port(remote_port)?;
        let (local, port) = {
            let (mut mine, mut theirs) = lock_pair(self, &rdom)?;
            let rstate = match theirs.as_ref() {
                Some(t) => t.at(rp).state,
                None => mine.at(rp).state,
            };
            if rstate != (PortState::Unbound { remote: self.domid }) {
                return Err(Errno::EINVAL);
            }
            let local = mine.alloc(
                PortState::Interdomain {
                    remote: rdom.domid,
                    remote_port,
                },
                0,
            )?;
            let peer = PortState::Interdomain {
                remote: self.domid,
                remote_port: local,
            };
            let slot = match theirs.as_mut() {
                Some(t) => t.at_mut(rp),
                None => mine.at_mut(rp),
            };
            if let Some(slot) = slot {
                slot.state = peer;
            }
            (local, mine.at(local as usize))
        };
        self.clear_pending(local);
        if mark_pending {
            // As Xen: the new port starts pending, so an event sent while the peer's
            // port was unbound (and dropped) is not lost.
            self.deliver(local, port.vcpu);
        }
        Ok(local)
    }

    /// Binds virtual IRQ `virq` of vCPU `vcpu` to a new port.
    pub fn bind_virq(&self, virq: u32, vcpu: u32) -> Result<u32, Errno> {
        if virq >= NR_VIRQS || vcpu >= self.nr_vcpus {
            return Err(Errno::EINVAL);
        }
        let mut t = self.lock()?;
        if t.virqs[vcpu as usize][virq as usize] != 0 {
            return Err(Errno::EEXIST);
        }
        let port = t.alloc(PortState::Virq(virq), vcpu)?;
        t.virqs[vcpu as usize][virq as usize] = port;
        drop(t);
        self.clear_pending(port);
        Ok(port)
    }

    /// Allocates an IPI port that notifies vCPU `vcpu`.
    pub fn bind_ipi(&self, vcpu: u32) -> Result<u32, Errno> {
        if vcpu >= self.nr_vcpus {
            return Err(Errno::EINVAL);
        }
        let port = self.lock()?.alloc(PortState::Ipi, vcpu)?;
        self.clear_pending(port);
        Ok(port)
    }

    /// Closes `port`; an interdomain peer's port becomes unbound (for this domain).
    pub fn close(&self, peers: &dyn EvtchnPeers, port: u32) -> Result<(), Errno> {
        let p = valid_port(port)?;
        let state = self.lock()?.get(port)?.state;
        if let PortState::Interdomain {
            remote,
            remote_port,
        } = state
        {
            if let Some(rdom) = peers.evtchn(remote) {
                let (mut mine, mut theirs) = lock_pair(self, &rdom)?;
                let rt = match theirs.as_mut() {
                    Some(t) => &mut **t,
                    None => &mut *mine,
                };
                let back = PortState::Interdomain {
                    remote: self.domid,
                    remote_port: port,
                };
                if let Some(rp) = rt.ports.get_mut(remote_port as usize) {
                    if rp.state == back {
                        rp.state = PortState::Unbound { remote: self.domid };
                    }
                }
            }
        }
        let mut t = self.lock()?;
        let old = t.at(p);
        if let PortState::Virq(virq) = old.state {
            if let Some(slot) = t
                .virqs
                .get_mut(old.vcpu as usize)
                .and_then(|s| s.get_mut(virq as usize))
            {
                *slot = 0;
            }
        }
        if let PortState::Host { .. } = old.state {
            t.host.remove(&port);
        }
        if let Some(slot) = t.at_mut(p) {
            *slot = FREE;
        }
        drop(t);
        self.clear_pending(port);
        Ok(())
    }

    /// Sends an event on `port`.
    pub fn send(&self, peers: &dyn EvtchnPeers, port: u32) -> Result<(), Errno> {
        let (p, host) = {
            let t = self.lock()?;
            let p = t.get(port)?;
            (p, t.host.get(&port).cloned())
        };
        match p.state {
            PortState::Free => Err(Errno::EBADF),
            PortState::Host { .. } => {
                if let Some(h) = host {
                    (h.0)();
                }
                Ok(())
            }
            PortState::Unbound { .. } => Ok(()),
            PortState::Virq(_) => Err(Errno::EINVAL),
            PortState::Ipi => {
                self.deliver(port, p.vcpu);
                Ok(())
            }
            PortState::Interdomain {
                remote,
                remote_port,
            } => {
                let Some(rdom) = peers.evtchn(remote) else {
                    return Ok(());
                };
                let rp = rdom.lock()?.at(remote_port as usize);
                let vcpu = match rp {
                    Port {
                        state:
                            PortState::Interdomain {
                                remote: r,
                                remote_port: b,
                            },
                        vcpu,
                    } if r == self.domid && b == port => vcpu,
                    // The peer closed its port meanwhile: dropped, like a send on an
                    // unbound port.
                    _ => return Ok(()),
                };
                rdom.deliver(remote_port, vcpu);
                Ok(())
            }
        }
    }

    /// Delivers virtual IRQ `virq` of vCPU `vcpu`, if a port is bound to it.
    pub fn raise_virq(&self, vcpu: u32, virq: u32) {
        let port = self
            .lock()
            .ok()
            .and_then(|t| {
                t.virqs
                    .get(vcpu as usize)
                    .and_then(|v| v.get(virq as usize).copied())
            })
            .unwrap_or(0);
        if port != 0 {
            self.deliver(port, vcpu);
        }
    }

    /// The status of `port`.
    pub fn status(&self, port: u32) -> Result<EvtchnStatus, Errno> {
        let p = valid_port(port)?;
        let t = self.lock()?;
        let e = t.at(p);
        let mut s = EvtchnStatus {
            port,
            vcpu: e.vcpu,
            ..Default::default()
        };
        match e.state {
            PortState::Free => {
                s.status = EVTCHNSTAT_CLOSED;
                s.vcpu = 0;
            }
            PortState::Unbound { remote } => {
                s.status = EVTCHNSTAT_UNBOUND;
                s.remote_dom_or_virq = remote;
            }
            PortState::Interdomain {
                remote,
                remote_port,
            } => {
                s.status = EVTCHNSTAT_INTERDOMAIN;
                s.remote_dom_or_virq = remote;
                s.remote_port = remote_port;
            }
            PortState::Virq(v) => {
                s.status = EVTCHNSTAT_VIRQ;
                s.remote_dom_or_virq = v;
            }
            PortState::Ipi => s.status = EVTCHNSTAT_IPI,
            PortState::Host { .. } => {
                s.status = EVTCHNSTAT_INTERDOMAIN;
                s.remote_dom_or_virq = u32::from(DOMID_HV);
            }
        }
        Ok(s)
    }

    /// Delivers `port` to vCPU `vcpu` from now on (unbound, interdomain and host ports
    /// only).
    pub fn bind_vcpu(&self, port: u32, vcpu: u32) -> Result<(), Errno> {
        let p = valid_port(port)?;
        if vcpu >= self.nr_vcpus {
            return Err(Errno::EINVAL);
        }
        let mut t = self.lock()?;
        match t.get(port)?.state {
            PortState::Unbound { .. } | PortState::Interdomain { .. } | PortState::Host { .. } => {
                if let Some(slot) = t.at_mut(p) {
                    slot.vcpu = vcpu;
                }
            }
            _ => return Err(Errno::EINVAL),
        }
        drop(t);
        let si = self.si();
        if si.pending[p / 64].load(Ordering::Acquire) & bit(p) != 0
            && si.mask[p / 64].load(Ordering::Acquire) & bit(p) == 0
        {
            self.notify_vcpu(p, vcpu);
            self.upcall.wake_all();
        }
        Ok(())
    }

    /// Clears `port`'s mask bit and delivers it if pending.
    pub fn unmask(&self, port: u32) -> Result<(), Errno> {
        let p = valid_port(port)?;
        let vcpu = self.lock()?.get(port)?.vcpu;
        let si = self.si();
        let old = si.mask[p / 64].fetch_and(!bit(p), Ordering::AcqRel);
        if old & bit(p) != 0 && si.pending[p / 64].load(Ordering::Acquire) & bit(p) != 0 {
            self.notify_vcpu(p, vcpu);
            self.upcall.wake_all();
        }
        Ok(())
    }

    /// Closes every port of a dying domain: interdomain peers become unbound.
    pub fn destroy(&self, peers: &dyn EvtchnPeers) {
        let ports: Vec<u32> = match self.lock() {
            Ok(t) => (1..t.ports.len())
                .filter(|p| t.at(*p).state != PortState::Free)
                .filter_map(|p| u32::try_from(p).ok())
                .collect(),
            Err(_) => return,
        };
        for p in ports {
            let _ = self.close(peers, p);
        }
    }
}

fn bit(p: usize) -> u64 {
    1 << (p % 64)
}

/// Locks the port tables of two domains in domain-id order (one lock if they are the
/// same domain). Returns (a's table, b's table or None when a == b).
fn lock_pair<'a>(
    a: &'a EventChannels,
    b: &'a EventChannels,
) -> Result<(MutexGuard<'a, PortTable>, Option<MutexGuard<'a, PortTable>>), Errno> {
    if a.domid == b.domid {
        return Ok((a.lock()?, None));
    }
    if a.domid < b.domid {
        let ga = a.lock()?;
        let gb = b.lock()?;
        Ok((ga, Some(gb)))
    } else {
        let gb = b.lock()?;
        let ga = a.lock()?;
        Ok((ga, Some(gb)))
    }
}

/// Connects `a` and `b` with an interdomain channel before they run (for `hv run
/// --config` connections). Returns (a's port, b's port).
pub fn connect(
    peers: &dyn EvtchnPeers,
    a: &EventChannels,
    b: &EventChannels,
) -> Result<(u32, u32), Errno> {
    let pb = b.alloc_unbound(peers, a.domid)?;
    let pa = a.bind_interdomain(peers, b.domid, pb, false)?;
    Ok((pa, pb))
}

/// `event_channel_op(cmd, arg)` of the domain owning `ev` (whose memory `mem` holds
/// the argument structures).
pub fn event_channel_op(
    ev: &EventChannels,
    mem: &DomainMemory,
    peers: &dyn EvtchnPeers,
    cmd: u64,
    arg: u64,
) -> Result<u64, Errno> {
    let port = || u32::try_from(arg).map_err(|_| Errno::EINVAL);
    match cmd {
        EVTCHNOP_SEND => ev.send(peers, port()?).map(|()| 0),
        EVTCHNOP_CLOSE => ev.close(peers, port()?).map(|()| 0),
        EVTCHNOP_UNMASK => ev.unmask(port()?).map(|()| 0),
        EVTCHNOP_ALLOC_UNBOUND => {
            let mut a: EvtchnAllocUnbound = copy_in(mem, arg)?;
            a.port = ev.alloc_unbound(peers, a.remote_dom)?;
            copy_out(mem, arg, &a).inspect_err(|_| {
                let _ = ev.close(peers, a.port);
            })?;
            Ok(0)
        }
        EVTCHNOP_BIND_INTERDOMAIN => {
            let mut a: EvtchnBindInterdomain = copy_in(mem, arg)?;
            if a.reserved != 0 {
                return Err(Errno::EINVAL);
            }
            // The output is checked writable first, so a bound port is never lost.
            copy_out(mem, arg, &a)?;
            a.local_port = ev.bind_interdomain(peers, a.remote_dom, a.remote_port, true)?;
            copy_out(mem, arg, &a)?;
            Ok(0)
        }
        EVTCHNOP_BIND_VIRQ | EVTCHNOP_BIND_IPI | EVTCHNOP_BIND_VCPU => {
            let mut a: EvtchnBindVcpu = copy_in(mem, arg)?;
            if a.reserved != 0 || (cmd != EVTCHNOP_BIND_VIRQ && a.virq != 0) {
                return Err(Errno::EINVAL);
            }
            copy_out(mem, arg, &a)?;
            match cmd {
                EVTCHNOP_BIND_VIRQ => a.port = ev.bind_virq(a.virq, a.vcpu)?,
                EVTCHNOP_BIND_IPI => a.port = ev.bind_ipi(a.vcpu)?,
                _ => ev.bind_vcpu(a.port, a.vcpu)?,
            }
            copy_out(mem, arg, &a)?;
            Ok(0)
        }
        EVTCHNOP_STATUS => {
            let a: EvtchnStatus = copy_in(mem, arg)?;
            if a.reserved != 0 {
                return Err(Errno::EINVAL);
            }
            let s = ev.status(a.port)?;
            copy_out(mem, arg, &s)?;
            Ok(0)
        }
        _ => Err(Errno::EINVAL),
    }
}
