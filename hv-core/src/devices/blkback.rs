//! The PV block back-end (SPEC.md §8.9.5): one per `DEV_PV_BLOCK` device, a thread that
//! serves the device's ring with [`hv_abi::ring::BackRing`] over a [`Disk`].
//!
//! `DEVOP_CONNECT` pins the ring grant (writable, for `DOMID_HV`) and binds the
//! front-end's port to the back-end: a guest send then wakes the thread. The thread takes
//! one request at a time (copied out of the ring once), checks every field of the copy
//! (operation, segment count, sector ranges, reserved fields, disk range) and every
//! segment's grant (pinned for the request: writable for a disk read, read access for a
//! disk write) before any data moves, then moves the data in one `preadv`/`pwritev`
//! directly between the granted pages and the image. A flush is `fdatasync`. Each
//! request gets a response (status 0 or a negative errno), pushed at once; the guest is
//! notified only when the ring's `rsp_event` asks for it. A ring whose `req_prod` claims
//! more requests than it can hold closes the device with error `-EINVAL`.
//!
//! The connection lives under one mutex that the thread takes per request, so
//! `DEVOP_DISCONNECT` waits at most for the request in progress. The thread holds only a
//! weak reference to its domain and stops (joined) when the domain dies, after the
//! request in progress; the image is then `fdatasync`'d.
//!
//! What this module owns and may call: each back-end owns its disk, its connection (the
//! ring, the ring grant's reference, the bound port) and its thread. It pins the
//! front-end's grants through the domain's [`Grants`] (host pins, for `DOMID_HV`), takes
//! its port through the domain's event channels, reads and writes granted frames in the
//! domain's memory, and reports state changes to the domain's device table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use hv_abi::blkif::{
    Blkif, BlkifRequest, BlkifResponse, BLKIF_MAX_SEGMENTS, BLKIF_OP_FLUSH, BLKIF_OP_READ,
    BLKIF_OP_WRITE, SECTORS_PER_PAGE, SECTOR_SIZE,
};
use hv_abi::device::{STATE_CLOSED, STATE_CONNECTED, STATE_INITIALISING};
use hv_abi::ring::{BackRing, RingPage};
use hv_abi::{Errno, PAGE_SIZE};

use super::disk::{Disk, DiskError};
use crate::domain::DomainShared;
use crate::evtchn::{HostNotify, HostPort};
use crate::grant::{Grants, HostPin};
use crate::memory::DomainMemory;

/// Counters of one PV block device (for tests and statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Flushes answered with success (each after its `fdatasync` returned).
    pub flushes: u64,
    /// Bytes moved between guest pages and the image.
    pub bytes: u64,
    /// Times the back-end closed the device because of a broken ring.
    pub ring_errors: u64,
    /// Times a front-end connected.
    pub connects: u64,
}

/// A live connection: the ring, its pinned grant, the bound port.
#[derive(Debug)]
struct Conn {
    ring: BackRing<Blkif>,
    ring_gref: u32,
    port: HostPort,
}

/// The device's handshake state and connection.
#[derive(Debug)]
struct Slot {
    state: u32,
    conn: Option<Conn>,
}

#[derive(Debug, Default)]
struct Wake {
    kicked: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    flushes: AtomicU64,
    bytes: AtomicU64,
    ring_errors: AtomicU64,
    connects: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    dev: u32,
    disk: Arc<Disk>,
    slot: Mutex<Slot>,
    wake: Mutex<Wake>,
    cv: Condvar,
    counters: Counters,
}

impl Inner {
    fn kick(&self) {
        if let Ok(mut w) = self.wake.lock() {
            w.kicked = true;
            self.cv.notify_one();
        }
    }

    fn lock_slot(&self) -> Result<MutexGuard<'_, Slot>, Errno> {
        self.slot.lock().map_err(|_| Errno::EIO)
    }

    fn stopping(&self) -> bool {
        self.wake.lock().map_or(true, |w| w.stop)
    }
}

