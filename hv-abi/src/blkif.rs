//! The paravirtual block protocol (ABI 1.2, [`crate::Features::PV_BLOCK`]): Xen's
//! `blkif` requests and responses carried by a [`crate::ring`] ring.
//!
//! Each request names up to [`BLKIF_MAX_SEGMENTS`] segments; a segment is a range of
//! 512-byte sectors inside one page the front-end granted to the back-end (read-only
//! grants are enough for writes to the disk; reads need writable grants). The sectors of
//! a request's segments are consecutive on the disk, starting at `sector_number`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::ring::RingProtocol;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per page.
pub const SECTORS_PER_PAGE: u8 = 8;
/// Most segments in one request.
pub const BLKIF_MAX_SEGMENTS: usize = 11;

/// Read sectors into the segments' pages.
pub const BLKIF_OP_READ: u8 = 0;
/// Write the segments' pages to sectors.
pub const BLKIF_OP_WRITE: u8 = 1;
/// Make every write answered so far durable (`fdatasync`) before answering. No
/// segments; `sector_number` must be 0.
pub const BLKIF_OP_FLUSH: u8 = 3;

/// Response status: success.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// One segment: sectors `first_sect..=last_sect` of the page behind grant `gref`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BlkifSegment {
    /// Grant reference (of the front-end's table, granted to the back-end's domain).
    pub gref: u32,
    /// First sector of the page used (0..=7).
    pub first_sect: u8,
    /// Last sector of the page used (`first_sect..=7`).
    pub last_sect: u8,
    /// Reserved, 0.
    pub reserved: u16,
}

/// A request (112 bytes, Xen's `blkif_request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlkifRequest {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Segments used (1..=11 for read and write, 0 for flush).
    pub nr_segments: u8,
    /// Reserved (Xen's device handle), 0.
    pub handle: u16,
    /// Reserved, 0.
    pub reserved: u32,
    /// Echoed in the response.
    pub id: u64,
    /// First disk sector.
    pub sector_number: u64,
    /// The segments; entries past `nr_segments` are ignored.
    pub seg: [BlkifSegment; BLKIF_MAX_SEGMENTS],
}

/// A response (16 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BlkifResponse {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    /// Reserved, 0.
    pub reserved0: u8,
    /// [`BLKIF_RSP_OKAY`] or a negative [`crate::Errno`]: `-EINVAL` (malformed request:
    /// segment count, sector range inside a page, reserved fields), `-ERANGE` (sectors
    /// beyond the disk), `-ENOENT` / `-EACCES` (a segment's grant is not valid for the
    /// back-end, or read-only for a read), `-ENOSYS` (unknown operation), `-EIO` (the
    /// host's I/O failed).
    pub status: i16,
    /// Reserved, 0.
    pub reserved1: u32,
}

/// The block ring: 32 slots of 112 bytes.
#[derive(Debug)]
pub struct Blkif;

impl RingProtocol for Blkif {
    type Req = BlkifRequest;
    type Rsp = BlkifResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout() {
        assert_eq!(size_of::<BlkifSegment>(), 8);
        assert_eq!(size_of::<BlkifRequest>(), 112);
        assert_eq!(offset_of!(BlkifRequest, operation), 0);
        assert_eq!(offset_of!(BlkifRequest, nr_segments), 1);
        assert_eq!(offset_of!(BlkifRequest, handle), 2);
        assert_eq!(offset_of!(BlkifRequest, id), 8);
        assert_eq!(offset_of!(BlkifRequest, sector_number), 16);
        assert_eq!(offset_of!(BlkifRequest, seg), 24);
        assert_eq!(offset_of!(BlkifSegment, first_sect), 4);
        assert_eq!(offset_of!(BlkifSegment, last_sect), 5);
        assert_eq!(size_of::<BlkifResponse>(), 16);
        assert_eq!(offset_of!(BlkifResponse, operation), 8);
        assert_eq!(offset_of!(BlkifResponse, status), 10);
        assert_eq!(Blkif::SLOT_SIZE, 112);
        assert_eq!(Blkif::ENTRIES, 32);
    }
}
