//! VM exits, classified: what KVM reported plus what the domain has at an address
//! become one [`Exit`], the action the vCPU run loop executes.
//!
//! [`classify`] is a pure function of a [`KvmExit`] (KVM's exit as hv's own data, with
//! the kvm_run page's data buffers borrowed) and a [`MemoryMap`] of the domain; it
//! needs neither KVM nor a domain and is unit-tested on its own. The rules:
//! - `out` to the hypercall port is a hypercall; `in` from it is a stray access.
//! - Other port I/O goes to the domain's devices (a port no device has is found out
//!   when the device table is asked, and crashes the domain then).
//! - An MMIO write into the page-table pool is a trapped page-table write.
//! - Any other MMIO exit at memory the domain has (RAM, the pool, a passthrough
//!   region) means KVM could not access the host page behind it: a **host fault**.
//!   At memory the domain does not have, it is the guest's stray access: a crash.
//! - `KVM_RUN` failing (other than EINTR/EAGAIN, a kick) is a host fault too.
//! - Triple fault, emulation failure, entry failure, HLT and unknown exits crash it.
//!
//! Owns nothing; uses [`crate::outcome`] and [`crate::stats`] for the vocabulary.

use kvm_ioctls::VcpuExit;

use crate::outcome::CrashReason;
use crate::stats::ExitKind;

/// KVM's exit as plain data (`KVM_RUN`'s result), data buffers borrowed from the
/// kvm_run page.
#[derive(Debug)]
pub enum KvmExit<'a> {
    /// `out` to `port`.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `in` from `port`.
    IoIn {
        /// The port.
        port: u16,
        /// Where the value read goes.
        data: &'a mut [u8],
    },
    /// A read KVM could not satisfy from a memslot.
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// Where the value goes.
        data: &'a mut [u8],
    },
    /// A write KVM could not put into a writable memslot.
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// KVM could not fault in guest memory at `gpa` (annotated `KVM_RUN` failure).
    MemoryFault {
        /// Guest-physical address.
        gpa: u64,
    },
    /// Triple fault.
    Shutdown,
    /// Emulation failure.
    InternalError,
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// HLT reached userspace.
    Hlt,
    /// Any other exit.
    Unexpected(String),
    /// `KVM_RUN` was interrupted (a kick): EINTR or EAGAIN.
    Interrupted,
    /// `KVM_RUN` failed with this errno.
    RunFailed {
        /// The errno.
        errno: i32,
    },
}

impl<'a> KvmExit<'a> {
    /// Converts what `VcpuFd::run` returned.
    pub fn from_run(run: Result<VcpuExit<'a>, kvm_ioctls::Error>) -> KvmExit<'a> {
        match run {
            Ok(VcpuExit::IoOut(port, data)) => KvmExit::IoOut { port, data },
            Ok(VcpuExit::IoIn(port, data)) => KvmExit::IoIn { port, data },
            Ok(VcpuExit::MmioRead(gpa, data)) => KvmExit::MmioRead { gpa, data },
            Ok(VcpuExit::MmioWrite(gpa, data)) => KvmExit::MmioWrite { gpa, data },
            // KVM_RUN failed with EFAULT (or EHWPOISON: kvm-ioctls does not say which)
            // on a kernel that annotates the fault with its address.
            Ok(VcpuExit::MemoryFault { gpa, .. }) => KvmExit::MemoryFault { gpa },
            Ok(VcpuExit::Shutdown) => KvmExit::Shutdown,
            Ok(VcpuExit::InternalError) => KvmExit::InternalError,
            Ok(VcpuExit::FailEntry(reason, _cpu)) => KvmExit::FailEntry { reason },
            Ok(VcpuExit::Hlt) => KvmExit::Hlt,
            Ok(other) => KvmExit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => KvmExit::Interrupted,
            Err(e) => KvmExit::RunFailed { errno: e.errno() },
        }
    }
}

/// What a domain has at a guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpaKind {
    /// RAM.
    Ram,
    /// The page-table pool.
    Pool,
    /// An attached passthrough region.
    Region,
    /// Nothing (or something no MMIO exit can come from, such as the grant window).
    Nothing,
}

/// The domain's guest-physical memory map, as [`classify`] needs it.
pub trait MemoryMap {
    /// What the domain has at `gpa`.
    fn gpa_kind(&self, gpa: u64) -> GpaKind;
}

