//! `sched_op` sub-commands and shutdown reasons.

/// `sched_op(SCHEDOP_YIELD)`: give up the physical CPU. Returns 0.
pub const SCHEDOP_YIELD: u64 = 0;
/// `sched_op(SCHEDOP_BLOCK)`: sleep until an event is pending (event channels).
pub const SCHEDOP_BLOCK: u64 = 1;
/// `sched_op(SCHEDOP_SHUTDOWN, reason, code)`: stop the whole domain. Does not return
/// on success; returns `-EINVAL` for an unknown reason or a code above
/// [`SHUTDOWN_CODE_MAX`].
pub const SCHEDOP_SHUTDOWN: u64 = 2;
/// `sched_op(SCHEDOP_POLL, gpa)`: wait on given ports with a timeout (event channels).
pub const SCHEDOP_POLL: u64 = 3;

/// Shutdown reason: the guest powered off normally; `code` is its exit status.
pub const SHUTDOWN_POWEROFF: u64 = 0;
/// Shutdown reason: the guest asks to be restarted.
pub const SHUTDOWN_REBOOT: u64 = 1;
/// Shutdown reason: the guest crashed (for example a kernel panic).
pub const SHUTDOWN_CRASH: u64 = 3;

/// Largest exit code a guest may pass with [`SHUTDOWN_POWEROFF`].
pub const SHUTDOWN_CODE_MAX: u64 = 99;
