//! Shared request/response rings (ABI 1.2), the layout and index rules of Xen's
//! `io/ring.h`, with a front-end half ([`FrontRing`]) and a back-end half
//! ([`BackRing`]) usable by guests and by the hypervisor alike.
//!
//! A ring is one 4 KiB page: a 64-byte [`RingHeader`] followed by
//! [`RingProtocol::ENTRIES`] slots of [`RingProtocol::SLOT_SIZE`] bytes. A slot holds a
//! request until the back-end consumed it, then the response to some request (not
//! necessarily the same one). Indices are free-running `u32` and wrap; the slot of index
//! `i` is `i & (ENTRIES - 1)`.
//!
//! Notification: after publishing up to index `new` (from `old`), a producer notifies the
//! consumer only if the consumer's `*_event` lies in `(old, new]`; a consumer that runs
//! out of work sets its `*_event` to one past what it consumed and checks once more
//! ("final check"), so a busy ring needs no events at all.
//!
//! The back-end copies every request out of the ring once ([`BackRing::pop_request`])
//! and works only on the copy, so a front-end that rewrites a slot afterwards changes
//! nothing (no double fetch). A front-end whose `req_prod` claims more than
//! `ENTRIES` outstanding requests is reported with [`RingError::Overflow`].

use core::marker::PhantomData;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;

/// Byte offset of the first slot in the ring page.
pub const RING_HEADER_SIZE: usize = 64;

/// The ring page header (64 bytes), Xen's `struct *_sring` header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RingHeader {
    /// Requests produced by the front-end (free-running).
    pub req_prod: u32,
    /// The back-end wants an event when `req_prod` passes this index.
    pub req_event: u32,
    /// Responses produced by the back-end (free-running).
    pub rsp_prod: u32,
    /// The front-end wants an event when `rsp_prod` passes this index.
    pub rsp_event: u32,
    /// Reserved, 0.
    pub reserved: [u8; 48],
}

/// Largest power of two `n` with `RING_HEADER_SIZE + n * slot_size <= 4096`
/// (0 if not even one slot fits).
pub const fn ring_entries(slot_size: usize) -> u32 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "PAGE_SIZE is 4096, which fits every usize"
    )]
    const PAGE: usize = PAGE_SIZE as usize;
    if slot_size == 0 || slot_size > PAGE - RING_HEADER_SIZE {
        return 0;
    }
    let n = (PAGE - RING_HEADER_SIZE) / slot_size;
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// A request/response protocol carried by a ring.
pub trait RingProtocol {
    /// A request, written by the front-end.
    type Req: FromBytes + IntoBytes + Immutable + KnownLayout + Copy;
    /// A response, written by the back-end.
    type Rsp: FromBytes + IntoBytes + Immutable + KnownLayout + Copy;
    /// Bytes per slot: the larger of the two.
    const SLOT_SIZE: usize = if size_of::<Self::Req>() > size_of::<Self::Rsp>() {
        size_of::<Self::Req>()
    } else {
        size_of::<Self::Rsp>()
    };
    /// Slots in the ring (a power of two).
    const ENTRIES: u32 = ring_entries(Self::SLOT_SIZE);
}

/// The peer broke the ring protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The producer's index claims more unconsumed entries than the ring holds.
    Overflow {
        /// The producer index read.
        prod: u32,
        /// The consumer's own index.
        cons: u32,
    },
}

/// A ring page in the caller's address space.
///
/// Every access is volatile or atomic: the peer writes the page concurrently.
#[derive(Debug)]
pub struct RingPage {
    base: *mut u8,
}

// SAFETY: the page is only accessed through atomics and volatile copies; the creator of
// a RingPage promised it stays mapped for its life (`RingPage::new`).
unsafe impl Send for RingPage {}

impl RingPage {
    /// A ring page at `base`.
    ///
    /// # Safety
    /// `base` must be 4 KiB-aligned and point to 4096 bytes that stay mapped, readable
    /// and writable for as long as the returned value (and rings built on it) live.
    /// Other parties may write the page concurrently.
    pub const unsafe fn new(base: *mut u8) -> RingPage {
        RingPage { base }
    }

