//! Hypercall transport and operation numbers.
//!
//! # Transport
//!
//! A hypercall is one port-I/O instruction, `out HYPERCALL_PORT, al` (opcode `E6 E8`),
//! executed at CPL 0. Registers (Xen's 64-bit PV order):
//!
//! | register | meaning |
//! | --- | --- |
//! | RAX | operation number ([`Op`]) on entry; result on return |
//! | RDI, RSI, RDX, R10, R8 | arguments 1 to 5 |
//!
//! On return RAX holds a non-negative result or `-errno` ([`crate::Errno`]); every
//! other register is preserved. Pointers passed in arguments are **guest-physical
//! addresses**. A hypercall from CPL 3 returns `-EPERM` unless the domain was started
//! with user hypercalls allowed ([`crate::start_info::SIF_USER_HYPERCALLS`]).

/// The I/O port whose `out` instruction is a hypercall.
pub const HYPERCALL_PORT: u16 = 0xE8;

/// Hypercall operation numbers (placed in RAX). Numbers follow Xen's where the
/// operation has a Xen counterpart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Op {
    /// Batched page-table updates ([`crate::mmu`]).
    MmuUpdate = 1,
    /// Several hypercalls in one exit ([`crate::mmu::MulticallEntry`]).
    Multicall = 13,
    /// Update one PTE by virtual address.
    UpdateVaMapping = 14,
    /// Arm the one-shot timer.
    SetTimerOp = 15,
    /// Version and features ([`VERSION_GET`], [`VERSION_FEATURES`]).
    Version = 17,
    /// Early console ([`CONSOLEIO_WRITE`]).
    ConsoleIo = 18,
    /// Grant-table operations ([`crate::grant`]).
    GrantTableOp = 20,
    /// Per-vCPU operations ([`VCPUOP_INITIALISE`], ...).
    VcpuOp = 24,
    /// Extended MMU operations (pin, unpin, new_baseptr, flushes).
    MmuextOp = 26,
    /// Scheduling: yield, block, shutdown, poll ([`crate::sched`]).
    SchedOp = 29,
    /// Event-channel operations ([`crate::evtchn`]).
    EventChannelOp = 32,
    /// Device connection handshake ([`crate::device`]; ABI 1.2). Not in Xen, which
    /// uses xenstore for this.
    DevOp = 64,
}

impl Op {
    /// Every operation number defined by ABI v1.
    pub const ALL: [Op; 12] = [
        Op::MmuUpdate,
        Op::Multicall,
        Op::UpdateVaMapping,
        Op::SetTimerOp,
        Op::Version,
        Op::ConsoleIo,
        Op::GrantTableOp,
        Op::VcpuOp,
        Op::MmuextOp,
        Op::SchedOp,
        Op::EventChannelOp,
        Op::DevOp,
    ];

    /// Decodes an operation number; `None` for numbers ABI v1 does not define.
    pub fn from_u64(n: u64) -> Option<Op> {
        Self::ALL.iter().copied().find(|op| *op as u64 == n)
    }

    /// A short lower-case name (`"sched_op"`).
    pub const fn name(self) -> &'static str {
        match self {
            Op::MmuUpdate => "mmu_update",
            Op::Multicall => "multicall",
            Op::UpdateVaMapping => "update_va_mapping",
            Op::SetTimerOp => "set_timer_op",
            Op::Version => "version",
            Op::ConsoleIo => "console_io",
            Op::GrantTableOp => "grant_table_op",
            Op::VcpuOp => "vcpu_op",
            Op::MmuextOp => "mmuext_op",
            Op::SchedOp => "sched_op",
            Op::EventChannelOp => "event_channel_op",
            Op::DevOp => "dev_op",
        }
    }
}

/// `version(VERSION_GET)`: returns `major << 16 | minor`.
pub const VERSION_GET: u64 = 0;
/// `version(VERSION_FEATURES)`: returns the feature bitmap ([`crate::Features`]).
pub const VERSION_FEATURES: u64 = 1;

