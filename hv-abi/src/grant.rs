//! Grant tables v1 (specified in ABI v1; available when the hypervisor reports
//! [`crate::Features::GNTTAB`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A grant-table entry (Xen's `grant_entry_v1`), 8 bytes.
///
/// Publish: write `domid` and `frame`, a write barrier, then `flags`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GrantEntryV1 {
    /// `GTF_*` flags.
    pub flags: u16,
    /// The domain allowed to use the grant.
    pub domid: u16,
    /// The granted frame number (guest-physical address >> 12).
    pub frame: u32,
}

/// Grant flag (granter): the entry permits access.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// Grant flag (granter): read-only access only.
pub const GTF_READONLY: u16 = 1 << 2;
/// Grant flag (hypervisor): the grant is mapped for reading.
pub const GTF_READING: u16 = 1 << 3;
/// Grant flag (hypervisor): the grant is mapped for writing.
pub const GTF_WRITING: u16 = 1 << 4;
/// Most operations in one `grant_table_op` call.
pub const GNTTAB_MAX_BATCH: u64 = 512;

/// `grant_table_op` command: map grant references.
pub const GNTTABOP_MAP_GRANT_REF: u64 = 0;
/// `grant_table_op` command: unmap grant mappings.
pub const GNTTABOP_UNMAP_GRANT_REF: u64 = 1;
/// `grant_table_op` command: set up the grant table frames.
pub const GNTTABOP_SETUP_TABLE: u64 = 2;
/// `grant_table_op` command: batched copy.
pub const GNTTABOP_COPY: u64 = 5;
/// `grant_table_op` command: query the table size.
pub const GNTTABOP_QUERY_SIZE: u64 = 6;

/// Grant entries per grant-table frame.
pub const GRANT_ENTRIES_PER_FRAME: u32 = 512;

/// Domain id meaning "the calling domain" (Xen's `DOMID_SELF`).
pub const DOMID_SELF: u16 = 0x7FF0;

/// Map flag: the caller wants the frame's bus address (always reported; no effect).
pub const GNTMAP_DEVICE_MAP: u32 = 1 << 0;
/// Map flag: install the mapping as the L1 entry for virtual address `host_addr` of
/// the caller's current page tables. Required in ABI 1.1.
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// Map flag: map read-only (required when the grant is `GTF_READONLY`).
pub const GNTMAP_READONLY: u32 = 1 << 2;
/// Map flag: the mapping is user-accessible (U/S set), else kernel-only.
pub const GNTMAP_APPLICATION_MAP: u32 = 1 << 3;

/// Copy flag: `source.ref_or_gfn` is a grant reference of `source.domid` (else a frame
/// of the caller, with `domid` = [`DOMID_SELF`] or the caller's id).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// Copy flag: `dest.ref_or_gfn` is a grant reference of `dest.domid`.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `GNTTABOP_MAP_GRANT_REF` operation (Xen's `gnttab_map_grant_ref`), 32 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabMapGrantRef {
    /// In: the virtual address whose L1 entry receives the mapping.
    pub host_addr: u64,
    /// In: `GNTMAP_*`.
    pub flags: u32,
    /// In: the grant reference.
    pub ref_: u32,
    /// In: the granting domain.
    pub dom: u16,
    /// Out: 0 or a negative errno.
    pub status: i16,
    /// Out: the handle that unmaps this mapping.
    pub handle: u32,
    /// Out: the guest-physical address of the mapped frame (in the grant window).
    pub dev_bus_addr: u64,
}

/// `GNTTABOP_UNMAP_GRANT_REF` operation (Xen's `gnttab_unmap_grant_ref`), 24 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabUnmapGrantRef {
    /// In: the virtual address given to map (its L1 entry is cleared if it still
    /// holds the mapping).
    pub host_addr: u64,
    /// Ignored (Xen compatibility).
    pub dev_bus_addr: u64,
    /// In: the handle returned by map.
    pub handle: u32,
    /// Out: 0 or a negative errno.
    pub status: i16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// `GNTTABOP_SETUP_TABLE` operation, 24 bytes: reports where the caller's grant
