//! The PV block front-end (SPEC.md §8.9.5): requests over a shared
//! [`FrontRing`]`<`[`Blkif`]`>`, data in pages granted to the back-end, notifications over
//! an event channel. Needs the `pv_block`, `dev_op`, `gnttab` and `evtchn` features.
//!
//! ```no_run
//! use guest_sdk::blkfront::{BlkError, Blkfront, IoBuffers, Segment};
//! use guest_sdk::devices::{DeviceTable, DEV_PV_BLOCK};
//! use guest_sdk::grant::GrantTable;
//! use guest_sdk::StartInfo;
//!
//! /// Writes `data` (at most 11 pages) to sector 0 of the first PV disk and flushes.
//! /// `ring` and `buf` are page-aligned pages of RAM used for nothing else.
//! fn write_first_disk(
//!     si: &StartInfo,
//!     ring: *mut u8,
//!     buf: *mut u8,
//!     data: &[u8],
//! ) -> Result<(), BlkError> {
//!     let devices = DeviceTable::from_start_info(si).expect("a device table");
//!     let grants = GrantTable::from_start_info(si).expect("grant tables");
//!     let dev = devices.first(DEV_PV_BLOCK).expect("a PV disk");
//!     // SAFETY: `ring` and `buf` are pages used for nothing else; grant references
//!     // 10 and 11..=21 are free.
//!     let mut blk = unsafe { Blkfront::connect(devices, dev.index, grants, ring, 10) }?;
//!     let bufs = unsafe { IoBuffers::grant(grants, blk.backend(), buf, 11, 11, false) }?;
//!     bufs.view().copy_from(0, data).expect("data fits in the buffers");
//!     let (segs, n) = Segment::whole_pages(0, 11);
//!     blk.write(0, &segs[..n], &bufs)?;
//!     blk.flush()
//! }
//! ```
//!
//! The ring index logic is `hv_abi::ring`'s; this module adds the handshake (grant the
//! ring, allocate a port, `dev_op(CONNECT)`), request building and checking, and
//! waiting: [`WaitMode::Poll`] sleeps in `SCHEDOP_POLL` on the device's port (which
//! [`Blkfront::connect`] masks, so responses raise no upcall), [`WaitMode::Spin`] spins on
//! the ring without any hypercall. Everything but the handshake also works at CPL 3
//! (ring 3 needs the domain's `allow_user_hypercalls` for the notifications and polls
//! that are hypercalls; [`WaitMode::Spin`] makes none while waiting).
//!
//! Single user: a [`Blkfront`] is driven by one vCPU at a time (`&mut self`).

use core::fmt;

use hv_abi::blkif::{
    Blkif, BlkifRequest, BlkifSegment, BLKIF_MAX_SEGMENTS, BLKIF_OP_FLUSH, BLKIF_OP_READ,
    BLKIF_OP_WRITE, SECTORS_PER_PAGE,
};
use hv_abi::ring::{FrontRing, RingError, RingPage};
use hv_abi::PAGE_SIZE;

use crate::devices::{self, DevOpError, DeviceTable, DEV_PV_BLOCK, STATE_CONNECTED};
use crate::error::{check, Error};
use crate::evtchn::{self, Port};
use crate::grant::{GrantError, GrantRef, GrantTable};
use crate::volatile::VolatileSlice;
use crate::{sched, time, virt_to_phys};

pub use hv_abi::blkif::{BlkifResponse, SECTOR_SIZE};

/// Default limit on one wait for a response: 30 s of system time.
pub const DEFAULT_TIMEOUT_NS: u64 = 30_000_000_000;
/// How long one `SCHEDOP_POLL` sleeps before the wait looks at the device's state
/// again (a back-end that closes the device sends no event).
const POLL_SLICE_NS: u64 = 10_000_000;

