//! How a domain ended, and the process exit code that stands for it.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;

/// `hv run` exit code for a crashed domain.
pub const EXIT_CRASH: u8 = 100;
/// `hv run` exit code for bad user input.
pub const EXIT_USAGE: u8 = 2;
/// `hv run` exit code for an internal hypervisor error.
pub const EXIT_INTERNAL: u8 = 1;

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
    /// KVM_RUN or another KVM call failed.
    #[error("KVM error: {0}")]
    Kvm(String),
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
    /// Crashed.
    Crash(Box<CrashReport>),
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
            Outcome::Destroyed => write!(f, "destroyed by the host"),
        }
    }
}
