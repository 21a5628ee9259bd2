//! How a domain ended, and the process exit code that stands for it.
//!
//! A guest fault (the guest did something it may not) is a crash ([`Outcome::Crash`],
//! exit status 100). A failure of the host under a correct guest (KVM_RUN failing, or
//! memory that the host cannot back: a passthrough file on a full file system or
//! truncated under the domain) is a host fault ([`Outcome::HostFault`], exit status 1).

use std::fmt;
use std::path::PathBuf;

use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;

/// `hv run` exit code for a crashed domain.
pub const EXIT_CRASH: u8 = 100;
/// `hv run` exit code for bad user input.
pub const EXIT_USAGE: u8 = 2;
/// `hv run` exit code for an internal hypervisor error.
pub const EXIT_INTERNAL: u8 = 1;
/// `hv run` exit code for a domain stopped by a host fault ([`Outcome::HostFault`]).
pub const EXIT_HOST_FAULT: u8 = EXIT_INTERNAL;

/// Why a domain was crashed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CrashReason {
    /// The guest shut down with reason crash.
    #[error("the guest reported a crash (sched_op shutdown, reason crash)")]
    GuestCrash,
    /// Triple fault.
    #[error("triple fault (KVM_EXIT_SHUTDOWN)")]
    TripleFault,
    /// Access to a port that is not the hypercall port (or an IN from it).
    #[error("unexpected port I/O: {dir} port {port:#x}, size {size}")]
    UnknownPort {
        /// The port.
        port: u16,
        /// Access size in bytes.
        size: u32,
        /// "in" or "out".
        dir: &'static str,
    },
    /// Access to guest-physical memory that is neither RAM nor a device.
    #[error("unexpected MMIO {dir} at guest-physical {gpa:#x}, size {size}")]
    UnknownMmio {
        /// Address.
        gpa: u64,
        /// Size.
        size: u32,
        /// "read" or "write".
        dir: &'static str,
    },
    /// A write that reached the page-table pool and was refused.
    #[error("rejected page-table write at guest-physical {gpa:#x} ({size} bytes): {errno}")]
    PageTableWrite {
        /// Address written.
        gpa: u64,
        /// Bytes written.
        size: u32,
        /// Why it was refused.
        errno: hv_abi::Errno,
    },
    /// The vCPU runs on page tables that are not a pinned L4 of the domain.
    #[error("CR3 {cr3:#x} is not a pinned L4 table of this domain: the registered page tables were bypassed")]
    Cr3Bypass {
        /// The CR3 found.
        cr3: u64,
    },
    /// KVM could not emulate an instruction.
    #[error("emulation failure (KVM_EXIT_INTERNAL_ERROR, suberror {suberror})")]
    EmulationFailure {
        /// KVM's suberror code.
        suberror: u32,
    },
    /// VM entry failed.
    #[error("VM entry failed (hardware reason {reason:#x})")]
    EntryFailure {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// HLT with nothing that could wake the vCPU.
    #[error("vCPU executed HLT; nothing can wake it (use sched_op to block or shut down)")]
    Halted,
    /// Any other exit.
    #[error("unexpected exit: {0}")]
    UnexpectedExit(String),
    /// A KVM call for the vCPU failed (setting up a secondary vCPU), or a vCPU thread
    /// panicked. (A failing KVM_RUN is a host fault, [`Outcome::HostFault`].)
    #[error("KVM error: {0}")]
    Kvm(String),
}

/// The host memory a host fault is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMemory {
    /// The domain's RAM (its memfd).
    Ram,
    /// The page-table pool (part of the RAM memfd, mapped read-only).
    PageTablePool,
    /// A passthrough region's file.
    Region {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, if hv could find out.
        cause: Option<BackingCause>,
    },
    /// Guest memory whose host pages cannot be faulted in, where KVM did not say which
    /// (no region's file shows a cause).
    Unknown,
}

/// Why a passthrough region's file cannot back a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackingCause {
    /// The file was truncated under the domain: pages past its end cannot be mapped
    /// (the kernel raises SIGBUS).
    PastEndOfFile {
        /// The file's size now.
        file_bytes: u64,
        /// The region's size.
        region_bytes: u64,
    },
    /// Allocating the page in the file failed (for example `ENOSPC` on a full file
    /// system).
    Allocate {
        /// Offset of the page in the file.
        offset: u64,
        /// The errno of the allocation.
        errno: i32,
    },
    /// The file's file system has no free blocks left (`ENOSPC`).
    FileSystemFull,
}