/// Why a block operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device index names no PV block device.
    NotPvBlock {
        /// The index.
        index: u32,
        /// Its kind (0 if the index is past the table).
        kind: u16,
    },
    /// An address that must be page-aligned is not.
    Misaligned(u64),
    /// Granting or revoking a page failed.
    Grant {
        /// The grant reference.
        gref: GrantRef,
        /// Why.
        error: GrantError,
    },
    /// An event-channel or scheduler hypercall failed.
    Hypercall {
        /// What was being done.
        what: &'static str,
        /// The hypervisor's error.
        error: Error,
    },
    /// The handshake hypercall failed.
    DevOp(DevOpError),
    /// A request is malformed (checked before it is queued).
    BadRequest(&'static str),
    /// Every ring slot holds a request that has no response yet.
    RingFull,
    /// The back-end broke the ring protocol (claims more responses than requests).
    BrokenRing(RingError),
    /// The device is not connected: disconnected by this front-end, or closed by the
    /// back-end (then `error` is the negative errno from the device table).
    Closed {
        /// The table's `state`.
        state: u32,
        /// The table's `error`.
        error: i32,
    },
    /// A wait found no request in flight.
    Idle,
    /// A synchronous helper was called with other requests in flight.
    Busy,
    /// A synchronous helper got the response of a request it did not send.
    UnexpectedResponse {
        /// The id the response carried.
        id: u64,
    },
    /// No response within the timeout.
    TimedOut {
        /// Requests still in flight.
        in_flight: u32,
    },
    /// The back-end answered a request with an error status.
    Request {
        /// The request's id.
        id: u64,
        /// Its operation.
        operation: u8,
        /// The status, decoded.
        error: Error,
    },
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlkError::NotPvBlock { index, kind } => write!(
                f,
                "device {index} is not a PV block device (kind {kind}: {})",
                devices::kind_name(kind)
            ),
            BlkError::Misaligned(a) => write!(f, "address {a:#x} is not page-aligned"),
            BlkError::Grant { gref, error } => write!(f, "grant reference {gref}: {error}"),
            BlkError::Hypercall { what, error } => write!(f, "{what}: {error}"),
            BlkError::DevOp(e) => fmt::Display::fmt(&e, f),
            BlkError::BadRequest(what) => write!(f, "bad request: {what}"),
            BlkError::RingFull => f.write_str("the ring is full"),
            BlkError::BrokenRing(RingError::Overflow { prod, cons }) => write!(
                f,
                "the back-end broke the ring (rsp_prod {prod}, rsp_cons {cons})"
            ),
            BlkError::Closed { state, error } => write!(
                f,
                "the device is {} (error {error})",
                devices::state_name(state)
            ),
            BlkError::Idle => f.write_str("no request in flight"),
            BlkError::Busy => f.write_str("other requests are in flight"),
            BlkError::UnexpectedResponse { id } => {
                write!(f, "a response for id {id}, which was not sent")
            }
            BlkError::TimedOut { in_flight } => {
                write!(f, "timed out with {in_flight} request(s) in flight")
            }
            BlkError::Request {
                id,
                operation,
                error,
            } => write!(f, "request {id} (operation {operation}) failed: {error}"),
        }
    }
}

/// A block operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Disk to the segments' pages (needs writable grants).
    Read,
    /// The segments' pages to disk (read-only grants are enough).
    Write,
    /// Make every write answered so far durable before answering (no segments).
    Flush,
}

impl BlkOp {
    /// The `BLKIF_OP_*` value.
    pub const fn code(self) -> u8 {
        match self {
            BlkOp::Read => BLKIF_OP_READ,
            BlkOp::Write => BLKIF_OP_WRITE,
            BlkOp::Flush => BLKIF_OP_FLUSH,
        }
    }
}

/// One segment of a request: sectors `first_sect..=last_sect` of page `page` of an
/// [`IoBuffers`]. The sectors of a request's segments are consecutive on the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Page index in the [`IoBuffers`].
    pub page: u32,
    /// First sector of the page (0..=7).
    pub first_sect: u8,
    /// Last sector of the page (`first_sect..=7`).
    pub last_sect: u8,
}

