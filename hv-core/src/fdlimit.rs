//! File descriptors: the process limit (`RLIMIT_NOFILE`) and what each domain costs
//! of it.
//!
//! A domain holds, while it exists, [`FDS_PER_DOMAIN`] descriptors (its memory's memfd
//! and its KVM VM), [`FDS_PER_VCPU`] per vCPU (the KVM vCPU and its upcall eventfd,
//! registered as an irqfd) and one per device file (a disk image, a passthrough
//! region, a console output file; a console input file takes two with its wake-up
//! eventfd, standard input one). Linux's default soft limit, 1024, thus stops near 250
//! one-vCPU domains, so `hv` raises the soft limit to the hard limit at start
//! ([`raise_soft_limit`]), as other VMMs do; a domain that still runs out fails with
//! [`FdLimitError`], which names the limit and the cost.

use thiserror::Error;

use crate::devices::{ConsoleInput, ConsoleSpec, DeviceSpec};

/// Descriptors of every domain: the memfd of its memory and its KVM VM.
pub const FDS_PER_DOMAIN: u64 = 2;
/// Descriptors of every vCPU: the KVM vCPU and its upcall eventfd (irqfd).
pub const FDS_PER_VCPU: u64 = 2;

/// The process's `RLIMIT_NOFILE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The soft limit, in force.
    pub soft: u64,
    /// The hard limit, the most the soft one can be raised to without privilege.
    pub hard: u64,
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: u64| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                v.to_string()
            }
        };
        write!(f, "{} (hard limit {})", show(self.soft), show(self.hard))
    }
}

/// The current `RLIMIT_NOFILE`.
pub fn limits() -> std::io::Result<Limits> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `r`, a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Limits {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a no-op if it is there already).
/// Returns the limits in force afterwards.
pub fn raise_soft_limit() -> std::io::Result<Limits> {
    let l = limits()?;
    if l.soft >= l.hard {
        return Ok(l);
    }
    let r = libc::rlimit {
        rlim_cur: l.hard,
        rlim_max: l.hard,
    };
    // SAFETY: setrlimit reads `r`, a live rlimit; raising the soft limit up to the hard
    // one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    limits()
}

/// Descriptors a domain with `vcpus` vCPUs, `devices` and `console` holds while it
/// exists (see the module documentation).
pub fn domain_cost(vcpus: u32, devices: &[DeviceSpec], console: &ConsoleSpec) -> u64 {
    let console_fds = u64::from(console.output.is_some())
        + match console.input {
            ConsoleInput::None => 0,
            ConsoleInput::Stdin => 1,
            ConsoleInput::File(_) => 2,
        };
    FDS_PER_DOMAIN + FDS_PER_VCPU * u64::from(vcpus) + devices.len() as u64 + console_fds
}

/// A domain could not be created: the process has as many descriptors open as
/// `RLIMIT_NOFILE` allows.
#[derive(Debug, Error)]
#[error(
    "{what}: the process ran out of file descriptors: RLIMIT_NOFILE is {limits}, and this \
     domain holds {cost} while it exists ({FDS_PER_DOMAIN} + {FDS_PER_VCPU} per vCPU + 1 per \
     disk, region or console file); raise the limit (for example `ulimit -n` or \
     `prlimit --nofile`)"
)]
pub struct FdLimitError {
    /// What failed (the error that reported `EMFILE`).
    pub what: String,
    /// The limits in force.
    pub limits: Limits,
    /// The descriptors the failing domain needs.
    pub cost: u64,
}

/// True if `e` or one of its sources is an I/O or KVM error `EMFILE`.
pub fn is_emfile(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::EMFILE) {
                return true;
            }
        }
        if let Some(k) = err.downcast_ref::<kvm_ioctls::Error>() {
            if k.errno() == libc::EMFILE {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::disk::DiskSpec;

    #[test]
    fn costs_and_emfile() {
        let none = ConsoleSpec::default();
        assert_eq!(domain_cost(1, &[], &none), 4);
        assert_eq!(domain_cost(3, &[], &none), 8);
        let disk = DeviceSpec::PvBlock(DiskSpec {
            path: "d.img".into(),
            create_size: None,
            readonly: false,
        });
        let cons = ConsoleSpec {
            output: Some("out.log".into()),
            input: ConsoleInput::File("in.txt".into()),
        };
        assert_eq!(domain_cost(1, &[disk.clone(), disk], &cons), 4 + 2 + 3);

        let emfile =
            crate::upcall::UpcallError::EventFd(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(is_emfile(&emfile));
        let kvm = crate::domain::DomainError::Kvm {
            what: "create VM",
            source: kvm_ioctls::Error::new(libc::EMFILE),
        };
        assert!(is_emfile(&kvm));
        let other = crate::domain::DomainError::Kvm {
            what: "create VM",
            source: kvm_ioctls::Error::new(libc::ENOMEM),
        };
        assert!(!is_emfile(&other));
        let l = limits().unwrap();
        assert!(l.soft <= l.hard);
    }
}
