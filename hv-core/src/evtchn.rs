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
//! thread), and the back-end delivers events to the guest with [`notify_guest`].

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
use zerocopy::{FromBytes, IntoBytes};

use crate::domain::DomainShared;

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
        Ok(p as u32)
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
#[derive(Debug)]
pub struct EventChannels {
    table: Mutex<PortTable>,
    /// Host address of the shared_info page (in the domain's RAM mapping, which lives
    /// as long as the domain).
    shared_info: usize,
    nr_vcpus: u32,
}

impl EventChannels {
    /// Event channels for a domain whose shared_info page is mapped at host address
    /// `shared_info` (page-aligned, valid for the domain's life).
    pub fn new(shared_info: u64, nr_vcpus: u32) -> EventChannels {
        EventChannels {
            table: Mutex::new(PortTable::new(nr_vcpus)),
            shared_info: shared_info as usize,
            nr_vcpus,
        }
    }

    fn si(&self) -> &SharedInfoAtomic {
        // SAFETY: `shared_info` is the page-aligned host address of the shared_info page in the
        // domain's RAM mapping, which outlives `self`; the guest writes it concurrently, so it
        // is only accessed through atomics.
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
    fn notify_vcpu(&self, dom: &DomainShared, port: usize, vcpu: u32) {
        let Some(vi) = self.si().vcpu_info.get(vcpu as usize) else {
            return;
        };
        vi.pending_sel.fetch_or(1 << (port / 64), Ordering::AcqRel);
        let was = vi.upcall_pending.swap(1, Ordering::AcqRel);
        if was == 0 && vi.upcall_mask.load(Ordering::Acquire) == 0 {
            dom.upcall.raise(vcpu);
        }
    }

    /// Delivers an event on `port` to `vcpu` (SPEC 8.6 steps 1-4).
    fn deliver(&self, dom: &DomainShared, port: u32, vcpu: u32) {
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
            self.notify_vcpu(dom, p, vcpu);
        }
        dom.upcall.wake_all();
    }

    fn clear_pending(&self, port: u32) {
        let p = port as usize;
        if p < NR_EVENT_CHANNELS {
            self.si().pending[p / 64].fetch_and(!bit(p), Ordering::AcqRel);
        }
    }
}

fn bit(p: usize) -> u64 {
    1 << (p % 64)
}

/// Resolves a domain id given by a guest (`DOMID_SELF` is the caller).
fn resolve(dom: &DomainShared, domid: u32) -> Result<Arc<DomainShared>, Errno> {
    let id = if domid == u32::from(DOMID_SELF) {
        dom.domid
    } else {
        domid
    };
    dom.registry.get(id).ok_or(Errno::ESRCH)
}

/// Locks the port tables of two domains in domain-id order (one lock if they are the
/// same domain). Returns (a's table, b's table or None when a == b).
fn lock_pair<'a>(
    a: &'a DomainShared,
    b: &'a DomainShared,
) -> Result<(MutexGuard<'a, PortTable>, Option<MutexGuard<'a, PortTable>>), Errno> {
    if a.domid == b.domid {
        return Ok((a.evtchn.lock()?, None));
    }
    if a.domid < b.domid {
        let ga = a.evtchn.lock()?;
        let gb = b.evtchn.lock()?;
        Ok((ga, Some(gb)))
    } else {
        let gb = b.evtchn.lock()?;
        let ga = a.evtchn.lock()?;
        Ok((ga, Some(gb)))
    }
}

/// Allocates a port of `dom` for `remote` to bind (`DOMID_HV`: one of hv's back-ends,
/// through `dev_op`).
pub fn alloc_unbound(dom: &DomainShared, remote: u32) -> Result<u32, Errno> {
    let remote = if remote == u32::from(DOMID_HV) {
        remote
    } else {
        resolve(dom, remote)?.domid
    };
    dom.evtchn.lock()?.alloc(PortState::Unbound { remote }, 0)
}