    /// The page's address.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset < RING_HEADER_SIZE && offset % 4 == 0);
        // SAFETY: `offset` is one of the four aligned header words inside the page
        // `new`'s caller promised is mapped; AtomicU32 allows concurrent writers.
        unsafe { &*(self.base.add(offset) as *const AtomicU32) }
    }

    fn load(&self, offset: usize) -> u32 {
        self.index(offset).load(Ordering::Acquire)
    }

    fn store(&self, offset: usize, v: u32) {
        self.index(offset).store(v, Ordering::Release)
    }

    fn slot_ptr<P: RingProtocol>(&self, idx: u32) -> *mut u8 {
        let slot = (idx & (P::ENTRIES - 1)) as usize;
        // SAFETY (of the arithmetic): ENTRIES slots of SLOT_SIZE after the header fit in
        // the page by construction of `ring_entries`.
        self.base
            .wrapping_add(RING_HEADER_SIZE + slot * P::SLOT_SIZE)
    }

    fn read_slot<P: RingProtocol, T: FromBytes + IntoBytes>(&self, idx: u32) -> T {
        let mut v = T::new_zeroed();
        let dst = v.as_mut_bytes();
        let src = self.slot_ptr::<P>(idx);
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: `src + i` lies in the slot (size_of T <= SLOT_SIZE) inside the page.
            *b = unsafe { core::ptr::read_volatile(src.add(i)) };
        }
        v
    }

    fn write_slot<P: RingProtocol, T: IntoBytes + Immutable>(&self, idx: u32, v: &T) {
        let dst = self.slot_ptr::<P>(idx);
        for (i, b) in v.as_bytes().iter().enumerate() {
            // SAFETY: as in `read_slot`.
            unsafe { core::ptr::write_volatile(dst.add(i), *b) };
        }
    }

    /// Moves the producer index at `prod` to `new` (slots first, then the index) and
    /// returns whether the peer's event index at `event` asks for a notification.
    fn publish(&self, prod: usize, event: usize, new: u32) -> bool {
        let old = self.load(prod);
        fence(Ordering::Release);
        self.store(prod, new);
        fence(Ordering::SeqCst);
        need_notify(old, new, self.load(event))
    }

    /// Zeroes the header and sets `req_event` = `rsp_event` = 1 (Xen's
    /// `SHARED_RING_INIT`). Only the front-end does this, before it connects.
    pub fn init(&self) {
        self.store(0, 0);
        self.store(8, 0);
        self.store(4, 1);
        self.store(12, 1);
        for off in (16..RING_HEADER_SIZE).step_by(4) {
            self.store(off, 0);
        }
    }
}

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// True if the peer asked to be notified of a move of the producer index from `old` to
/// `new`, given its `event` index (`(new - event) < (new - old)`, wrapping).
pub const fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The front-end half: produces requests, consumes responses.
#[derive(Debug)]
pub struct FrontRing<P: RingProtocol> {
    page: RingPage,
    req_prod_pvt: u32,
    rsp_cons: u32,
    _p: PhantomData<P>,
}

impl<P: RingProtocol> FrontRing<P> {
    /// Initialises the shared page (`RingPage::init`) and returns the front half.
    pub fn new(page: RingPage) -> FrontRing<P> {
        page.init();
        FrontRing {
            page,
            req_prod_pvt: 0,
            rsp_cons: 0,
            _p: PhantomData,
        }
    }

    /// The page this ring lives in.
    pub fn page(&self) -> &RingPage {
        &self.page
    }

