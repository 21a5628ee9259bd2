//! Grant tables v1 (SPEC.md §8.8): granting this domain's frames to other domains
//! through the table in its own RAM ([`GrantTable`]), and using other domains' grants
//! with `grant_table_op` ([`map`], [`unmap`], [`copy`], [`query_size`]). Needs the
//! `gnttab` feature ([`hv_abi::Features::GNTTAB`]).

use core::fmt;
use core::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use hv_abi::grant::{
    GnttabCopy, GnttabMapGrantRef, GnttabQuerySize, GnttabUnmapGrantRef, DOMID_SELF, GNTTABOP_COPY,
    GNTTABOP_MAP_GRANT_REF, GNTTABOP_QUERY_SIZE, GNTTABOP_UNMAP_GRANT_REF, GNTTAB_MAX_BATCH,
    GRANT_ENTRIES_PER_FRAME, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING,
};
use hv_abi::start_info::StartInfo;
use hv_abi::{Errno, Op};

use crate::error::{check, Error};
use crate::hypercall::hypercall3;
use crate::virt_to_phys;

pub use hv_abi::grant::{
    GnttabCopyPtr, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF, GNTMAP_APPLICATION_MAP, GNTMAP_HOST_MAP,
    GNTMAP_READONLY,
};

/// A grant reference: an index into the granter's table.
pub type GrantRef = u32;

/// Why a grant-table operation on this domain's own table failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// The reference is beyond the table.
    BadRef(GrantRef),
    /// The entry is in use by the grantee (`GTF_READING`/`GTF_WRITING` set): revoke
    /// again later.
    Busy,
    /// The entry already grants access: revoke it before granting it again.
    AlreadyGranted,
    /// The frame number is 0 or does not fit the entry's 32 bits.
    BadFrame(u64),
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GrantError::BadRef(r) => write!(f, "grant reference {r} is beyond the table"),
            GrantError::Busy => f.write_str("the grant is in use"),
            GrantError::AlreadyGranted => f.write_str("the entry already grants access"),
            GrantError::BadFrame(fr) => write!(f, "bad frame number {fr:#x}"),
        }
    }
}

/// This domain's grant table: `nr_frames * 512` entries in its own RAM.
#[derive(Clone, Copy, Debug)]
pub struct GrantTable {
    base: u64,
    entries: u32,
}

impl GrantTable {
    /// The table start_info describes (`grant_table_gpa`, `grant_table_frames`), or
    /// `None` without `gnttab` (the fields are 0).
    pub fn from_start_info(si: &StartInfo) -> Option<GrantTable> {
        if si.grant_table_gpa == 0 || si.grant_table_gpa % 8 != 0 || si.grant_table_frames == 0 {
            return None;
        }
        Some(GrantTable {
            base: si.grant_table_gpa,
            entries: si
                .grant_table_frames
                .saturating_mul(GRANT_ENTRIES_PER_FRAME),
        })
    }

    /// Number of grant references (entries).
    pub fn len(&self) -> u32 {
        self.entries
    }

    /// True if the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The entry's fields as atomics: (flags, domid, frame).
    fn entry(
        &self,
        gref: GrantRef,
    ) -> Result<(&'static AtomicU16, &'static AtomicU16, &'static AtomicU32), GrantError> {
        if gref >= self.entries {
            return Err(GrantError::BadRef(gref));
        }
        let at = self.base + u64::from(gref) * 8;
        // SAFETY: the table is this domain's identity-mapped RAM (from start_info); `gref` is in
        // bounds and entries are 8-aligned; the hypervisor changes them concurrently with
        // atomics, so they are only accessed through atomics here.
        unsafe {
            Ok((
                &*(at as *const AtomicU16),
                &*((at + 2) as *const AtomicU16),
                &*((at + 4) as *const AtomicU32),
            ))
        }
    }

    /// The entry's `GTF_*` flags.
    pub fn flags(&self, gref: GrantRef) -> Result<u16, GrantError> {
        Ok(self.entry(gref)?.0.load(Ordering::Acquire))
    }