/// What the run loop does about an exit.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Dispatch a hypercall (registers from sync_regs).
    Hypercall,
    /// A guest store into a page-table frame: validate and apply it.
    PageTableWrite {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes stored.
        data: &'a [u8],
    },
    /// `out` to a device port.
    PortOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `in` from a device port.
    PortIn {
        /// The port.
        port: u16,
        /// Where the value goes.
        data: &'a mut [u8],
    },
    /// A kick: re-check the domain's state and re-enter.
    Interrupted,
    /// The host failed: end the domain with a host fault.
    HostFault {
        /// The address, when KVM gave one.
        gpa: Option<u64>,
        /// `KVM_RUN`'s errno (`None`: an MMIO exit at backed memory).
        errno: Option<i32>,
        /// What the domain has at `gpa` (`Nothing` when unknown).
        memory: GpaKind,
    },
    /// The guest did something it may not: crash the domain.
    Crash(ExitKind, CrashReason),
}

impl Exit<'_> {
    /// The statistics bucket of the exit.
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::Hypercall => ExitKind::Hypercall,
            Exit::PageTableWrite { .. } => ExitKind::Mmio,
            Exit::PortOut { .. } | Exit::PortIn { .. } => ExitKind::PortIo,
            Exit::Interrupted => ExitKind::Interrupted,
            Exit::HostFault { errno: None, .. } => ExitKind::Mmio,
            Exit::HostFault { .. } => ExitKind::Other,
            Exit::Crash(k, _) => *k,
        }
    }
}

