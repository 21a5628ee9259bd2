//! `sched_op` sub-commands and shutdown reasons.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `sched_op(SCHEDOP_YIELD)`: give up the physical CPU. Returns 0.
pub const SCHEDOP_YIELD: u64 = 0;
/// `sched_op(SCHEDOP_BLOCK)`: sleep until an event is pending (event channels).
pub const SCHEDOP_BLOCK: u64 = 1;
/// `sched_op(SCHEDOP_SHUTDOWN, reason, code)`: stop the whole domain. Does not return
/// on success; returns `-EINVAL` for an unknown reason or a code above
/// [`SHUTDOWN_CODE_MAX`].
pub const SCHEDOP_SHUTDOWN: u64 = 2;
/// `sched_op(SCHEDOP_POLL, gpa)`: wait on given ports with a timeout (event channels);
/// `gpa` holds a [`SchedPoll`].
pub const SCHEDOP_POLL: u64 = 3;

/// Most ports one [`SchedPoll`] may name.
pub const SCHED_POLL_MAX_PORTS: u32 = 128;

/// `SCHEDOP_POLL` argument (Xen's `sched_poll`), 24 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SchedPoll {
    /// Guest-physical address of an array of `nr_ports` u32 ports.
    pub ports_gpa: u64,
    /// Number of ports, 1..=[`SCHED_POLL_MAX_PORTS`].
    pub nr_ports: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Absolute system time (ns) at which to give up; 0 waits without a timeout.
    pub timeout: u64,
}

/// Shutdown reason: the guest powered off normally; `code` is its exit status.
pub const SHUTDOWN_POWEROFF: u64 = 0;
/// Shutdown reason: the guest asks to be restarted.
pub const SHUTDOWN_REBOOT: u64 = 1;
/// Shutdown reason: the guest crashed (for example a kernel panic).
pub const SHUTDOWN_CRASH: u64 = 3;

/// Largest `code` a shutdown may pass, whatever its reason (a larger one is refused
/// with `-EINVAL`); with [`SHUTDOWN_POWEROFF`] the code is the domain's exit status.
pub const SHUTDOWN_CODE_MAX: u64 = 99;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<SchedPoll>(), 24);
        assert_eq!(offset_of!(SchedPoll, ports_gpa), 0);
        assert_eq!(offset_of!(SchedPoll, nr_ports), 8);
        assert_eq!(offset_of!(SchedPoll, reserved), 12);
        assert_eq!(offset_of!(SchedPoll, timeout), 16);
    }
}