/// table is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabSetupTable {
    /// In: [`DOMID_SELF`] or the caller's id.
    pub dom: u16,
    /// Reserved, zero.
    pub reserved0: u16,
    /// In: frames wanted, 1..=the table's size.
    pub nr_frames: u32,
    /// Out: 0 or a negative errno.
    pub status: i16,
    /// Reserved, zero.
    pub reserved1: [u16; 3],
    /// In: guest-physical address of an array of `nr_frames` u64 where the table's
    /// frame numbers (GPA >> 12) are written.
    pub frame_list: u64,
}

/// One side of a [`GnttabCopy`], 16 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabCopyPtr {
    /// A grant reference (with the `GNTCOPY_*_GREF` flag) or a local frame number.
    pub ref_or_gfn: u64,
    /// The domain: the granter for a reference, [`DOMID_SELF`] for a local frame.
    pub domid: u16,
    /// Byte offset in the frame.
    pub offset: u16,
    /// Reserved, zero.
    pub reserved: u32,
}

/// `GNTTABOP_COPY` operation (Xen's `gnttab_copy`), 40 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabCopy {
    /// Where to copy from.
    pub source: GnttabCopyPtr,
    /// Where to copy to.
    pub dest: GnttabCopyPtr,
    /// Bytes to copy; `offset + len` must not cross a page on either side.
    pub len: u16,
    /// `GNTCOPY_*`.
    pub flags: u16,
    /// Out: 0 or a negative errno.
    pub status: i16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// `GNTTABOP_QUERY_SIZE` operation, 16 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GnttabQuerySize {
    /// In: [`DOMID_SELF`] or the caller's id.
    pub dom: u16,
    /// Reserved, zero.
    pub reserved0: u16,
    /// Out: frames in use.
    pub nr_frames: u32,
    /// Out: the most frames the table can have.
    pub max_nr_frames: u32,
    /// Out: 0 or a negative errno.
    pub status: i16,
    /// Reserved, zero.
    pub reserved1: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<GrantEntryV1>(), 8);
        assert_eq!(offset_of!(GrantEntryV1, flags), 0);
        assert_eq!(offset_of!(GrantEntryV1, domid), 2);
        assert_eq!(offset_of!(GrantEntryV1, frame), 4);
        assert_eq!(size_of::<GnttabMapGrantRef>(), 32);
        assert_eq!(offset_of!(GnttabMapGrantRef, host_addr), 0);
        assert_eq!(offset_of!(GnttabMapGrantRef, flags), 8);
        assert_eq!(offset_of!(GnttabMapGrantRef, ref_), 12);
        assert_eq!(offset_of!(GnttabMapGrantRef, dom), 16);
        assert_eq!(offset_of!(GnttabMapGrantRef, status), 18);
        assert_eq!(offset_of!(GnttabMapGrantRef, handle), 20);
        assert_eq!(offset_of!(GnttabMapGrantRef, dev_bus_addr), 24);
        assert_eq!(size_of::<GnttabUnmapGrantRef>(), 24);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, host_addr), 0);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, dev_bus_addr), 8);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, handle), 16);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, status), 20);
        assert_eq!(size_of::<GnttabSetupTable>(), 24);
        assert_eq!(offset_of!(GnttabSetupTable, dom), 0);
        assert_eq!(offset_of!(GnttabSetupTable, nr_frames), 4);
        assert_eq!(offset_of!(GnttabSetupTable, status), 8);
        assert_eq!(offset_of!(GnttabSetupTable, frame_list), 16);
        assert_eq!(size_of::<GnttabCopyPtr>(), 16);
        assert_eq!(offset_of!(GnttabCopyPtr, ref_or_gfn), 0);
        assert_eq!(offset_of!(GnttabCopyPtr, domid), 8);
        assert_eq!(offset_of!(GnttabCopyPtr, offset), 10);
        assert_eq!(size_of::<GnttabCopy>(), 40);
        assert_eq!(offset_of!(GnttabCopy, source), 0);
        assert_eq!(offset_of!(GnttabCopy, dest), 16);
        assert_eq!(offset_of!(GnttabCopy, len), 32);
        assert_eq!(offset_of!(GnttabCopy, flags), 34);
        assert_eq!(offset_of!(GnttabCopy, status), 36);
        assert_eq!(size_of::<GnttabQuerySize>(), 16);
        assert_eq!(offset_of!(GnttabQuerySize, nr_frames), 4);
        assert_eq!(offset_of!(GnttabQuerySize, max_nr_frames), 8);
        assert_eq!(offset_of!(GnttabQuerySize, status), 12);
    }
}