impl Segment {
    /// The whole of page `page` (sectors 0..=7).
    pub const fn whole(page: u32) -> Segment {
        Segment {
            page,
            first_sect: 0,
            last_sect: SECTORS_PER_PAGE - 1,
        }
    }

    /// Sectors in the segment (0 if malformed).
    pub const fn sectors(&self) -> u64 {
        if self.first_sect > self.last_sect {
            0
        } else {
            (self.last_sect - self.first_sect) as u64 + 1
        }
    }

    /// Up to [`BLKIF_MAX_SEGMENTS`] whole pages from `first`: the array and how many
    /// of its entries are used (`n` capped at 11).
    pub fn whole_pages(first: u32, n: usize) -> ([Segment; BLKIF_MAX_SEGMENTS], usize) {
        let n = n.min(BLKIF_MAX_SEGMENTS);
        let mut s = [Segment::default(); BLKIF_MAX_SEGMENTS];
        for (i, seg) in s.iter_mut().enumerate().take(n) {
            *seg = Segment::whole(first.wrapping_add(i as u32));
        }
        (s, n)
    }
}

/// A response taken from the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's id.
    pub id: u64,
    /// The request's operation (`BLKIF_OP_*`).
    pub operation: u8,
    /// 0 or a negative errno.
    pub status: i16,
}

impl Completion {
    /// The status as a `Result`.
    pub fn result(&self) -> Result<(), Error> {
        check(i64::from(self.status)).map(|_| ())
    }
}

/// Consecutive pages of this domain granted to a back-end, for request data. Dropping
/// it without [`IoBuffers::revoke`] leaves the pages granted.
#[derive(Debug)]
pub struct IoBuffers {
    base: u64,
    pages: u32,
    first_gref: GrantRef,
    table: GrantTable,
}

impl IoBuffers {
    /// Grants the `pages` pages from `base` to domain `backend` through references
    /// `first_gref..first_gref + pages`, read-only if `readonly` (enough for disk
    /// writes; disk reads need writable grants). Fails, revoking what it granted, if a
    /// reference is beyond the table or already in use.
    ///
    /// # Safety
    /// The pages must be RAM of this domain (identity-mapped), used for nothing else
    /// until [`IoBuffers::revoke`] succeeds, and accessed only through
    /// [`IoBuffers::view`] or raw pointers (the back-end reads and writes them).
    pub unsafe fn grant(
        table: GrantTable,
        backend: u16,
        base: *mut u8,
        pages: u32,
        first_gref: GrantRef,
        readonly: bool,
    ) -> Result<IoBuffers, BlkError> {
        let addr = virt_to_phys(base);
        if addr % PAGE_SIZE != 0 {
            return Err(BlkError::Misaligned(addr));
        }
        for i in 0..pages {
            let gref = first_gref.wrapping_add(i);
            let frame = addr / PAGE_SIZE + u64::from(i);
            // SAFETY: the caller gave these pages to the back-end (see above).
            if let Err(error) = unsafe { table.grant_access(gref, backend, frame, readonly) } {
                for j in 0..i {
                    let _ = table.revoke(first_gref.wrapping_add(j));
                }
                return Err(BlkError::Grant { gref, error });
            }
        }
        Ok(IoBuffers {
            base: addr,
            pages,
            first_gref,
            table,
        })
    }

    /// Number of pages.
    pub const fn pages(&self) -> u32 {
        self.pages
    }

    /// The grant reference of page `page`, `None` past the end.
    pub fn gref(&self, page: u32) -> Option<GrantRef> {
        (page < self.pages).then(|| self.first_gref.wrapping_add(page))
    }

    /// The guest-physical address of the first page.
    pub const fn addr(&self) -> u64 {
        self.base
    }