/// Binds `port` of `dom`, which must be unbound for `DOMID_HV` (else `EINVAL`), to a
/// back-end of hv: from now on a send on it runs `notify`.
pub fn bind_host(dom: &DomainShared, port: u32, notify: HostNotify) -> Result<HostPort, Errno> {
    let p = valid_port(port)?;
    let mut t = dom.evtchn.lock()?;
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

/// Allocates a new port of `dom` bound to a back-end of hv at once (the PV console's
/// port, given to the guest in start_info).
pub fn alloc_host(dom: &DomainShared, notify: HostNotify) -> Result<HostPort, Errno> {
    let id = NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed);
    let mut t = dom.evtchn.lock()?;
    let port = t.alloc(PortState::Host { id }, 0)?;
    t.host.insert(port, notify);
    drop(t);
    dom.evtchn.clear_pending(port);
    Ok(HostPort { port, id })
}

/// The back-end lets go of `hp`: if the guest has not closed or rebound the port
/// meanwhile, it becomes unbound for `DOMID_HV` again (and may be connected anew).
pub fn unbind_host(dom: &DomainShared, hp: HostPort) {
    let Ok(mut t) = dom.evtchn.lock() else { return };
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

/// The back-end of `hp` notifies its guest: an event on the port, if it is still bound
/// to that back-end (else nothing). Returns whether it was.
pub fn notify_guest(dom: &DomainShared, hp: HostPort) -> bool {
    let vcpu = match dom.evtchn.lock() {
        Ok(t) => match t.at(hp.port as usize) {
            Port {
                state: PortState::Host { id },
                vcpu,
            } if id == hp.id => vcpu,
            _ => return false,
        },
        Err(_) => return false,
    };
    dom.evtchn.deliver(dom, hp.port, vcpu);
    true
}

/// Binds a new port of `dom` to `remote_port` of `remote`, which must be unbound and
/// allocated for `dom`. Returns the local port.
pub fn bind_interdomain(
    dom: &DomainShared,
    remote: u32,
    remote_port: u32,
    mark_pending: bool,
) -> Result<u32, Errno> {
    let rdom = resolve(dom, remote)?;
    let rp = valid_port(remote_port)?;
    let (local, port) = {
        let (mut mine, mut theirs) = lock_pair(dom, &rdom)?;
        let rstate = match theirs.as_ref() {
            Some(t) => t.at(rp).state,
            None => mine.at(rp).state,
        };
        if rstate != (PortState::Unbound { remote: dom.domid }) {
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
            remote: dom.domid,
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
    dom.evtchn.clear_pending(local);
    if mark_pending {
        // As Xen: the new port starts pending, so an event sent while the peer's port
        // was unbound (and dropped) is not lost.
        dom.evtchn.deliver(dom, local, port.vcpu);
    }
    Ok(local)
}

/// Binds virtual IRQ `virq` of vCPU `vcpu` to a new port.
pub fn bind_virq(dom: &DomainShared, virq: u32, vcpu: u32) -> Result<u32, Errno> {
    if virq >= NR_VIRQS || vcpu >= dom.evtchn.nr_vcpus {
        return Err(Errno::EINVAL);
    }
    let mut t = dom.evtchn.lock()?;
    if t.virqs[vcpu as usize][virq as usize] != 0 {
        return Err(Errno::EEXIST);
    }
    let port = t.alloc(PortState::Virq(virq), vcpu)?;
    t.virqs[vcpu as usize][virq as usize] = port;
    drop(t);
    dom.evtchn.clear_pending(port);
    Ok(port)
}

/// Allocates an IPI port that notifies vCPU `vcpu`.
pub fn bind_ipi(dom: &DomainShared, vcpu: u32) -> Result<u32, Errno> {
    if vcpu >= dom.evtchn.nr_vcpus {
        return Err(Errno::EINVAL);
    }
    let port = dom.evtchn.lock()?.alloc(PortState::Ipi, vcpu)?;
    dom.evtchn.clear_pending(port);
    Ok(port)
}

/// Closes `port`; an interdomain peer's port becomes unbound (for `dom`).
pub fn close(dom: &DomainShared, port: u32) -> Result<(), Errno> {
    let p = valid_port(port)?;
    let state = dom.evtchn.lock()?.get(port)?.state;
    if let PortState::Interdomain {
        remote,
        remote_port,
    } = state
    {
        if let Some(rdom) = dom.registry.get(remote) {
            let (mut mine, mut theirs) = lock_pair(dom, &rdom)?;
            let rt = match theirs.as_mut() {
                Some(t) => &mut **t,
                None => &mut *mine,
            };
            let back = PortState::Interdomain {
                remote: dom.domid,
                remote_port: port,
            };
            if let Some(rp) = rt.ports.get_mut(remote_port as usize) {
                if rp.state == back {
                    rp.state = PortState::Unbound { remote: dom.domid };
                }
            }
        }
    }
    let mut t = dom.evtchn.lock()?;
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
    dom.evtchn.clear_pending(port);
    Ok(())
}

/// Sends an event on `port`.
pub fn send(dom: &DomainShared, port: u32) -> Result<(), Errno> {
    let (p, host) = {
        let t = dom.evtchn.lock()?;
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
            dom.evtchn.deliver(dom, port, p.vcpu);
            Ok(())
        }
        PortState::Interdomain {
            remote,
            remote_port,
        } => {
            let Some(rdom) = dom.registry.get(remote) else {
                return Ok(());
            };
            let vcpu = {
                let rt = if remote == dom.domid {
                    None
                } else {
                    Some(rdom.evtchn.lock()?)
                };
                let rp = match rt.as_ref() {
                    Some(t) => t.at(remote_port as usize),
                    None => dom.evtchn.lock()?.at(remote_port as usize),
                };
                match rp {
                    Port {
                        state:
                            PortState::Interdomain {
                                remote: r,
                                remote_port: b,
                            },
                        vcpu,
                    } if r == dom.domid && b == port => vcpu,
                    // The peer closed its port meanwhile: dropped, like a send on an
                    // unbound port.
                    _ => return Ok(()),
                }
            };
            rdom.evtchn.deliver(&rdom, remote_port, vcpu);
            Ok(())
        }
    }
}

/// Delivers virtual IRQ `virq` of vCPU `vcpu`, if a port is bound to it.
pub fn raise_virq(dom: &DomainShared, vcpu: u32, virq: u32) {
    let port = dom
        .evtchn
        .lock()
        .ok()
        .and_then(|t| t.virqs.get(vcpu as usize).map(|v| v[virq as usize]))
        .unwrap_or(0);
    if port != 0 {
        dom.evtchn.deliver(dom, port, vcpu);
    }
}

/// The status of `port`.
pub fn status(dom: &DomainShared, port: u32) -> Result<EvtchnStatus, Errno> {
    let p = valid_port(port)?;
    let t = dom.evtchn.lock()?;
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
pub fn bind_vcpu(dom: &DomainShared, port: u32, vcpu: u32) -> Result<(), Errno> {
    let p = valid_port(port)?;
    if vcpu >= dom.evtchn.nr_vcpus {
        return Err(Errno::EINVAL);
    }
    let mut t = dom.evtchn.lock()?;
    match t.get(port)?.state {
        PortState::Unbound { .. } | PortState::Interdomain { .. } | PortState::Host { .. } => {
            if let Some(slot) = t.at_mut(p) {
                slot.vcpu = vcpu;
            }
        }
        _ => return Err(Errno::EINVAL),
    }
    drop(t);
    let si = dom.evtchn.si();
    if si.pending[p / 64].load(Ordering::Acquire) & bit(p) != 0
        && si.mask[p / 64].load(Ordering::Acquire) & bit(p) == 0
    {
        dom.evtchn.notify_vcpu(dom, p, vcpu);
        dom.upcall.wake_all();
    }
    Ok(())
}

/// Clears `port`'s mask bit and delivers it if pending.
pub fn unmask(dom: &DomainShared, port: u32) -> Result<(), Errno> {
    let p = valid_port(port)?;
    let vcpu = dom.evtchn.lock()?.get(port)?.vcpu;
    let si = dom.evtchn.si();
    let old = si.mask[p / 64].fetch_and(!bit(p), Ordering::AcqRel);
    if old & bit(p) != 0 && si.pending[p / 64].load(Ordering::Acquire) & bit(p) != 0 {
        dom.evtchn.notify_vcpu(dom, p, vcpu);
        dom.upcall.wake_all();
    }
    Ok(())
}

/// Connects `a` and `b` with an interdomain channel before they run (for `hv run
/// --config` connections). Returns (a's port, b's port).
pub fn connect(a: &DomainShared, b: &DomainShared) -> Result<(u32, u32), Errno> {
    let pb = alloc_unbound(b, a.domid)?;
    let pa = bind_interdomain(a, b.domid, pb, false)?;
    Ok((pa, pb))
}

/// Closes every port of a dying domain: interdomain peers become unbound.
pub fn destroy(dom: &DomainShared) {
    let ports: Vec<u32> = match dom.evtchn.lock() {
        Ok(t) => (1..t.ports.len() as u32)
            .filter(|p| t.at(*p as usize).state != PortState::Free)
            .collect(),
        Err(_) => return,
    };
    for p in ports {
        let _ = close(dom, p);
    }
}

fn read_arg<T: FromBytes + IntoBytes>(dom: &DomainShared, gpa: u64) -> Result<T, Errno> {
    dom.mem.read_obj(gpa).map_err(|_| Errno::EFAULT)
}

fn write_arg<T: IntoBytes + zerocopy::Immutable>(
    dom: &DomainShared,
    gpa: u64,
    v: &T,
) -> Result<(), Errno> {
    dom.mem.write_obj(gpa, v).map_err(|_| Errno::EFAULT)
}

/// `event_channel_op(cmd, arg)`.
pub fn event_channel_op(dom: &DomainShared, cmd: u64, arg: u64) -> Result<u64, Errno> {
    let port = || u32::try_from(arg).map_err(|_| Errno::EINVAL);
    match cmd {
        EVTCHNOP_SEND => send(dom, port()?).map(|()| 0),
        EVTCHNOP_CLOSE => close(dom, port()?).map(|()| 0),
        EVTCHNOP_UNMASK => unmask(dom, port()?).map(|()| 0),
        EVTCHNOP_ALLOC_UNBOUND => {
            let mut a: EvtchnAllocUnbound = read_arg(dom, arg)?;
            a.port = alloc_unbound(dom, a.remote_dom)?;
            write_arg(dom, arg, &a).inspect_err(|_| {
                let _ = close(dom, a.port);
            })?;
            Ok(0)
        }
        EVTCHNOP_BIND_INTERDOMAIN => {
            let mut a: EvtchnBindInterdomain = read_arg(dom, arg)?;
            if a.reserved != 0 {
                return Err(Errno::EINVAL);
            }
            // The output is checked writable first, so a bound port is never lost.
            write_arg(dom, arg, &a)?;
            a.local_port = bind_interdomain(dom, a.remote_dom, a.remote_port, true)?;
            write_arg(dom, arg, &a)?;
            Ok(0)
        }
        EVTCHNOP_BIND_VIRQ | EVTCHNOP_BIND_IPI | EVTCHNOP_BIND_VCPU => {
            let mut a: EvtchnBindVcpu = read_arg(dom, arg)?;
            if a.reserved != 0 || (cmd != EVTCHNOP_BIND_VIRQ && a.virq != 0) {
                return Err(Errno::EINVAL);
            }
            write_arg(dom, arg, &a)?;
            match cmd {
                EVTCHNOP_BIND_VIRQ => a.port = bind_virq(dom, a.virq, a.vcpu)?,
                EVTCHNOP_BIND_IPI => a.port = bind_ipi(dom, a.vcpu)?,
                _ => bind_vcpu(dom, a.port, a.vcpu)?,
            }
            write_arg(dom, arg, &a)?;
            Ok(0)
        }
        EVTCHNOP_STATUS => {
            let a: EvtchnStatus = read_arg(dom, arg)?;
            if a.reserved != 0 {
                return Err(Errno::EINVAL);
            }
            let s = status(dom, a.port)?;
            write_arg(dom, arg, &s)?;
            Ok(0)
        }
        _ => Err(Errno::EINVAL),
    }
}

/// The guest-physical address of the shared_info page (for the constructor).
pub const SHARED_INFO_GPA: u64 = layout::SHARED_INFO_GPA;
