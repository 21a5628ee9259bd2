//! A reference model of event channels (SPEC.md 8.6): port states, the pending and mask
//! bitmaps and each vCPU's `upcall_pending`, for several domains. Written from the
//! specification, independently of hv-core, for property tests.

use std::collections::BTreeMap;

/// Errors, as negative errno values.
pub const EINVAL: i64 = -22;
/// Closed port.
pub const EBADF: i64 = -9;
/// Unknown domain.
pub const ESRCH: i64 = -3;
/// Already bound.
pub const EEXIST: i64 = -17;
/// `DOMID_SELF`.
pub const DOMID_SELF: u32 = 0x7FF0;
/// `DOMID_HV`: hv's own back-ends.
pub const DOMID_HV: u32 = 0x7FF2;
/// Ports in the 2-level ABI.
pub const NR_PORTS: u32 = 4096;

/// A port's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Closed.
    Closed,
    /// Offered to a domain.
    Unbound(u32),
    /// Connected: remote domain and port.
    Interdomain(u32, u32),
    /// Virtual IRQ.
    Virq(u32),
    /// IPI.
    Ipi,
}

/// One domain in the model.
#[derive(Clone, Debug)]
pub struct Dom {
    /// Alive (dead domains are unreachable).
    pub alive: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Allocated ports: state and notified vCPU.
    pub ports: BTreeMap<u32, (State, u32)>,
    /// Pending bits.
    pub pending: Vec<bool>,
    /// Mask bits.
    pub mask: Vec<bool>,
    /// `upcall_pending` per vCPU.
    pub upcall_pending: Vec<bool>,
}

impl Dom {
    fn new(vcpus: u32) -> Dom {
        // Port 1 is the PV console's, bound to hv's back-end (SPEC 8.9.4): to the guest
        // an interdomain port whose peer is `DOMID_HV`, port 0 (an unknown domain, so
        // sends and closes touch no other domain).
        let console = (State::Interdomain(DOMID_HV, 0), 0);
        Dom {
            alive: true,
            vcpus,
            ports: BTreeMap::from([(1, console)]),
            pending: vec![false; NR_PORTS as usize],
            mask: vec![false; NR_PORTS as usize],
            upcall_pending: vec![false; vcpus as usize],
        }
    }

    fn alloc(&mut self, st: State, vcpu: u32) -> u32 {
        let p = (1..NR_PORTS)
            .find(|p| !self.ports.contains_key(p))
            .expect("the model never runs out of ports");
        self.ports.insert(p, (st, vcpu));
        self.pending[p as usize] = false;
        p
    }

    /// The state of a port (Closed when not allocated).
    pub fn state(&self, p: u32) -> (State, u32) {
        self.ports.get(&p).copied().unwrap_or((State::Closed, 0))
    }
}

/// Several domains, by id.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Domains by id.
    pub doms: BTreeMap<u32, Dom>,
}

fn valid(p: u32) -> Result<(), i64> {
    if p == 0 || p >= NR_PORTS {
        Err(EINVAL)
    } else {
        Ok(())
    }
}

impl Model {
    /// Adds domain `id` with `vcpus` vCPUs.
    pub fn add(&mut self, id: u32, vcpus: u32) {
        self.doms.insert(id, Dom::new(vcpus));
    }

    fn resolve(&self, me: u32, id: u32) -> Result<u32, i64> {
        let id = if id == DOMID_SELF { me } else { id };
        match self.doms.get(&id) {
            Some(d) if d.alive => Ok(id),
            _ => Err(ESRCH),
        }
    }

    fn dom(&mut self, id: u32) -> &mut Dom {
        self.doms.get_mut(&id).expect("known domain")
    }

    fn notify(&mut self, d: u32, p: u32, vcpu: u32) {
        let dom = self.dom(d);
        if let Some(u) = dom.upcall_pending.get_mut(vcpu as usize) {
            *u = true;
        }
        let _ = p;
    }

    /// Delivery, steps 1-4.
    pub fn deliver(&mut self, d: u32, p: u32, vcpu: u32) {
        let dom = self.dom(d);
        if dom.pending[p as usize] {
            return;
        }
        dom.pending[p as usize] = true;
        if dom.mask[p as usize] {
            return;
        }
        self.notify(d, p, vcpu);
    }

    /// `EVTCHNOP_ALLOC_UNBOUND`.
    pub fn alloc_unbound(&mut self, d: u32, remote: u32) -> Result<u32, i64> {
        let r = self.resolve(d, remote)?;
        Ok(self.dom(d).alloc(State::Unbound(r), 0))
    }