    /// Slots free for new requests (requests in flight are those without a response).
    pub fn free_requests(&self) -> u32 {
        P::ENTRIES - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Requests produced and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Writes `req` into the next slot (not yet visible to the back-end: see
    /// [`FrontRing::push_requests`]). Returns `false` if the ring is full.
    pub fn put_request(&mut self, req: &P::Req) -> bool {
        if self.free_requests() == 0 {
            return false;
        }
        self.page.write_slot::<P, _>(self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// Publishes the requests put so far; returns `true` if the back-end must be
    /// notified (Xen's `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    pub fn push_requests(&mut self) -> bool {
        self.page.publish(REQ_PROD, REQ_EVENT, self.req_prod_pvt)
    }

    /// Takes the next response, if the back-end produced one. A back-end that claims more
    /// responses than requests in flight gives [`RingError::Overflow`].
    pub fn pop_response(&mut self) -> Result<Option<P::Rsp>, RingError> {
        let prod = self.page.load(RSP_PROD);
        if prod.wrapping_sub(self.rsp_cons) > self.in_flight() {
            return Err(RingError::Overflow {
                prod,
                cons: self.rsp_cons,
            });
        }
        if prod == self.rsp_cons {
            return Ok(None);
        }
        let rsp = self.page.read_slot::<P, P::Rsp>(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Asks for an event at the next response and returns `true` if responses arrived
    /// meanwhile (Xen's `RING_FINAL_CHECK_FOR_RESPONSES`). Call when `pop_response`
    /// returned `None`, before sleeping.
    pub fn final_check_for_responses(&mut self) -> bool {
        if self.page.load(RSP_PROD) != self.rsp_cons {
            return true;
        }
        self.page.store(RSP_EVENT, self.rsp_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        self.page.load(RSP_PROD) != self.rsp_cons
    }
}

/// The back-end half: consumes requests (each copied once), produces responses.
#[derive(Debug)]
pub struct BackRing<P: RingProtocol> {
    page: RingPage,
    rsp_prod_pvt: u32,
    req_cons: u32,
    _p: PhantomData<P>,
}

impl<P: RingProtocol> BackRing<P> {
    /// The back half of a ring the front-end initialised: starts consuming at the
    /// `rsp_prod` found in the page (0 on a fresh ring).
    pub fn attach(page: RingPage) -> BackRing<P> {
        let rsp = page.load(RSP_PROD);
        BackRing {
            page,
            rsp_prod_pvt: rsp,
            req_cons: rsp,
            _p: PhantomData,
        }
    }

    /// The page this ring lives in.
    pub fn page(&self) -> &RingPage {
        &self.page
    }

    /// Takes the next request, copied out of the ring once; `Ok(None)` when there is
    /// none. A `req_prod` that claims more requests than the ring has room for, counting
    /// those taken and not yet answered, is [`RingError::Overflow`].
    pub fn pop_request(&mut self) -> Result<Option<P::Req>, RingError> {
        let prod = self.page.load(REQ_PROD);
        let unconsumed = prod.wrapping_sub(self.req_cons);
        if unconsumed > P::ENTRIES - self.req_cons.wrapping_sub(self.rsp_prod_pvt) {
            return Err(RingError::Overflow {
                prod,
                cons: self.req_cons,
            });
        }
        if unconsumed == 0 {
            return Ok(None);
        }
        let req = self.page.read_slot::<P, P::Req>(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Requests taken and not yet answered.
    pub fn pending_responses(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Writes a response into the next slot (published by [`BackRing::push_responses`]).
    /// Returns `false` if every taken request already has its response.
    pub fn put_response(&mut self, rsp: &P::Rsp) -> bool {
        if self.pending_responses() == 0 {
            return false;
        }
        self.page.write_slot::<P, _>(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        true
    }

    /// Publishes the responses put so far; `true` if the front-end must be notified.
    pub fn push_responses(&mut self) -> bool {
        self.page.publish(RSP_PROD, RSP_EVENT, self.rsp_prod_pvt)
    }

    /// Asks for an event at the next request and returns `Ok(true)` if requests arrived
    /// meanwhile (Xen's `RING_FINAL_CHECK_FOR_REQUESTS`).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        let more = |s: &Self| -> Result<bool, RingError> {
            let prod = s.page.load(REQ_PROD);
            let n = prod.wrapping_sub(s.req_cons);
            if n > P::ENTRIES {
                return Err(RingError::Overflow {
                    prod,
                    cons: s.req_cons,
                });
            }
            Ok(n != 0)
        };
        if more(self)? {
            return Ok(true);
        }
        self.page.store(REQ_EVENT, self.req_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        more(self)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::offset_of;
    use std::boxed::Box;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    #[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct Req {
        id: u64,
        v: [u8; 24],
    }
    #[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    #[repr(C)]
    struct Rsp {
        id: u64,
    }
    struct P;
    impl RingProtocol for P {
        type Req = Req;
        type Rsp = Rsp;
    }

    fn page() -> Box<Page> {
        Box::new(Page([0xAA; 4096]))
    }

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<RingHeader>(), RING_HEADER_SIZE);
        assert_eq!(offset_of!(RingHeader, req_prod), 0);
        assert_eq!(offset_of!(RingHeader, req_event), 4);
        assert_eq!(offset_of!(RingHeader, rsp_prod), 8);
        assert_eq!(offset_of!(RingHeader, rsp_event), 12);
    }

    #[test]
    fn entries() {
        assert_eq!(ring_entries(112), 32);
        assert_eq!(ring_entries(32), 64);
        assert_eq!(ring_entries(16), 128);
        assert_eq!(ring_entries(4033), 0);
        assert_eq!(ring_entries(0), 0);
        assert_eq!(P::ENTRIES, 64);
    }

    #[test]
    fn round_trip_wraps_and_notifies_only_when_asked() {
        let mut pg = page();
        // SAFETY: the box lives until the end of the test, after both rings.
        let (fp, bp) = unsafe {
            (
                RingPage::new(pg.0.as_mut_ptr()),
                RingPage::new(pg.0.as_mut_ptr()),
            )
        };
        let mut f = FrontRing::<P>::new(fp);
        let mut b = BackRing::<P>::attach(bp);
        let mut notifies = 0;
        for round in 0u64..300 {
            for k in 0u8..3 {
                assert!(f.put_request(&Req {
                    id: round * 3 + u64::from(k),
                    v: [k; 24]
                }));
            }
            if f.push_requests() {
                notifies += 1;
            }
            let mut got = 0;
            while let Some(r) = b.pop_request().unwrap() {
                assert!(b.put_response(&Rsp { id: r.id }));
                got += 1;
            }
            assert_eq!(got, 3);
            assert!(!b.final_check_for_requests().unwrap());
            b.push_responses();
            for k in 0..3 {
                assert_eq!(f.pop_response().unwrap(), Some(Rsp { id: round * 3 + k }));
            }
            assert!(!f.final_check_for_responses());
        }
        // The back-end asked for an event every round (it ran dry each time).
        assert_eq!(notifies, 300);
    }

    #[test]
    fn full_ring_and_overflow() {
        let mut pg = page();
        // SAFETY: as above.
        let (fp, bp) = unsafe {
            (
                RingPage::new(pg.0.as_mut_ptr()),
                RingPage::new(pg.0.as_mut_ptr()),
            )
        };
        let mut f = FrontRing::<P>::new(fp);
        let mut b = BackRing::<P>::attach(bp);
        for i in 0..64 {
            assert!(f.put_request(&Req { id: i, v: [0; 24] }));
        }
        assert!(!f.put_request(&Req { id: 99, v: [0; 24] }));
        f.push_requests();
        // A hostile front-end claims 65 requests.
        b.page().store(REQ_PROD, 65);
        assert_eq!(
            b.pop_request(),
            Err(RingError::Overflow { prod: 65, cons: 0 })
        );
        b.page().store(REQ_PROD, 64);
        for _ in 0..64 {
            assert!(b.pop_request().unwrap().is_some());
        }
        // Every slot waits for a response: nothing more can be taken.
        b.page().store(REQ_PROD, 65);
        assert!(b.pop_request().is_err());
        // A back-end with no requests taken cannot answer.
        let mut b2 = BackRing::<P>::attach(
            // SAFETY: as above.
            unsafe { RingPage::new(pg.0.as_mut_ptr()) },
        );
        assert!(!b2.put_response(&Rsp { id: 0 }));
    }

    #[test]
    fn request_is_copied_once() {
        let mut pg = page();
        let base = pg.0.as_mut_ptr();
        // SAFETY: as above.
        let (fp, bp) = unsafe { (RingPage::new(base), RingPage::new(base)) };
        let mut f = FrontRing::<P>::new(fp);
        let mut b = BackRing::<P>::attach(bp);
        f.put_request(&Req { id: 7, v: [1; 24] });
        f.push_requests();
        let r = b.pop_request().unwrap().unwrap();
        // The front-end rewrites the slot after the back-end took it.
        // SAFETY: slot 0 of the page.
        unsafe { core::ptr::write_bytes(base.add(RING_HEADER_SIZE), 0xFF, 32) };
        assert_eq!(r, Req { id: 7, v: [1; 24] });
    }

    #[test]
    fn notify_rule() {
        assert!(need_notify(0, 1, 1));
        assert!(!need_notify(1, 2, 1));
        assert!(need_notify(u32::MAX, 1, 0));
        assert!(!need_notify(5, 5, 5));
    }
}
