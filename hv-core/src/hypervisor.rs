//! Several domains in one hypervisor: creation, connections, and running them
//! concurrently.
//!
//! Each domain runs on its own threads (one per vCPU). A domain that crashes or shuts
//! down is destroyed (its event channels and grants released) while the others go
//! on; [`Hypervisor::run`] returns when all have ended, with a report for each.

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::Kvm;

use crate::devices::passthrough::Regions;

use crate::domain::{Domain, DomainConfig, DomainError, DomainReport, MAX_DOMID};
use crate::fdlimit;
use crate::loader::KernelImage;
use crate::registry::Registry;

/// Domains to run together.
pub struct Hypervisor {
    kvm: Kvm,
    registry: Arc<Registry>,
    domains: Vec<Domain>,
}

/// The result of one domain of a [`Hypervisor::run`].
#[derive(Debug)]
pub struct DomainResult {
    /// The domain's name.
    pub name: String,
    /// The domain's id.
    pub domid: u32,
    /// Its report, or why it could not run.
    pub report: Result<DomainReport, DomainError>,
}

impl Hypervisor {
    /// A hypervisor with no domains.
    pub fn new(kvm: Kvm) -> Hypervisor {
        Hypervisor {
            kvm,
            registry: Registry::new(),
            domains: Vec::new(),
        }
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The live domains.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The lowest domain id no created domain uses (starting at 1).
    pub fn free_domid(&self) -> u32 {
        (1..MAX_DOMID)
            .find(|id| !self.domains.iter().any(|d| d.shared().domid == *id))
            .unwrap_or(MAX_DOMID)
    }

    /// Creates a domain (not running yet). Returns its id. A domain that runs out of
    /// file descriptors fails with [`DomainError::FdLimit`], naming the limit and what
    /// the domain needs.
    pub fn create_domain(
        &mut self,
        config: DomainConfig,
        image: &KernelImage,
    ) -> Result<u32, DomainError> {
        let cost = fdlimit::domain_cost(config.vcpus, &config.devices, &config.console_spec);
        let d = Domain::create_in(&self.kvm, &self.registry, config, image).map_err(|e| {
            match fdlimit::limits() {
                Ok(limits) if fdlimit::is_emfile(&e) => {
                    DomainError::FdLimit(fdlimit::FdLimitError {
                        what: e.to_string(),
                        limits,
                        cost,
                    })
                }
                _ => e,
            }
        })?;
        let id = d.shared().domid;
        self.domains.push(d);
        Ok(id)
    }

    /// The created domain with id `domid`.
    pub fn domain(&self, domid: u32) -> Option<&Domain> {
        self.domains.iter().find(|d| d.shared().domid == domid)
    }

    /// Which domain holds each passthrough region (the exclusive assignment).
    pub fn regions(&self) -> &Regions {
        &self.registry.regions
    }

    /// Detaches the passthrough region in file `path` from created domain `domid`: the
    /// region leaves the domain's guest-physical space (a later access by the guest
    /// crashes it), its device entry becomes `CLOSED`, and it can be assigned to
    /// another domain. A region is also released when its domain dies.
    pub fn detach_region(&self, domid: u32, path: &Path) -> Result<(), DomainError> {
        let d = self.domain(domid).ok_or(DomainError::BadDomainId(domid))?;
        let shared = d.shared();
        shared.devices.detach_region(shared, path)?;
        Ok(())
    }

    /// Connects domains `a` and `b` with an interdomain event channel before they run,
    /// and tells each about the other on its command line:
    /// `evtchn.<peer name>=<local port> domid.<peer name>=<peer id>`.
    /// Returns (a's port, b's port).
    pub fn connect(&mut self, a: u32, b: u32) -> Result<(u32, u32), DomainError> {
        let (Some(da), Some(db)) = (self.domain(a), self.domain(b)) else {
            return Err(DomainError::BadDomainId(if self.domain(a).is_none() {
                a
            } else {
                b
            }));
        };
        let (sa, sb) = (da.shared().clone(), db.shared().clone());
        let (pa, pb) = crate::evtchn::connect(&*self.registry, &sa.evtchn, &sb.evtchn)
            .map_err(DomainError::Connect)?;
        sa.append_cmdline(&format!(
            "evtchn.{}={pa} domid.{}={}",
            sb.name, sb.name, sb.domid
        ))?;
        sb.append_cmdline(&format!(
            "evtchn.{}={pb} domid.{}={}",
            sa.name, sa.name, sa.domid
        ))?;
        Ok((pa, pb))
    }

    /// Runs every domain concurrently until all have ended. Results are in creation
    /// order.
    pub fn run(self) -> Vec<DomainResult> {
        self.start().wait()
    }

    /// Starts every domain on its own threads and returns at once.
    pub fn start(self) -> Running {
        let mut domains = Vec::new();
        for d in self.domains {
            let shared = d.shared().clone();
            let name = shared.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("dom-{name}"))
                .spawn(move || d.run())
                .map_err(DomainError::Thread);
            domains.push((shared, spawned));
        }
        Running { domains }
    }
}

/// The thread running one domain (or why it could not start).
type DomainThread = Result<std::thread::JoinHandle<Result<DomainReport, DomainError>>, DomainError>;

/// Domains started by [`Hypervisor::start`].
pub struct Running {
    domains: Vec<(Arc<crate::domain::DomainShared>, DomainThread)>,
}

impl Running {
    /// The running domains' shared state, in creation order.
    pub fn domains(&self) -> impl Iterator<Item = &Arc<crate::domain::DomainShared>> {
        self.domains.iter().map(|(d, _)| d)
    }

    /// Detaches the passthrough region in file `path` from running domain `domid` (see
    /// [`Hypervisor::detach_region`]).
    pub fn detach_region(&self, domid: u32, path: &Path) -> Result<(), DomainError> {
        let shared = self
            .domains()
            .find(|d| d.domid == domid)
            .ok_or(DomainError::BadDomainId(domid))?;
        shared.devices.detach_region(shared, path)?;
        Ok(())
    }

    /// Destroys every domain that is still running (outcome `Destroyed`).
    pub fn destroy_all(&self) {
        for (d, _) in &self.domains {
            d.finish(crate::outcome::Outcome::Destroyed);
        }
    }

    /// Waits until every domain has ended. Results are in creation order.
    pub fn wait(self) -> Vec<DomainResult> {
        self.domains
            .into_iter()
            .map(|(shared, h)| {
                let report = h.and_then(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(DomainError::Thread(std::io::Error::other(
                            "the domain thread panicked",
                        )))
                    })
                });
                DomainResult {
                    name: shared.name.clone(),
                    domid: shared.domid,
                    report,
                }
            })
            .collect()
    }
}