    /// `EVTCHNOP_BIND_INTERDOMAIN` (the new port starts pending).
    pub fn bind_interdomain(&mut self, d: u32, remote: u32, rport: u32) -> Result<u32, i64> {
        let r = self.resolve(d, remote)?;
        valid(rport)?;
        if self.dom(r).state(rport).0 != State::Unbound(d) {
            return Err(EINVAL);
        }
        let local = self.dom(d).alloc(State::Interdomain(r, rport), 0);
        let v = self.dom(r).state(rport).1;
        self.dom(r)
            .ports
            .insert(rport, (State::Interdomain(d, local), v));
        self.deliver(d, local, 0);
        Ok(local)
    }

    /// `EVTCHNOP_BIND_VIRQ`.
    pub fn bind_virq(&mut self, d: u32, virq: u32, vcpu: u32) -> Result<u32, i64> {
        let dom = self.dom(d);
        if virq >= 1 || vcpu >= dom.vcpus {
            return Err(EINVAL);
        }
        if dom
            .ports
            .values()
            .any(|(s, v)| *s == State::Virq(virq) && *v == vcpu)
        {
            return Err(EEXIST);
        }
        Ok(dom.alloc(State::Virq(virq), vcpu))
    }

    /// `EVTCHNOP_BIND_IPI`.
    pub fn bind_ipi(&mut self, d: u32, vcpu: u32) -> Result<u32, i64> {
        let dom = self.dom(d);
        if vcpu >= dom.vcpus {
            return Err(EINVAL);
        }
        Ok(dom.alloc(State::Ipi, vcpu))
    }

    /// `EVTCHNOP_CLOSE`.
    pub fn close(&mut self, d: u32, p: u32) -> Result<(), i64> {
        valid(p)?;
        let (st, _) = self.dom(d).state(p);
        match st {
            State::Closed => return Err(EBADF),
            State::Interdomain(r, rp) if self.doms.get(&r).is_some_and(|x| x.alive) => {
                let (rst, rv) = self.dom(r).state(rp);
                if rst == State::Interdomain(d, p) {
                    self.dom(r).ports.insert(rp, (State::Unbound(d), rv));
                }
            }
            _ => {}
        }
        let dom = self.dom(d);
        dom.ports.remove(&p);
        dom.pending[p as usize] = false;
        Ok(())
    }

    /// `EVTCHNOP_SEND`.
    pub fn send(&mut self, d: u32, p: u32) -> Result<(), i64> {
        valid(p)?;
        let (st, v) = self.dom(d).state(p);
        match st {
            State::Closed => Err(EBADF),
            State::Unbound(_) => Ok(()),
            State::Virq(_) => Err(EINVAL),
            State::Ipi => {
                self.deliver(d, p, v);
                Ok(())
            }
            State::Interdomain(r, rp) => {
                if !self.doms.get(&r).is_some_and(|x| x.alive) {
                    return Ok(());
                }
                let (rst, rv) = self.dom(r).state(rp);
                if rst == State::Interdomain(d, p) {
                    self.deliver(r, rp, rv);
                }
                Ok(())
            }
        }
    }

    /// `EVTCHNOP_UNMASK`.
    pub fn unmask(&mut self, d: u32, p: u32) -> Result<(), i64> {
        valid(p)?;
        let (st, v) = self.dom(d).state(p);
        if st == State::Closed {
            return Err(EBADF);
        }
        let dom = self.dom(d);
        let was = dom.mask[p as usize];
        dom.mask[p as usize] = false;
        if was && dom.pending[p as usize] {
            self.notify(d, p, v);
        }
        Ok(())
    }

    /// `EVTCHNOP_BIND_VCPU`.
    pub fn bind_vcpu(&mut self, d: u32, p: u32, vcpu: u32) -> Result<(), i64> {
        valid(p)?;
        if vcpu >= self.dom(d).vcpus {
            return Err(EINVAL);
        }
        let (st, _) = self.dom(d).state(p);
        match st {
            State::Closed => return Err(EBADF),
            State::Unbound(_) | State::Interdomain(..) => {}
            _ => return Err(EINVAL),
        }
        self.dom(d).ports.insert(p, (st, vcpu));
        let dom = self.dom(d);
        if dom.pending[p as usize] && !dom.mask[p as usize] {
            self.notify(d, p, vcpu);
        }
        Ok(())
    }

    /// The guest sets or clears a mask bit.
    pub fn set_mask(&mut self, d: u32, p: u32, on: bool) {
        self.dom(d).mask[p as usize] = on;
    }

    /// The guest's handler clears a pending bit and `upcall_pending`.
    pub fn ack(&mut self, d: u32, p: u32, vcpu: u32) {
        let dom = self.dom(d);
        dom.pending[p as usize] = false;
        if let Some(u) = dom.upcall_pending.get_mut(vcpu as usize) {
            *u = false;
        }
    }

    /// The domain dies: every port is closed.
    pub fn kill(&mut self, d: u32) {
        let ports: Vec<u32> = self.dom(d).ports.keys().copied().collect();
        for p in ports {
            let _ = self.close(d, p);
        }
        self.dom(d).alive = false;
    }
}