impl fmt::Display for BackingCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingCause::PastEndOfFile {
                file_bytes,
                region_bytes,
            } => write!(
                f,
                "the file was truncated to {file_bytes} bytes, shorter than the region's \
                 {region_bytes}: pages past its end cannot be mapped (SIGBUS)"
            ),
            BackingCause::Allocate { offset, errno } => write!(
                f,
                "allocating the page at file offset {offset:#x} fails: {}",
                errno_text(*errno)
            ),
            BackingCause::FileSystemFull => {
                write!(f, "its file system is full ({})", errno_text(libc::ENOSPC))
            }
        }
    }
}

/// A failure of the host that stopped a domain whose guest did nothing wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFault {
    /// The vCPU that hit it.
    pub vcpu: u32,
    /// KVM_RUN's errno; `None` when KVM reported the access as an MMIO exit at an
    /// address that is backed memory (its host page could not be accessed).
    pub kvm_errno: Option<i32>,
    /// The guest-physical address, when KVM gave it.
    pub gpa: Option<u64>,
    /// The memory concerned; `None` for a KVM_RUN failure that is not about memory.
    pub memory: Option<HostMemory>,
}

/// An errno as text: the system's message and number, and the symbolic name of the
/// errnos memory faults come with (for example `Bad address (os error 14), EFAULT`).
pub fn errno_text(errno: i32) -> String {
    let name = match errno {
        libc::EFAULT => "EFAULT",
        libc::EHWPOISON => "EHWPOISON",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        _ => return std::io::Error::from_raw_os_error(errno).to_string(),
    };
    format!("{}, {name}", std::io::Error::from_raw_os_error(errno))
}

impl fmt::Display for HostFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: ", self.vcpu)?;
        match self.kvm_errno {
            Some(e) => write!(f, "KVM_RUN failed: {}", errno_text(e))?,
            None => write!(
                f,
                "KVM could not access the host memory (it reported an MMIO exit)"
            )?,
        }
        if let Some(gpa) = self.gpa {
            write!(f, " at guest-physical {gpa:#x}")?;
        }
        match &self.memory {
            None => Ok(()),
            Some(HostMemory::Ram) => write!(f, ": guest RAM cannot be faulted in"),
            Some(HostMemory::PageTablePool) => {
                write!(f, ": the page-table pool (guest RAM) cannot be faulted in")
            }
            Some(HostMemory::Region { path, cause }) => {
                write!(
                    f,
                    ": passthrough region {} cannot be faulted in",
                    path.display()
                )?;
                match cause {
                    Some(c) => write!(f, ": {c}"),
                    None => Ok(()),
                }
            }
            Some(HostMemory::Unknown) => write!(
                f,
                ": guest memory cannot be faulted in (KVM did not say where; no passthrough \
                 region's file shows a cause)"
            ),
        }
    }
}

/// A crash with the state of the vCPU that caused it.
#[derive(Clone, Debug)]
pub struct CrashReport {
    /// vCPU index.
    pub vcpu: u32,
    /// Reason.
    pub reason: CrashReason,
    /// General-purpose registers at the crash, if they could be read.
    pub regs: Option<kvm_regs>,
    /// System registers at the crash, if they could be read.
    pub sregs: Option<kvm_sregs>,
}

impl CrashReport {
    /// A crash report without register state (a crash the guest reported itself, or
    /// one not tied to a vCPU's registers).
    pub fn without_regs(vcpu: u32, reason: CrashReason) -> Self {
        CrashReport {
            vcpu,
            reason,
            regs: None,
            sregs: None,
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "vCPU {}: {}", self.vcpu, self.reason)?;
        if let Some(r) = &self.regs {
            writeln!(f, "  rip {:016x}  rflags {:016x}", r.rip, r.rflags)?;
            writeln!(
                f,
                "  rax {:016x}  rbx {:016x}  rcx {:016x}  rdx {:016x}",
                r.rax, r.rbx, r.rcx, r.rdx
            )?;
            writeln!(
                f,
                "  rsi {:016x}  rdi {:016x}  rbp {:016x}  rsp {:016x}",
                r.rsi, r.rdi, r.rbp, r.rsp
            )?;
            writeln!(
                f,
                "  r8  {:016x}  r9  {:016x}  r10 {:016x}  r11 {:016x}",
                r.r8, r.r9, r.r10, r.r11
            )?;
            writeln!(
                f,
                "  r12 {:016x}  r13 {:016x}  r14 {:016x}  r15 {:016x}",
                r.r12, r.r13, r.r14, r.r15
            )?;
        }
        if let Some(s) = &self.sregs {
            writeln!(
                f,
                "  cr0 {:016x}  cr2 {:016x}  cr3 {:016x}  cr4 {:016x}  efer {:x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            )?;
            writeln!(
                f,
                "  cs {:04x} (dpl {})  ss {:04x}  idt {:x}/{:x}  gdt {:x}/{:x}",
                s.cs.selector,
                s.cs.dpl,
                s.ss.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit
            )?;
            if self.reason == CrashReason::TripleFault && s.idt.limit == 0 {
                writeln!(
                    f,
                    "  no IDT was loaded (limit 0): every exception ends in a triple fault; \
                     load one to see which exception it was (SPEC 4.3)"
                )?;
            }
        }
        Ok(())
    }
}

/// How a domain ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Powered off with an exit code (0..=99).
    Poweroff {
        /// The guest's exit code.
        code: u8,
    },
    /// The guest asked to reboot; hv does not restart domains.
    Reboot,
    /// Crashed: the guest did something it may not.
    Crash(Box<CrashReport>),
    /// Stopped because the host failed under it (the guest is not at fault).
    HostFault(Box<HostFault>),
    /// Destroyed by the host (for example at the end of a benchmark) while running.
    Destroyed,
}