    /// A volatile view of all the pages (the back-end may access them at any time).
    pub fn view(&self) -> VolatileSlice<'_> {
        // SAFETY: `grant`'s caller gave us the pages, identity-mapped, for as long as
        // this value lives; they are shared with the back-end, hence volatile.
        unsafe {
            VolatileSlice::new(
                self.base as *mut u8,
                self.pages as usize * PAGE_SIZE as usize,
            )
        }
    }

    /// Revokes every page's grant. Fails with the buffers back if the back-end still
    /// uses one (a request in flight): try again after its response.
    pub fn revoke(self) -> Result<(), (IoBuffers, BlkError)> {
        for i in 0..self.pages {
            let gref = self.first_gref.wrapping_add(i);
            if let Err(error) = self.table.revoke(gref) {
                return Err((self, BlkError::Grant { gref, error }));
            }
        }
        Ok(())
    }
}

/// How [`Blkfront`] waits for responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Sleep in `SCHEDOP_POLL` on the device's port (the back-end is asked for an
    /// event with the ring's final check).
    Poll,
    /// Spin on the ring's `rsp_prod`: no hypercall, no event.
    Spin,
}

/// A connected PV block device.
#[derive(Debug)]
pub struct Blkfront {
    devices: DeviceTable,
    dev: u32,
    backend: u16,
    sectors: u64,
    readonly: bool,
    grants: GrantTable,
    ring_page: *mut u8,
    ring_gref: GrantRef,
    ring: FrontRing<Blkif>,
    port: Port,
    connected: bool,
    next_id: u64,
    mode: WaitMode,
    timeout_ns: u64,
}

// SAFETY: the ring page pointer is only used through `FrontRing` (atomics and volatile
// copies); `connect`'s caller gave the page to this value for its life.
unsafe impl Send for Blkfront {}

impl Blkfront {
    /// Connects PV block device `dev`: zeroes and initialises the ring page at `ring`,
    /// grants it writable to the device's back-end through `ring_gref`, allocates an
    /// event-channel port for the back-end (and masks it: responses are awaited by
    /// polling or spinning, not upcalls), and runs `dev_op(CONNECT)`. Undoes what it
    /// did if a step fails. Waits with [`WaitMode::Poll`] and [`DEFAULT_TIMEOUT_NS`].
    ///
    /// # Safety
    /// `ring` must be a page of this domain's RAM (identity-mapped, 4 KiB-aligned) used
    /// for nothing else for the life of the returned value and until
    /// [`Blkfront::close`] succeeds (the back-end writes it), and `ring_gref` a grant
    /// reference the kernel uses for nothing else.
    pub unsafe fn connect(
        devices: DeviceTable,
        dev: u32,
        grants: GrantTable,
        ring: *mut u8,
        ring_gref: GrantRef,
    ) -> Result<Blkfront, BlkError> {
        let d = devices.get(dev).ok_or(BlkError::NotPvBlock {
            index: dev,
            kind: 0,
        })?;
        if d.kind() != DEV_PV_BLOCK {
            return Err(BlkError::NotPvBlock {
                index: dev,
                kind: d.kind(),
            });
        }
        let addr = virt_to_phys(ring);
        if addr % PAGE_SIZE != 0 {
            return Err(BlkError::Misaligned(addr));
        }
        // SAFETY: the caller gave us the page; nobody else uses it yet (not granted).
        unsafe { core::ptr::write_bytes(ring, 0, PAGE_SIZE as usize) };
        // SAFETY: as above, for the life of the returned value.
        let front = FrontRing::new(unsafe { RingPage::new(ring) });
        let backend = d.entry.backend_domid;
        // SAFETY: the page is the ring, shared with the back-end from now on and only
        // accessed through `FrontRing`.
        unsafe { grants.grant_access(ring_gref, backend, addr / PAGE_SIZE, false) }.map_err(
            |error| BlkError::Grant {
                gref: ring_gref,
                error,
            },
        )?;
        let port = match evtchn::alloc_unbound(u32::from(backend)) {
            Ok(p) => p,
            Err(error) => {
                let _ = grants.revoke(ring_gref);
                return Err(BlkError::Hypercall {
                    what: "allocating the device's event channel",
                    error,
                });
            }
        };
        let _ = evtchn::mask(port);
        if let Err(e) = devices::connect(dev, ring_gref, port) {
            let _ = evtchn::close(port);
            let _ = grants.revoke(ring_gref);
            return Err(BlkError::DevOp(e));
        }
        Ok(Blkfront {
            devices,
            dev,
            backend,
            sectors: d.entry.size,
            readonly: d.readonly(),
            grants,
            ring_page: ring,
            ring_gref,
            ring: front,
            port,
            connected: true,
            next_id: 1,
            mode: WaitMode::Poll,
            timeout_ns: DEFAULT_TIMEOUT_NS,
        })
    }

