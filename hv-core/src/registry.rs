//! The domains of one hypervisor instance, by domain id.
//!
//! Event channels and grant tables reach other domains through here: the registry
//! implements their [`EvtchnPeers`](crate::evtchn::EvtchnPeers) and
//! [`Granters`](crate::grant::Granters), handing out only a domain's event channels or
//! grants. A domain is registered when it is created and removed when it dies, after
//! which it cannot be reached (operations naming it fail with `-ESRCH`).
//!
//! What this module owns: the map of live domains by id and the passthrough regions'
//! assignment. It calls nothing of the domains it holds but their fields.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::devices::passthrough::Regions;
use crate::domain::DomainShared;

/// The live domains, by id.
#[derive(Debug, Default)]
pub struct Registry {
    domains: RwLock<HashMap<u32, Arc<DomainShared>>>,
    /// Which domain holds each passthrough region (exclusive assignment).
    pub regions: Regions,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Adds a domain; false if its id is taken.
    pub fn insert(&self, dom: Arc<DomainShared>) -> bool {
        let Ok(mut m) = self.domains.write() else {
            return false;
        };
        if m.contains_key(&dom.domid) {
            return false;
        }
        m.insert(dom.domid, dom);
        true
    }

    /// Removes a domain (it is dying).
    pub fn remove(&self, domid: u32) -> Option<Arc<DomainShared>> {
        self.domains.write().ok()?.remove(&domid)
    }

    /// The live domain with id `domid`.
    pub fn get(&self, domid: u32) -> Option<Arc<DomainShared>> {
        self.domains.read().ok()?.get(&domid).cloned()
    }

    /// True if `domid` is taken.
    pub fn contains(&self, domid: u32) -> bool {
        self.domains
            .read()
            .map(|m| m.contains_key(&domid))
            .unwrap_or(false)
    }

    /// Number of live domains.
    pub fn len(&self) -> usize {
        self.domains.read().map(|m| m.len()).unwrap_or(0)
    }

    /// True if no domain is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::evtchn::EvtchnPeers for Registry {
    fn evtchn(&self, domid: u32) -> Option<Arc<crate::evtchn::EventChannels>> {
        self.get(domid).map(|d| d.evtchn.clone())
    }
}

impl crate::grant::Granters for Registry {
    fn grants(&self, domid: u32) -> Option<Arc<crate::grant::Grants>> {
        self.get(domid).map(|d| d.grants.clone())
    }
}