/// `console_io(CONSOLEIO_WRITE, len, gpa)`: writes `len` bytes at guest-physical
/// `gpa` to the domain's console. Returns `len`. `len` at most [`CONSOLE_WRITE_MAX`].
pub const CONSOLEIO_WRITE: u64 = 0;
/// `console_io(CONSOLEIO_READ, len, gpa)`: reserved for console input (PV console).
pub const CONSOLEIO_READ: u64 = 1;
/// Largest `len` accepted by `CONSOLEIO_WRITE`; longer writes fail with `-E2BIG`.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// `vcpu_op(VCPUOP_INITIALISE, vcpu, gpa)`: sets the initial state of a vCPU that is
/// not up from a [`VcpuContext`] at `gpa`.
pub const VCPUOP_INITIALISE: u64 = 0;
/// `vcpu_op(VCPUOP_UP, vcpu)`: starts an initialised vCPU.
pub const VCPUOP_UP: u64 = 1;
/// `vcpu_op(VCPUOP_IS_UP, vcpu)`: returns 1 if the vCPU runs, 0 otherwise.
pub const VCPUOP_IS_UP: u64 = 3;

/// `vcpu_op(VCPUOP_SET_UPCALL_VECTOR, vcpu, vector)`: event-channel upcalls for
/// `vcpu` arrive as interrupt `vector` (0x20..=0xFE), or not at all (0, the default).
/// ABI 1.1, with [`crate::Features::EVTCHN`]. The handler ends with an x2APIC EOI:
/// `wrmsr` of 0 to [`X2APIC_EOI_MSR`].
pub const VCPUOP_SET_UPCALL_VECTOR: u64 = 16;
/// Lowest vector [`VCPUOP_SET_UPCALL_VECTOR`] accepts (0..=0x1F are exceptions).
pub const UPCALL_VECTOR_MIN: u64 = 0x20;
/// Highest vector [`VCPUOP_SET_UPCALL_VECTOR`] accepts (0xFF is the spurious vector).
pub const UPCALL_VECTOR_MAX: u64 = 0xFE;
/// The x2APIC end-of-interrupt MSR: the upcall handler writes 0 to it when done.
pub const X2APIC_EOI_MSR: u32 = 0x80B;

/// Initial register state for a secondary vCPU (`VCPUOP_INITIALISE`).
///
/// The vCPU starts in 64-bit mode with the boot GDT, like vCPU 0, at `rip` with `rsp`,
/// `cr3` and RDI = `arg`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct VcpuContext {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Page-table root (guest-physical); must be the root the domain runs on.
    pub cr3: u64,
    /// Value placed in RDI.
    pub arg: u64,
    /// Must be zero.
    pub reserved: [u64; 4],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn op_numbers_match_xen() {
        assert_eq!(Op::MmuUpdate as u64, 1);
        assert_eq!(Op::Multicall as u64, 13);
        assert_eq!(Op::UpdateVaMapping as u64, 14);
        assert_eq!(Op::SetTimerOp as u64, 15);
        assert_eq!(Op::Version as u64, 17);
        assert_eq!(Op::ConsoleIo as u64, 18);
        assert_eq!(Op::GrantTableOp as u64, 20);
        assert_eq!(Op::VcpuOp as u64, 24);
        assert_eq!(Op::MmuextOp as u64, 26);
        assert_eq!(Op::SchedOp as u64, 29);
        assert_eq!(Op::EventChannelOp as u64, 32);
        for op in Op::ALL {
            assert_eq!(Op::from_u64(op as u64), Some(op));
        }
        assert_eq!(Op::from_u64(0), None);
        assert_eq!(Op::from_u64(u64::MAX), None);
    }

    #[test]
    fn vcpu_context_layout() {
        assert_eq!(size_of::<VcpuContext>(), 64);
        assert_eq!(offset_of!(VcpuContext, rip), 0);
        assert_eq!(offset_of!(VcpuContext, rsp), 8);
        assert_eq!(offset_of!(VcpuContext, cr3), 16);
        assert_eq!(offset_of!(VcpuContext, arg), 24);
        assert_eq!(offset_of!(VcpuContext, reserved), 32);
    }
}