    /// The device index.
    pub const fn device(&self) -> u32 {
        self.dev
    }

    /// The back-end's domain id (grant data pages to it).
    pub const fn backend(&self) -> u16 {
        self.backend
    }

    /// The disk's size in 512-byte sectors.
    pub const fn sectors(&self) -> u64 {
        self.sectors
    }

    /// True if the disk refuses writes.
    pub const fn readonly(&self) -> bool {
        self.readonly
    }

    /// The event-channel port shared with the back-end.
    pub const fn port(&self) -> Port {
        self.port
    }

    /// The ring page's grant reference.
    pub const fn ring_gref(&self) -> GrantRef {
        self.ring_gref
    }

    /// True between a successful connect (or reconnect) and a disconnect.
    pub const fn is_connected(&self) -> bool {
        self.connected
    }

    /// Requests queued and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.ring.in_flight()
    }

    /// Ring slots free for new requests.
    pub fn free_slots(&self) -> u32 {
        self.ring.free_requests()
    }

    /// Sets how waits wait, and their limit in ns of system time (0: none).
    pub fn set_wait(&mut self, mode: WaitMode, timeout_ns: u64) {
        self.mode = mode;
        self.timeout_ns = timeout_ns;
    }

    /// The device's state and error in the device table (no hypercall).
    pub fn table_state(&self) -> (u32, i32) {
        self.devices.state(self.dev).unwrap_or((0, 0))
    }

    fn closed(&self) -> BlkError {
        let (state, error) = self.table_state();
        BlkError::Closed { state, error }
    }

    /// Checks and queues a request on the pages of `bufs` (not visible to the back-end
    /// until [`Blkfront::push`]); returns its id. Read and write take 1 to 11 segments
    /// (`first_sect <= last_sect <= 7`, pages inside `bufs`); flush takes none and
    /// sector 0. Sector ranges are the back-end's to check (`-ERANGE`).
    pub fn queue(
        &mut self,
        op: BlkOp,
        sector: u64,
        segs: &[Segment],
        bufs: &IoBuffers,
    ) -> Result<u64, BlkError> {
        let mut seg = [BlkifSegment::default(); BLKIF_MAX_SEGMENTS];
        match op {
            BlkOp::Flush => {
                if !segs.is_empty() || sector != 0 {
                    return Err(BlkError::BadRequest("a flush has no segments and sector 0"));
                }
            }
            BlkOp::Read | BlkOp::Write => {
                if segs.is_empty() || segs.len() > BLKIF_MAX_SEGMENTS {
                    return Err(BlkError::BadRequest("1 to 11 segments"));
                }
                for (s, out) in segs.iter().zip(seg.iter_mut()) {
                    if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
                        return Err(BlkError::BadRequest(
                            "a segment's sectors are not first <= last <= 7",
                        ));
                    }
                    let gref = bufs
                        .gref(s.page)
                        .ok_or(BlkError::BadRequest("a segment's page is past the buffers"))?;
                    *out = BlkifSegment {
                        gref,
                        first_sect: s.first_sect,
                        last_sect: s.last_sect,
                        reserved: 0,
                    };
                }
            }
        }
        let id = self.next_id;
        let req = BlkifRequest {
            operation: op.code(),
            nr_segments: segs.len() as u8,
            handle: 0,
            reserved: 0,
            id,
            sector_number: sector,
            seg,
        };
        self.queue_raw(&req)?;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(id)
    }

    /// Queues `req` exactly as given (no check: for exercising a back-end's
    /// validation). Its `id` is the caller's.
    pub fn queue_raw(&mut self, req: &BlkifRequest) -> Result<(), BlkError> {
        if !self.connected {
            return Err(self.closed());
        }
        if self.ring.put_request(req) {
            Ok(())
        } else {
            Err(BlkError::RingFull)
        }
    }

    /// Publishes the queued requests and notifies the back-end if it asked for it.
    /// Returns whether it notified.
    pub fn push(&mut self) -> Result<bool, BlkError> {
        if !self.connected {
            return Err(self.closed());
        }
        if !self.ring.push_requests() {
            return Ok(false);
        }
        evtchn::send(self.port).map_err(|error| BlkError::Hypercall {
            what: "notifying the back-end",
            error,
        })?;
        Ok(true)
    }

    /// Takes a response if one is there (no waiting).
    pub fn try_response(&mut self) -> Result<Option<Completion>, BlkError> {
        let r = self.ring.pop_response().map_err(BlkError::BrokenRing)?;
        Ok(r.map(|r| Completion {
            id: r.id,
            operation: r.operation,
            status: r.status,
        }))
    }

    /// Waits for the next response (in the set [`WaitMode`], up to the set timeout).
    /// Fails with [`BlkError::Idle`] if nothing is in flight, [`BlkError::Closed`] if
    /// the device is (or becomes) not connected, [`BlkError::TimedOut`].
    pub fn wait_response(&mut self) -> Result<Completion, BlkError> {
        let start = time::system_time_ns();
        let deadline = if self.timeout_ns == 0 {
            0
        } else {
            start.saturating_add(self.timeout_ns)
        };
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.try_response()? {
                return Ok(c);
            }
            if self.in_flight() == 0 {
                return Err(BlkError::Idle);
            }
            if !self.connected || self.table_state().0 != STATE_CONNECTED {
                return Err(self.closed());
            }
            match self.mode {
                WaitMode::Spin => {
                    core::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins % 1024 != 0 {
                        continue;
                    }
                }
                WaitMode::Poll => {
                    evtchn::clear_pending(self.port);
                    if self.ring.final_check_for_responses() {
                        continue;
                    }
                    let now = time::system_time_ns();
                    let until = match deadline {
                        0 => now.saturating_add(POLL_SLICE_NS),
                        d => d.min(now.saturating_add(POLL_SLICE_NS)),
                    };
                    sched::poll(&[self.port], until).map_err(|error| BlkError::Hypercall {
                        what: "SCHEDOP_POLL on the device's port",
                        error,
                    })?;
                }
            }
            if deadline != 0 && time::system_time_ns() >= deadline {
                return Err(BlkError::TimedOut {
                    in_flight: self.in_flight(),
                });
            }
        }
    }

    /// Queues one request, pushes it and waits for its response; an error status
    /// becomes [`BlkError::Request`]. Needs an idle ring ([`BlkError::Busy`]
    /// otherwise).
    pub fn submit_and_wait(
        &mut self,
        op: BlkOp,
        sector: u64,
        segs: &[Segment],
        bufs: &IoBuffers,
    ) -> Result<(), BlkError> {
        if self.in_flight() != 0 {
            return Err(BlkError::Busy);
        }
        let id = self.queue(op, sector, segs, bufs)?;
        self.push()?;
        let c = self.wait_response()?;
        if c.id != id {
            return Err(BlkError::UnexpectedResponse { id: c.id });
        }
        c.result().map_err(|error| BlkError::Request {
            id,
            operation: c.operation,
            error,
        })
    }

    /// Reads from `sector` into the segments' pages (synchronous).
    pub fn read(
        &mut self,
        sector: u64,
        segs: &[Segment],
        bufs: &IoBuffers,
    ) -> Result<(), BlkError> {
        self.submit_and_wait(BlkOp::Read, sector, segs, bufs)
    }

    /// Writes the segments' pages to `sector` (synchronous).
    pub fn write(
        &mut self,
        sector: u64,
        segs: &[Segment],
        bufs: &IoBuffers,
    ) -> Result<(), BlkError> {
        self.submit_and_wait(BlkOp::Write, sector, segs, bufs)
    }

    /// Flushes: every write answered before is durable when this returns.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.in_flight() != 0 {
            return Err(BlkError::Busy);
        }
        let id = self.next_id;
        let req = BlkifRequest {
            operation: BLKIF_OP_FLUSH,
            nr_segments: 0,
            handle: 0,
            reserved: 0,
            id,
            sector_number: 0,
            seg: [BlkifSegment::default(); BLKIF_MAX_SEGMENTS],
        };
        self.queue_raw(&req)?;
        self.next_id = self.next_id.wrapping_add(1);
        self.push()?;
        let c = self.wait_response()?;
        if c.id != id {
            return Err(BlkError::UnexpectedResponse { id: c.id });
        }
        c.result().map_err(|error| BlkError::Request {
            id: c.id,
            operation: c.operation,
            error,
        })
    }

    /// `dev_op(DISCONNECT)`: the back-end stops; requests in flight get no response
    /// and are forgotten. The ring grant and the port are kept for
    /// [`Blkfront::reconnect`].
    pub fn disconnect(&mut self) -> Result<(), BlkError> {
        devices::disconnect(self.dev).map_err(BlkError::DevOp)?;
        self.connected = false;
        Ok(())
    }

    /// Connects again after a disconnect (or after the back-end closed the device):
    /// re-initialises the ring page (indices from 0) and runs `dev_op(CONNECT)` with
    /// the same ring grant and port.
    pub fn reconnect(&mut self) -> Result<(), BlkError> {
        if self.connected && self.table_state().0 == STATE_CONNECTED {
            return Ok(());
        }
        // SAFETY: `connect`'s caller gave us the page for our life; the back-end has
        // stopped using it (disconnected or closed).
        self.ring = FrontRing::new(unsafe { RingPage::new(self.ring_page) });
        evtchn::clear_pending(self.port);
        devices::connect(self.dev, self.ring_gref, self.port).map_err(BlkError::DevOp)?;
        self.connected = true;
        Ok(())
    }

    /// Disconnects (if connected), revokes the ring grant and closes the port: the
    /// ring page is the kernel's again. Afterwards every operation fails with
    /// [`BlkError::Closed`] (and [`Blkfront::reconnect`] with a grant error). If the
    /// disconnect or the revoke fails, the call can be repeated.
    pub fn close(&mut self) -> Result<(), BlkError> {
        if self.connected {
            self.disconnect()?;
        }
        self.grants
            .revoke(self.ring_gref)
            .map_err(|error| BlkError::Grant {
                gref: self.ring_gref,
                error,
            })?;
        let _ = evtchn::close(self.port);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert_eq!(Segment::whole(3).sectors(), 8);
        let s = Segment {
            page: 0,
            first_sect: 2,
            last_sect: 2,
        };
        assert_eq!(s.sectors(), 1);
        let bad = Segment {
            page: 0,
            first_sect: 5,
            last_sect: 4,
        };
        assert_eq!(bad.sectors(), 0);
        let (segs, n) = Segment::whole_pages(7, 20);
        assert_eq!(n, BLKIF_MAX_SEGMENTS);
        assert!(segs
            .iter()
            .enumerate()
            .all(|(i, s)| *s == Segment::whole(7 + i as u32)));
        let (segs, n) = Segment::whole_pages(0, 2);
        assert_eq!(n, 2);
        assert_eq!(segs[2], Segment::default());
        assert_eq!(BlkOp::Read.code(), BLKIF_OP_READ);
        assert_eq!(BlkOp::Write.code(), BLKIF_OP_WRITE);
        assert_eq!(BlkOp::Flush.code(), BLKIF_OP_FLUSH);
        let c = Completion {
            id: 1,
            operation: BLKIF_OP_READ,
            status: -34,
        };
        assert_eq!(c.result(), Err(Error::Errno(hv_abi::Errno::ERANGE)));
    }
}