impl Outcome {
    /// The `hv run` process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Poweroff { code } => *code,
            Outcome::Reboot | Outcome::Destroyed => 0,
            Outcome::Crash(_) => EXIT_CRASH,
            Outcome::HostFault(_) => EXIT_HOST_FAULT,
        }
    }

    /// The host fault, if a host fault stopped the domain.
    pub fn host_fault(&self) -> Option<&HostFault> {
        match self {
            Outcome::HostFault(h) => Some(h),
            _ => None,
        }
    }

    /// The crash report, if the domain crashed.
    pub fn crash(&self) -> Option<&CrashReport> {
        match self {
            Outcome::Crash(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Poweroff { code } => write!(f, "powered off with code {code}"),
            Outcome::Reboot => write!(f, "requested a reboot (hv does not restart domains)"),
            Outcome::Crash(c) => write!(f, "crashed: {}", c.reason),
            Outcome::HostFault(h) => write!(f, "stopped by a host fault: {h}"),
            Outcome::Destroyed => write!(f, "destroyed by the host"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_faults_exit_1_and_name_the_memory_and_the_errno() {
        let region = |cause| {
            Outcome::HostFault(Box::new(HostFault {
                vcpu: 1,
                kvm_errno: Some(libc::EFAULT),
                gpa: None,
                memory: Some(HostMemory::Region {
                    path: "/mnt/small/r.bin".into(),
                    cause,
                }),
            }))
        };
        let full = region(Some(BackingCause::FileSystemFull));
        assert_eq!(full.exit_code(), 1);
        assert!(full.crash().is_none() && full.host_fault().is_some());
        assert_eq!(
            full.to_string(),
            "stopped by a host fault: vCPU 1: KVM_RUN failed: Bad address (os error 14), \
             EFAULT: passthrough region /mnt/small/r.bin cannot be faulted in: its file \
             system is full (No space left on device (os error 28), ENOSPC)"
        );
        let alloc = HostFault {
            vcpu: 0,
            kvm_errno: None,
            gpa: Some(0x4700010),
            memory: Some(HostMemory::Region {
                path: "r.bin".into(),
                cause: Some(BackingCause::Allocate {
                    offset: 0x100000,
                    errno: libc::ENOSPC,
                }),
            }),
        };
        assert_eq!(
            alloc.to_string(),
            "vCPU 0: KVM could not access the host memory (it reported an MMIO exit) at \
             guest-physical 0x4700010: passthrough region r.bin cannot be faulted in: \
             allocating the page at file offset 0x100000 fails: No space left on device \
             (os error 28), ENOSPC"
        );
        let ram = HostFault {
            memory: Some(HostMemory::Ram),
            ..alloc.clone()
        };
        assert!(ram
            .to_string()
            .ends_with("0x4700010: guest RAM cannot be faulted in"));
        let other = HostFault {
            vcpu: 0,
            kvm_errno: Some(libc::ENOMEM),
            gpa: None,
            memory: None,
        };
        assert_eq!(
            other.to_string(),
            "vCPU 0: KVM_RUN failed: Cannot allocate memory (os error 12), ENOMEM"
        );
        // A guest's own crash keeps its status.
        let crash = Outcome::Crash(Box::new(CrashReport::without_regs(
            0,
            CrashReason::TripleFault,
        )));
        assert_eq!(crash.exit_code(), EXIT_CRASH);
    }
}