/// A PV block device's back-end.
#[derive(Debug)]
pub struct BlkBack {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl BlkBack {
    /// The back-end of device `dev` over `disk` (state `INITIALISING`, no thread yet).
    pub fn new(dev: u32, disk: Arc<Disk>) -> BlkBack {
        BlkBack {
            inner: Arc::new(Inner {
                dev,
                disk,
                slot: Mutex::new(Slot {
                    state: STATE_INITIALISING,
                    conn: None,
                }),
                wake: Mutex::new(Wake::default()),
                cv: Condvar::new(),
                counters: Counters::default(),
            }),
            thread: Mutex::new(None),
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> BlkStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            requests: g(&c.requests),
            errors: g(&c.errors),
            flushes: g(&c.flushes),
            bytes: g(&c.bytes),
            ring_errors: g(&c.ring_errors),
            connects: g(&c.connects),
        }
    }

    /// `DEVOP_CONNECT`: pins the ring, binds the port, starts (or wakes) the thread.
    pub(super) fn connect(
        &self,
        dom: &DomainShared,
        weak: &Weak<DomainShared>,
        ring_gref: u32,
        port: u32,
    ) -> Result<(), Errno> {
        let inner = &self.inner;
        if inner.stopping() || dom.is_stopping() {
            return Err(Errno::ESRCH);
        }
        let mut slot = inner.lock_slot()?;
        if slot.state == STATE_CONNECTED {
            return Err(Errno::EBUSY);
        }
        let frame = dom.grants.host_pin(ring_gref, true).map_err(|e| match e {
            // A grant of a frame that is not RAM.
            Errno::EINVAL => Errno::EACCES,
            e => e,
        })?;
        let host = match dom.mem.host_address(frame * PAGE_SIZE) {
            Ok(h) => h,
            Err(_) => {
                dom.grants.host_unpin(ring_gref, true);
                return Err(Errno::EINVAL);
            }
        };
        let me = Arc::downgrade(inner);
        let notify = HostNotify(Arc::new(move || {
            if let Some(i) = me.upgrade() {
                i.kick();
            }
        }));
        let hp = match dom.evtchn.bind_host(port, notify) {
            Ok(hp) => hp,
            Err(e) => {
                dom.grants.host_unpin(ring_gref, true);
                return Err(e);
            }
        };
        if let Err(e) = self.ensure_thread(weak) {
            tracing::error!(error = %e, "cannot start a PV block back-end thread");
            dom.evtchn.unbind_host(hp);
            dom.grants.host_unpin(ring_gref, true);
            return Err(Errno::ENOMEM);
        }
        // The connection is part of the domain's devices, dropped by `stop` at the latest.
        // SAFETY: `host` is a 4 KiB-aligned RAM frame of `dom`, mapped for the domain's
        // life (which outlives this connection) and pinned while the connection exists.
        let page = unsafe { RingPage::new(host as *mut u8) };
        slot.conn = Some(Conn {
            ring: BackRing::attach(page),
            ring_gref,
            port: hp,
        });
        slot.state = STATE_CONNECTED;
        dom.devices.set_state(dom, inner.dev, STATE_CONNECTED, 0);
        drop(slot);
        inner.counters.connects.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(dev = inner.dev, ring_gref, port, "PV block connected");
        // Requests may be in the ring already.
        inner.kick();
        Ok(())
    }

    /// `DEVOP_DISCONNECT`: waits for the request in progress, releases the ring and the
    /// port. `EBUSY` if not connected.
    pub(super) fn disconnect(&self, dom: &DomainShared) -> Result<(), Errno> {
        let mut slot = self.inner.lock_slot()?;
        if slot.conn.is_none() {
            return Err(Errno::EBUSY);
        }
        close(dom, &self.inner, &mut slot, 0);
        Ok(())
    }