/// Classifies one exit (see the module documentation for the rules).
pub fn classify<'a>(exit: KvmExit<'a>, map: &impl MemoryMap, hypercall_port: u16) -> Exit<'a> {
    let stray_mmio = |gpa: u64, size: usize, dir: &'static str| match map.gpa_kind(gpa) {
        GpaKind::Nothing => Exit::Crash(
            ExitKind::Mmio,
            CrashReason::UnknownMmio {
                gpa,
                size: u32::try_from(size).unwrap_or(u32::MAX),
                dir,
            },
        ),
        memory => Exit::HostFault {
            gpa: Some(gpa),
            errno: None,
            memory,
        },
    };
    match exit {
        KvmExit::IoOut { port, .. } if port == hypercall_port => Exit::Hypercall,
        KvmExit::IoOut { port, data } => Exit::PortOut { port, data },
        KvmExit::IoIn { port, data } if port == hypercall_port => Exit::Crash(
            ExitKind::PortIo,
            CrashReason::UnknownPort {
                port,
                size: u32::try_from(data.len()).unwrap_or(u32::MAX),
                dir: "in",
            },
        ),
        KvmExit::IoIn { port, data } => Exit::PortIn { port, data },
        KvmExit::MmioWrite { gpa, data } if map.gpa_kind(gpa) == GpaKind::Pool => {
            Exit::PageTableWrite { gpa, data }
        }
        KvmExit::MmioWrite { gpa, data } => stray_mmio(gpa, data.len(), "write"),
        KvmExit::MmioRead { gpa, data } => stray_mmio(gpa, data.len(), "read"),
        KvmExit::MemoryFault { gpa } => Exit::HostFault {
            gpa: Some(gpa),
            errno: Some(libc::EFAULT),
            memory: map.gpa_kind(gpa),
        },
        KvmExit::Shutdown => Exit::Crash(ExitKind::Shutdown, CrashReason::TripleFault),
        KvmExit::InternalError => Exit::Crash(
            ExitKind::InternalError,
            CrashReason::EmulationFailure { suberror: 0 },
        ),
        KvmExit::FailEntry { reason } => {
            Exit::Crash(ExitKind::FailEntry, CrashReason::EntryFailure { reason })
        }
        KvmExit::Hlt => Exit::Crash(ExitKind::Hlt, CrashReason::Halted),
        KvmExit::Unexpected(what) => {
            Exit::Crash(ExitKind::Other, CrashReason::UnexpectedExit(what))
        }
        KvmExit::Interrupted => Exit::Interrupted,
        KvmExit::RunFailed { errno } => Exit::HostFault {
            gpa: None,
            errno: Some(errno),
            memory: GpaKind::Nothing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM below 1 MiB, the pool at 2-3 MiB, a region at 8-9 MiB.
    struct Map;
    impl MemoryMap for Map {
        fn gpa_kind(&self, gpa: u64) -> GpaKind {
            match gpa >> 20 {
                0 => GpaKind::Ram,
                2 => GpaKind::Pool,
                8 => GpaKind::Region,
                _ => GpaKind::Nothing,
            }
        }
    }

    const HC: u16 = 0xE8;

    fn crash_reason(e: Exit<'_>) -> CrashReason {
        match e {
            Exit::Crash(_, r) => r,
            other => panic!("not a crash: {other:?}"),
        }
    }

    #[test]
    fn port_io() {
        let out = [1u8];
        assert!(matches!(
            classify(
                KvmExit::IoOut {
                    port: HC,
                    data: &out
                },
                &Map,
                HC
            ),
            Exit::Hypercall
        ));
        assert!(matches!(
            classify(
                KvmExit::IoOut {
                    port: 0x3F8,
                    data: &out
                },
                &Map,
                HC
            ),
            Exit::PortOut { port: 0x3F8, .. }
        ));
        let mut inb = [0u8; 4];
        let e = classify(
            KvmExit::IoIn {
                port: HC,
                data: &mut inb,
            },
            &Map,
            HC,
        );
        assert!(matches!(
            crash_reason(e),
            CrashReason::UnknownPort {
                port: HC,
                size: 4,
                dir: "in"
            }
        ));
        let e = classify(
            KvmExit::IoIn {
                port: 0x410,
                data: &mut inb,
            },
            &Map,
            HC,
        );
        assert_eq!(e.kind(), ExitKind::PortIo);
        assert!(matches!(e, Exit::PortIn { port: 0x410, .. }));
    }

    #[test]
    fn mmio_by_what_is_at_the_address() {
        let w = [0u8; 8];
        let mut r = [0u8; 8];
        // A store into the pool is a page-table write; a read of it is not.
        assert!(matches!(
            classify(
                KvmExit::MmioWrite {
                    gpa: 0x20_0008,
                    data: &w
                },
                &Map,
                HC
            ),
            Exit::PageTableWrite { gpa: 0x20_0008, .. }
        ));
        assert!(matches!(
            classify(
                KvmExit::MmioRead {
                    gpa: 0x20_0008,
                    data: &mut r
                },
                &Map,
                HC
            ),
            Exit::HostFault {
                gpa: Some(0x20_0008),
                errno: None,
                memory: GpaKind::Pool
            }
        ));
        // Backed memory KVM could not access: the host's fault.
        for (gpa, memory) in [(0x1000, GpaKind::Ram), (0x80_0000, GpaKind::Region)] {
            let e = classify(KvmExit::MmioWrite { gpa, data: &w }, &Map, HC);
            assert_eq!(e.kind(), ExitKind::Mmio);
            assert!(
                matches!(e, Exit::HostFault { gpa: Some(g), errno: None, memory: m } if g == gpa && m == memory)
            );
        }
        // Memory the domain does not have: the guest's stray access.
        let e = classify(
            KvmExit::MmioWrite {
                gpa: 0x40_0000,
                data: &w[..4],
            },
            &Map,
            HC,
        );
        assert!(matches!(
            crash_reason(e),
            CrashReason::UnknownMmio {
                gpa: 0x40_0000,
                size: 4,
                dir: "write"
            }
        ));
        let e = classify(
            KvmExit::MmioRead {
                gpa: 0xFEE0_0000,
                data: &mut r,
            },
            &Map,
            HC,
        );
        assert!(matches!(
            crash_reason(e),
            CrashReason::UnknownMmio {
                dir: "read",
                size: 8,
                ..
            }
        ));
    }

    #[test]
    fn host_failures_and_guest_faults() {
        assert!(matches!(
            classify(
                KvmExit::RunFailed {
                    errno: libc::EFAULT
                },
                &Map,
                HC
            ),
            Exit::HostFault {
                gpa: None,
                errno: Some(libc::EFAULT),
                memory: GpaKind::Nothing
            }
        ));
        let e = classify(KvmExit::MemoryFault { gpa: 0x80_1000 }, &Map, HC);
        assert_eq!(e.kind(), ExitKind::Other);
        assert!(matches!(
            e,
            Exit::HostFault {
                gpa: Some(0x80_1000),
                errno: Some(libc::EFAULT),
                memory: GpaKind::Region
            }
        ));
        assert!(matches!(
            classify(KvmExit::Interrupted, &Map, HC),
            Exit::Interrupted
        ));
        assert!(matches!(
            crash_reason(classify(KvmExit::Shutdown, &Map, HC)),
            CrashReason::TripleFault
        ));
        assert!(matches!(
            crash_reason(classify(KvmExit::Hlt, &Map, HC)),
            CrashReason::Halted
        ));
        assert!(matches!(
            crash_reason(classify(KvmExit::InternalError, &Map, HC)),
            CrashReason::EmulationFailure { .. }
        ));
        assert!(matches!(
            crash_reason(classify(KvmExit::FailEntry { reason: 7 }, &Map, HC)),
            CrashReason::EntryFailure { reason: 7 }
        ));
        assert!(matches!(
            crash_reason(classify(KvmExit::Unexpected("Debug".into()), &Map, HC)),
            CrashReason::UnexpectedExit(_)
        ));
    }
}
