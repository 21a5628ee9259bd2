//! The shared_info page: state the hypervisor and the guest share without exits.
//!
//! Modelled on Xen's: per-vCPU upcall state and system time, then the 2-level event
//! channel bitmaps (4096 ports), then the wall clock. The event-channel and time parts
//! are filled in when those features are present ([`crate::Features::EVTCHN`],
//! [`crate::Features::TIMER`]); before that the page is zero.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Number of `vcpu_info` slots in shared_info: the most vCPUs a domain can have.
pub const MAX_VCPUS: usize = 32;
/// Number of event-channel ports of the 2-level ABI.
pub const NR_EVENT_CHANNELS: usize = 4096;

/// System time for one vCPU (Xen's `vcpu_time_info`).
///
/// `system_time` (ns) = stored `system_time` + ((`rdtsc` - `tsc_timestamp`) scaled by
/// `tsc_to_system_mul` / 2^32 after shifting by `tsc_shift`). `version` is odd while
/// the hypervisor updates the record: read it before and after, retry on mismatch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VcpuTimeInfo {
    /// Update counter; odd while an update is in progress.
    pub version: u32,
    /// Reserved, zero.
    pub pad0: u32,
    /// TSC value at which `system_time` was taken.
    pub tsc_timestamp: u64,
    /// Nanoseconds since the domain started, at `tsc_timestamp`.
    pub system_time: u64,
    /// TSC-to-nanoseconds multiplier (32.32 fixed point).
    pub tsc_to_system_mul: u32,
    /// Shift applied to the TSC delta before multiplying (negative: right shift).
    pub tsc_shift: i8,
    /// Flags, zero in v1.
    pub flags: u8,
    /// Reserved, zero.
    pub pad1: [u8; 2],
}

/// Per-vCPU information (Xen's `vcpu_info`), 64 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VcpuInfo {
    /// Set by the hypervisor when an event is pending for this vCPU.
    pub upcall_pending: u8,
    /// Set by the guest to hold back upcalls (like clearing IF).
    pub upcall_mask: u8,
    /// Reserved, zero.
    pub pad0: [u8; 6],
    /// Selector: bit N set means word N of `evtchn_pending` may have bits set.
    pub pending_sel: u64,
    /// Reserved for architecture state (Xen keeps CR2 here), zero.
    pub arch: [u64; 2],
    /// System time for this vCPU.
    pub time: VcpuTimeInfo,
}

/// The shared_info page (exactly 4096 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SharedInfo {
    /// One record per vCPU.
    pub vcpu_info: [VcpuInfo; MAX_VCPUS],
    /// Pending bit per port.
    pub evtchn_pending: [u64; NR_EVENT_CHANNELS / 64],
    /// Mask bit per port (set = masked).
    pub evtchn_mask: [u64; NR_EVENT_CHANNELS / 64],
    /// Wall-clock update counter; odd while updating.
    pub wc_version: u32,
    /// Wall-clock seconds (low 32 bits) since the Unix epoch at system time 0.
    pub wc_sec: u32,
    /// Wall-clock nanoseconds at system time 0.
    pub wc_nsec: u32,
    /// Wall-clock seconds, high 32 bits.
    pub wc_sec_hi: u32,
    /// Reserved, zero.
    pub reserved: [u64; 126],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<VcpuTimeInfo>(), 32);
        assert_eq!(offset_of!(VcpuTimeInfo, version), 0);
        assert_eq!(offset_of!(VcpuTimeInfo, tsc_timestamp), 8);
        assert_eq!(offset_of!(VcpuTimeInfo, system_time), 16);
        assert_eq!(offset_of!(VcpuTimeInfo, tsc_to_system_mul), 24);
        assert_eq!(offset_of!(VcpuTimeInfo, tsc_shift), 28);
        assert_eq!(offset_of!(VcpuTimeInfo, flags), 29);
        assert_eq!(offset_of!(VcpuTimeInfo, pad1), 30);
        assert_eq!(size_of::<VcpuInfo>(), 64);
        assert_eq!(offset_of!(VcpuInfo, upcall_pending), 0);
        assert_eq!(offset_of!(VcpuInfo, upcall_mask), 1);
        assert_eq!(offset_of!(VcpuInfo, pending_sel), 8);
        assert_eq!(offset_of!(VcpuInfo, arch), 16);
        assert_eq!(offset_of!(VcpuInfo, time), 32);
        assert_eq!(size_of::<SharedInfo>(), 4096);
        assert_eq!(offset_of!(SharedInfo, vcpu_info), 0);
        assert_eq!(offset_of!(SharedInfo, evtchn_pending), 2048);
        assert_eq!(offset_of!(SharedInfo, evtchn_mask), 2560);
        assert_eq!(offset_of!(SharedInfo, wc_version), 3072);
        assert_eq!(offset_of!(SharedInfo, wc_sec), 3076);
        assert_eq!(offset_of!(SharedInfo, wc_nsec), 3080);
        assert_eq!(offset_of!(SharedInfo, wc_sec_hi), 3084);
        assert_eq!(offset_of!(SharedInfo, reserved), 3088);
    }
}