    /// True if the grantee is using the grant (`GTF_READING` or `GTF_WRITING`).
    pub fn is_in_use(&self, gref: GrantRef) -> Result<bool, GrantError> {
        Ok(self.flags(gref)? & (GTF_READING | GTF_WRITING) != 0)
    }

    /// Grants domain `domid` access to frame `frame` (guest-physical address >> 12)
    /// through reference `gref`, read-only if `readonly`. Publishes in the order SPEC
    /// §8.8.1 requires: `frame` and `domid`, a write barrier, then `flags`. Fails if the
    /// entry already grants access (revoke it first).
    ///
    /// # Safety
    ///
    /// From now until a successful [`revoke`](Self::revoke), `domid` may read (and
    /// unless `readonly` write) the frame at any time: the kernel must not hold Rust
    /// references to its memory that assume nobody else changes it (use raw pointers,
    /// volatile or atomic accesses), and must not reuse the frame for anything else.
    pub unsafe fn grant_access(
        &self,
        gref: GrantRef,
        domid: u16,
        frame: u64,
        readonly: bool,
    ) -> Result<(), GrantError> {
        let (flags, dom, fr) = self.entry(gref)?;
        if frame == 0 || frame > u64::from(u32::MAX) {
            return Err(GrantError::BadFrame(frame));
        }
        let cur = flags.load(Ordering::Acquire);
        if cur & (GTF_READING | GTF_WRITING) != 0 {
            return Err(GrantError::Busy);
        }
        if cur & GTF_PERMIT_ACCESS != 0 {
            return Err(GrantError::AlreadyGranted);
        }
        fr.store(frame as u32, Ordering::Relaxed);
        dom.store(domid, Ordering::Relaxed);
        fence(Ordering::Release);
        let ro = if readonly { GTF_READONLY } else { 0 };
        flags.store(GTF_PERMIT_ACCESS | ro, Ordering::Release);
        Ok(())
    }

    /// Revokes `gref`: atomically changes its flags to 0 unless the grantee is using it
    /// (then [`GrantError::Busy`]: unmapped or copied-from grants become free again
    /// when the grantee is done). After `Ok` the frame is this domain's alone again.
    /// Revoking an entry that grants nothing succeeds.
    pub fn revoke(&self, gref: GrantRef) -> Result<(), GrantError> {
        let (flags, _, _) = self.entry(gref)?;
        let mut cur = flags.load(Ordering::Acquire);
        loop {
            if cur & (GTF_READING | GTF_WRITING) != 0 {
                return Err(GrantError::Busy);
            }
            match flags.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }
}

/// `grant_table_op(cmd, ops, ops.len())`.
///
/// # Safety
///
/// `T` must be the operation structure of `cmd`, and what the operations make the
/// hypervisor do (write page-table entries, copy into frames) must be acceptable.
unsafe fn gnttab_op<T>(cmd: u64, ops: &mut [T]) -> Result<(), Error> {
    if ops.len() as u64 > GNTTAB_MAX_BATCH {
        return Err(Error::Errno(Errno::E2BIG));
    }
    // SAFETY: the array is exclusively borrowed and identity-mapped; the hypervisor
    // writes statuses and outputs back into it; the caller vouches for the effects.
    let ret = unsafe {
        hypercall3(
            Op::GrantTableOp,
            cmd,
            virt_to_phys(ops.as_mut_ptr()),
            ops.len() as u64,
        )
    };
    check(ret).map(|_| ())
}

/// Decodes a per-operation status.
fn status(s: i16) -> Result<(), Error> {
    check(i64::from(s)).map(|_| ())
}

/// A grant mapped with [`map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The handle [`unmap`] needs.
    pub handle: u32,
    /// The guest-physical address the frame appears at (a slot of the grant window).
    pub dev_bus_addr: u64,
}

