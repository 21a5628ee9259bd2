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
    }
}
