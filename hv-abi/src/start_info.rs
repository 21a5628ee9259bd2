//! The start_info page: where a booting guest finds everything.
//!
//! On entry to the kernel, RDI holds the guest-physical (and, in the boot address
//! space, virtual) address of this page, [`crate::layout::START_INFO_GPA`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic value at offset 0: the ASCII bytes `"hvstart1"` read as a little-endian u64.
pub const START_INFO_MAGIC: u64 = u64::from_le_bytes(*b"hvstart1");

/// Size of the command-line buffer, including the terminating NUL.
pub const CMDLINE_MAX: usize = 1024;

/// Flag: hypercalls from guest CPL 3 are allowed for this domain.
pub const SIF_USER_HYPERCALLS: u32 = 1 << 0;

/// The start_info page (exactly 4096 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct StartInfo {
    /// [`START_INFO_MAGIC`].
    pub magic: u64,
    /// ABI major version of the hypervisor.
    pub abi_major: u16,
    /// ABI minor version of the hypervisor.
    pub abi_minor: u16,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Features the hypervisor implements ([`crate::Features`]).
    pub features: u64,
    /// This domain's id.
    pub domid: u32,
    /// Number of vCPUs (vCPU 0 runs at entry; others start with `vcpu_op`).
    pub nr_vcpus: u32,
    /// RAM size in pages: RAM is guest-physical `[0, nr_pages * 4096)`.
    pub nr_pages: u64,
    /// Guest-physical address of the shared_info page.
    pub shared_info_gpa: u64,
    /// Guest-physical address of the boot PML4 (loaded in CR3 at entry).
    pub pt_base_gpa: u64,
    /// Number of page-table frames the boot tables use, from `pt_pool_gpa` on.
    pub nr_pt_frames: u64,
    /// Guest-physical address of the page-table pool.
    pub pt_pool_gpa: u64,
    /// Size of the page-table pool in frames.
    pub pt_pool_frames: u64,
    /// Lowest guest-physical address of the kernel image.
    pub kernel_start_gpa: u64,
    /// One past the highest guest-physical address of the kernel image.
    pub kernel_end_gpa: u64,
    /// First page-aligned RAM address free for the guest (after the kernel image).
    pub first_free_gpa: u64,
    /// One past the top of the boot stack.
    pub stack_top_gpa: u64,
    /// Guest-physical address of the PV console ring page; 0 if none.
    pub console_ring_gpa: u64,
    /// Event-channel port of the PV console; 0 if none.
    pub console_evtchn: u32,
    /// Length of the command line in bytes, without the NUL.
    pub cmdline_len: u32,
    /// Guest-physical address of the device table; 0 if none.
    pub devices_gpa: u64,
    /// Number of entries in the device table.
    pub nr_devices: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Guest-physical address of this domain's grant table (ABI 1.1; 0 without
    /// `gnttab`): [`Self::grant_table_frames`] frames of [`crate::grant::GrantEntryV1`].
    pub grant_table_gpa: u64,
    /// Number of grant-table frames (512 entries each).
    pub grant_table_frames: u32,
    /// Number of frames in the grant window (ABI 1.1).
    pub grant_window_frames: u32,
    /// Guest-physical address of the grant window, where the hypervisor places the
    /// frames this domain maps from other domains (ABI 1.1; 0 without `gnttab`).
    pub grant_window_gpa: u64,
    /// Reserved, zero.
    pub reserved: [u64; 363],
    /// The command line, NUL-terminated, at most `CMDLINE_MAX - 1` bytes.
    pub cmdline: [u8; CMDLINE_MAX],
}

impl StartInfo {
    /// The command line as bytes (without the NUL).
    pub fn cmdline_bytes(&self) -> &[u8] {
        let len = (self.cmdline_len as usize).min(CMDLINE_MAX - 1);
        &self.cmdline[..len]
    }

    /// RAM size in bytes.
    pub const fn mem_bytes(&self) -> u64 {
        self.nr_pages * crate::PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<StartInfo>(), 4096);
        assert_eq!(offset_of!(StartInfo, magic), 0);
        assert_eq!(offset_of!(StartInfo, abi_major), 8);
        assert_eq!(offset_of!(StartInfo, abi_minor), 10);
        assert_eq!(offset_of!(StartInfo, flags), 12);
        assert_eq!(offset_of!(StartInfo, features), 16);
        assert_eq!(offset_of!(StartInfo, domid), 24);
        assert_eq!(offset_of!(StartInfo, nr_vcpus), 28);
        assert_eq!(offset_of!(StartInfo, nr_pages), 32);
        assert_eq!(offset_of!(StartInfo, shared_info_gpa), 40);
        assert_eq!(offset_of!(StartInfo, pt_base_gpa), 48);
        assert_eq!(offset_of!(StartInfo, nr_pt_frames), 56);
        assert_eq!(offset_of!(StartInfo, pt_pool_gpa), 64);
        assert_eq!(offset_of!(StartInfo, pt_pool_frames), 72);
        assert_eq!(offset_of!(StartInfo, kernel_start_gpa), 80);
        assert_eq!(offset_of!(StartInfo, kernel_end_gpa), 88);
        assert_eq!(offset_of!(StartInfo, first_free_gpa), 96);
        assert_eq!(offset_of!(StartInfo, stack_top_gpa), 104);
        assert_eq!(offset_of!(StartInfo, console_ring_gpa), 112);
        assert_eq!(offset_of!(StartInfo, console_evtchn), 120);
        assert_eq!(offset_of!(StartInfo, cmdline_len), 124);
        assert_eq!(offset_of!(StartInfo, devices_gpa), 128);
        assert_eq!(offset_of!(StartInfo, nr_devices), 136);
        assert_eq!(offset_of!(StartInfo, reserved0), 140);
        assert_eq!(offset_of!(StartInfo, grant_table_gpa), 144);
        assert_eq!(offset_of!(StartInfo, grant_table_frames), 152);
        assert_eq!(offset_of!(StartInfo, grant_window_frames), 156);
        assert_eq!(offset_of!(StartInfo, grant_window_gpa), 160);
        assert_eq!(offset_of!(StartInfo, reserved), 168);
        assert_eq!(offset_of!(StartInfo, cmdline), 3072);
    }

    #[test]
    fn magic() {
        assert_eq!(&START_INFO_MAGIC.to_le_bytes(), b"hvstart1");
    }
}