    fn ensure_thread(&self, weak: &Weak<DomainShared>) -> std::io::Result<()> {
        let mut t = self
            .thread
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if t.is_some() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let weak = weak.clone();
        *t = Some(
            std::thread::Builder::new()
                .name(format!("blkback{}", self.inner.dev))
                .spawn(move || worker(&inner, &weak))?,
        );
        Ok(())
    }

    /// Stops the thread (joined: the request in progress finishes), makes what it wrote
    /// durable (`fdatasync` of a writable image) and releases a live connection.
    /// Idempotent.
    pub(super) fn stop(&self, dom: &DomainShared) {
        if let Ok(mut w) = self.inner.wake.lock() {
            w.stop = true;
            self.inner.cv.notify_all();
        }
        let h = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = h {
            if h.join().is_err() {
                tracing::error!(dev = self.inner.dev, "a PV block back-end thread panicked");
            }
            super::sync_disk(&self.inner.disk, self.inner.dev);
        }
        if let Ok(mut slot) = self.inner.lock_slot() {
            if slot.conn.is_some() {
                close(dom, &self.inner, &mut slot, 0);
            }
        }
    }
}

/// Ends the connection in `slot`: with `error` != 0 the back-end closes it (the guest
/// gets an event first, so a front-end waiting on the port looks at the state).
fn close(dom: &DomainShared, inner: &Inner, slot: &mut Slot, error: i32) {
    if let Some(c) = slot.conn.take() {
        if error != 0 {
            dom.evtchn.notify_guest(c.port);
        }
        dom.evtchn.unbind_host(c.port);
        dom.grants.host_unpin(c.ring_gref, true);
    }
    slot.state = STATE_CLOSED;
    dom.devices.set_state(dom, inner.dev, STATE_CLOSED, error);
}

fn worker(inner: &Inner, weak: &Weak<DomainShared>) {
    loop {
        {
            let Ok(mut w) = inner.wake.lock() else { return };
            while !w.kicked && !w.stop {
                w = match inner.cv.wait(w) {
                    Ok(w) => w,
                    Err(_) => return,
                };
            }
            if w.stop {
                return;
            }
            w.kicked = false;
        }
        let Some(dom) = weak.upgrade() else { return };
        serve(&dom, inner);
    }
}

/// Serves the ring until it is empty (after the final check), the device closes or the
/// back-end stops.
fn serve(dom: &DomainShared, inner: &Inner) {
    loop {
        if inner.stopping() || dom.is_stopping() {
            return;
        }
        let Ok(mut slot) = inner.lock_slot() else {
            return;
        };
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        let req = match conn.ring.pop_request() {
            Ok(Some(r)) => r,
            Ok(None) => match conn.ring.final_check_for_requests() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    broken(dom, inner, &mut slot, e);
                    return;
                }
            },
            Err(e) => {
                broken(dom, inner, &mut slot, e);
                return;
            }
        };
        let status = match handle(&dom.grants, &dom.mem, &inner.disk, &req) {
            Ok(bytes) => {
                inner.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                if req.operation == BLKIF_OP_FLUSH {
                    inner.counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
                0
            }
            Err(e) => {
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dev = inner.dev, id = req.id, op = req.operation, %e, "PV block request failed");
                errno_status(e)
            }
        };
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let rsp = BlkifResponse {
            id: req.id,
            operation: req.operation,
            status,
            ..BlkifResponse::default()
        };
        // A request was just taken, so its response has a slot.
        conn.ring.put_response(&rsp);
        if conn.ring.push_responses() {
            dom.evtchn.notify_guest(conn.port);
        }
    }
}

/// The negative errno of `e` as a block response status (SPEC: `status` is an `i16`).
#[allow(
    clippy::cast_possible_truncation,
    reason = "every Errno is below 256 (hv-abi), so its negation fits an i16"
)]
fn errno_status(e: Errno) -> i16 {
    e.to_ret() as i16
}