/// `GNTTABOP_MAP_GRANT_REF`: maps grant `gref` of domain `dom` at virtual address
/// `host_addr` of the current page tables. `flags` must include [`GNTMAP_HOST_MAP`]
/// (plus [`GNTMAP_READONLY`], [`GNTMAP_APPLICATION_MAP`] as wanted). The L1 table for
/// `host_addr` must exist and its entry must be not present (else `EINVAL`/`EBUSY`):
/// on the boot page tables, any page of the grant window's identity range
/// (`start_info.grant_window_gpa`) qualifies. The hypervisor never replaces a present
/// mapping, so this cannot pull memory from under existing references.
pub fn map(dom: u16, gref: GrantRef, host_addr: u64, flags: u32) -> Result<Mapping, Error> {
    let mut op = [GnttabMapGrantRef {
        host_addr,
        flags,
        ref_: gref,
        dom,
        ..Default::default()
    }];
    // SAFETY: the map operation only fills a not-present L1 entry (refused otherwise).
    unsafe { gnttab_op(GNTTABOP_MAP_GRANT_REF, &mut op)? };
    status(op[0].status)?;
    Ok(Mapping {
        handle: op[0].handle,
        dev_bus_addr: op[0].dev_bus_addr,
    })
}

/// `GNTTABOP_UNMAP_GRANT_REF`: removes mapping `handle`, made at `host_addr` (whose L1
/// entry is cleared if it still holds the mapping).
///
/// # Safety
///
/// Nothing may use the memory at `host_addr` any more (no live references into it).
pub unsafe fn unmap(handle: u32, host_addr: u64) -> Result<(), Error> {
    let mut op = [GnttabUnmapGrantRef {
        host_addr,
        handle,
        ..Default::default()
    }];
    // SAFETY: the caller guarantees the mapping is no longer used.
    unsafe { gnttab_op(GNTTABOP_UNMAP_GRANT_REF, &mut op)? };
    status(op[0].status)
}

/// `GNTTABOP_COPY`: runs the batch of copies (at most 512). `Ok` means the batch was
/// processed: each operation's own result is in its `status` field (0 or -errno; see
/// [`copy_status`]); one failing operation does not stop the others.
///
/// # Safety
///
/// A destination that is a frame of this domain (no [`GNTCOPY_DEST_GREF`]) is
/// written behind the compiler's back: it must not be memory Rust code holds
/// references to (other than through raw pointers), nor memory the kernel needs intact.
pub unsafe fn copy(ops: &mut [GnttabCopy]) -> Result<(), Error> {
    // SAFETY: forwarded from the caller.
    unsafe { gnttab_op(GNTTABOP_COPY, ops) }
}

/// The result of one [`copy`] operation.
pub fn copy_status(op: &GnttabCopy) -> Result<(), Error> {
    status(op.status)
}

/// A [`GnttabCopyPtr`] naming grant `gref` of domain `domid` at byte `offset`.
pub fn gref_ptr(domid: u16, gref: GrantRef, offset: u16) -> GnttabCopyPtr {
    GnttabCopyPtr {
        ref_or_gfn: u64::from(gref),
        domid,
        offset,
        reserved: 0,
    }
}

/// A [`GnttabCopyPtr`] naming this domain's frame `gfn` (guest-physical address >>
/// 12) at byte `offset`.
pub fn local_ptr(gfn: u64, offset: u16) -> GnttabCopyPtr {
    GnttabCopyPtr {
        ref_or_gfn: gfn,
        domid: DOMID_SELF,
        offset,
        reserved: 0,
    }
}

/// `GNTTABOP_QUERY_SIZE` for this domain: (frames in use, most frames).
pub fn query_size() -> Result<(u32, u32), Error> {
    let mut op = [GnttabQuerySize {
        dom: DOMID_SELF,
        ..Default::default()
    }];
    // SAFETY: the query only writes its own output fields.
    unsafe { gnttab_op(GNTTABOP_QUERY_SIZE, &mut op)? };
    status(op[0].status)?;
    Ok((op[0].nr_frames, op[0].max_nr_frames))
}
