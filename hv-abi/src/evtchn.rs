//! Event channels, 2-level ABI (specified in ABI v1; available when the hypervisor
//! reports [`crate::Features::EVTCHN`]).
//!
//! `event_channel_op(cmd, arg)`: for `SEND`, `CLOSE` and `UNMASK`, `arg` is the port;
//! for the others it is the guest-physical address of the command's structure.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bind a local port to a port another domain allocated for us.
pub const EVTCHNOP_BIND_INTERDOMAIN: u64 = 0;
/// Bind a virtual IRQ (for example [`VIRQ_TIMER`]) to a new port.
pub const EVTCHNOP_BIND_VIRQ: u64 = 1;
/// Close a port.
pub const EVTCHNOP_CLOSE: u64 = 3;
/// Send an event on a port.
pub const EVTCHNOP_SEND: u64 = 4;
/// Query a port's state.
pub const EVTCHNOP_STATUS: u64 = 5;
/// Allocate a port that a named remote domain may bind to.
pub const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;
/// Bind an inter-processor interrupt port.
pub const EVTCHNOP_BIND_IPI: u64 = 7;
/// Deliver a port to another vCPU.
pub const EVTCHNOP_BIND_VCPU: u64 = 8;
/// Unmask a port (and deliver it if pending).
pub const EVTCHNOP_UNMASK: u64 = 9;

/// Virtual IRQ: the one-shot timer of `set_timer_op`.
pub const VIRQ_TIMER: u32 = 0;
/// Number of virtual IRQs defined (valid `virq` values are `0..NR_VIRQS`).
pub const NR_VIRQS: u32 = 1;

/// `EVTCHNOP_ALLOC_UNBOUND` argument.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct EvtchnAllocUnbound {
    /// Domain allowed to bind the port.
    pub remote_dom: u32,
    /// Output: the allocated port.
    pub port: u32,
}

/// `EVTCHNOP_BIND_INTERDOMAIN` argument.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct EvtchnBindInterdomain {
    /// The remote domain.
    pub remote_dom: u32,
    /// The port the remote domain allocated for us.
    pub remote_port: u32,
    /// Output: the local port.
    pub local_port: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// `EVTCHNOP_BIND_VIRQ` and `EVTCHNOP_BIND_IPI` argument.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct EvtchnBindVcpu {
    /// The virtual IRQ (`BIND_VIRQ`); reserved, zero for `BIND_IPI`.
    pub virq: u32,
    /// The vCPU to notify.
    pub vcpu: u32,
    /// Output: the port (`BIND_VIRQ`, `BIND_IPI`); input for `BIND_VCPU`.
    pub port: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// `EVTCHNOP_STATUS` argument and result.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct EvtchnStatus {
    /// Input: the port.
    pub port: u32,
    /// Output: `EVTCHNSTAT_*`.
    pub status: u32,
    /// Output: the vCPU notified.
    pub vcpu: u32,
    /// Output: remote domain (unbound, interdomain) or virq.
    pub remote_dom_or_virq: u32,
    /// Output: remote port (interdomain).
    pub remote_port: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Port state: closed.
pub const EVTCHNSTAT_CLOSED: u32 = 0;
/// Port state: allocated, waiting for the remote domain to bind.
pub const EVTCHNSTAT_UNBOUND: u32 = 1;
/// Port state: connected to a port of another domain.
pub const EVTCHNSTAT_INTERDOMAIN: u32 = 2;
/// Port state: bound to a virtual IRQ.
pub const EVTCHNSTAT_VIRQ: u32 = 4;
/// Port state: IPI.
pub const EVTCHNSTAT_IPI: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layout() {
        assert_eq!(size_of::<EvtchnAllocUnbound>(), 8);
        assert_eq!(size_of::<EvtchnBindInterdomain>(), 16);
        assert_eq!(size_of::<EvtchnBindVcpu>(), 16);
        assert_eq!(size_of::<EvtchnStatus>(), 24);
    }
}