fn broken(dom: &DomainShared, inner: &Inner, slot: &mut Slot, e: hv_abi::ring::RingError) {
    tracing::warn!(domain = %dom.name, dev = inner.dev, error = ?e, "PV block: broken ring; device closed");
    inner.counters.ring_errors.fetch_add(1, Ordering::Relaxed);
    close(dom, inner, slot, errno_status(Errno::EINVAL).into());
}

fn disk_errno(e: &DiskError) -> Errno {
    match e {
        DiskError::OutOfRange { .. } => Errno::ERANGE,
        DiskError::ReadOnly => Errno::EACCES,
        DiskError::Io(_)
        | DiskError::Open { .. }
        | DiskError::BadSize { .. }
        | DiskError::Locked { .. } => Errno::EIO,
    }
}

/// Runs one request (a copy) whose segments are grants of `grants`' domain, whose
/// memory is `mem`. Returns the bytes moved, or the request's error status. Every check
/// happens before any data moves.
fn handle(
    grants: &Grants,
    mem: &DomainMemory,
    disk: &Disk,
    req: &BlkifRequest,
) -> Result<u64, Errno> {
    let read = match req.operation {
        BLKIF_OP_READ => true,
        BLKIF_OP_WRITE => false,
        BLKIF_OP_FLUSH => {
            if req.nr_segments != 0
                || req.sector_number != 0
                || req.handle != 0
                || req.reserved != 0
            {
                return Err(Errno::EINVAL);
            }
            disk.flush().map_err(|e| {
                tracing::error!(error = %e, "PV block: fdatasync failed");
                Errno::EIO
            })?;
            return Ok(0);
        }
        _ => return Err(Errno::ENOSYS),
    };
    let n = usize::from(req.nr_segments);
    if req.handle != 0 || req.reserved != 0 || n == 0 || n > BLKIF_MAX_SEGMENTS {
        return Err(Errno::EINVAL);
    }
    let segs = &req.seg[..n];
    let mut sectors = 0u64;
    for s in segs {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE || s.reserved != 0 {
            return Err(Errno::EINVAL);
        }
        sectors += u64::from(s.last_sect - s.first_sect) + 1;
    }
    let bytes = sectors * SECTOR_SIZE;
    disk.check(req.sector_number, bytes)
        .map_err(|e| disk_errno(&e))?;
    if !read && disk.readonly() {
        return Err(Errno::EACCES);
    }
    // Pin every segment's grant (a disk read writes the guest's pages); released when
    // `pins` drops, after the I/O.
    let mut pins = Vec::with_capacity(n);
    let mut iov = Vec::with_capacity(n);
    for s in segs {
        let pin = HostPin::new(grants, s.gref, read).map_err(|e| match e {
            // A grant of a frame that is not RAM.
            Errno::EINVAL => Errno::EACCES,
            e => e,
        })?;
        let gpa = pin.frame() * PAGE_SIZE + u64::from(s.first_sect) * SECTOR_SIZE;
        let len = (u64::from(s.last_sect - s.first_sect) + 1) * SECTOR_SIZE;
        mem.check_ram(gpa, len).map_err(|_| Errno::EACCES)?;
        let host = mem.host_address(gpa).map_err(|_| Errno::EACCES)?;
        iov.push(libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: crate::conv::usize_from(len),
        });
        pins.push(pin);
    }
    // The guest may change the bytes concurrently: that changes only what is moved.
    // SAFETY: each iovec lies inside one RAM frame of `mem` (checked above), which stays
    // mapped while `mem` lives, and is pinned until `pins` drops after the call.
    let r = unsafe {
        if read {
            disk.readv_raw(req.sector_number, &iov)
        } else {
            disk.writev_raw(req.sector_number, &iov)
        }
    };
    drop(pins);
    r.map_err(|e| {
        if matches!(e, DiskError::Io(_)) {
            tracing::error!(error = %e, "PV block: image I/O failed");
        }
        disk_errno(&e)
    })?;
    Ok(bytes)
}
