//! Fuzzes the back half of a shared ring (`hv_abi::ring::BackRing`, what hv's PV
//! back-ends run on guest memory) with the block protocol, on a page filled from the
//! input and a hostile front-end that rewrites the indices and slots between
//! operations. Checked against a model of the documented rules: `pop_request` reports
//! `RingError::Overflow` exactly when `req_prod` claims more requests than there is
//! room for, otherwise it returns the slot's bytes as they are; `put_response` refuses
//! when every taken request has its response; `push_responses` publishes `rsp_prod`;
//! `final_check_for_requests` sets `req_event`. The page is mapped between two
//! inaccessible pages, so any access outside it faults.
#![no_main]

use std::sync::OnceLock;

use hv_abi::blkif::{Blkif, BlkifRequest, BlkifResponse};
use hv_abi::ring::{BackRing, RingError, RingPage, RingProtocol, RING_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, IntoBytes};

const PAGE: usize = 4096;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// The ring page: the middle one of three, the others `PROT_NONE`.
fn page() -> *mut u8 {
    static PAGE_ADDR: OnceLock<usize> = OnceLock::new();
    let addr = *PAGE_ADDR.get_or_init(|| {
        // SAFETY: a fresh anonymous mapping; only its middle page is made accessible.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            let mid = (p as *mut u8).add(PAGE);
            let r = libc::mprotect(mid.cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE);
            assert_eq!(r, 0, "mprotect");
            mid as usize
        }
    });
    addr as *mut u8
}

fn bytes(base: *mut u8) -> &'static mut [u8] {
    // SAFETY: the page is mapped for the process's life; this target is single-threaded
    // and no reference to it outlives one access.
    unsafe { std::slice::from_raw_parts_mut(base, PAGE) }
}

fn word(base: *mut u8, off: usize) -> u32 {
    u32::from_le_bytes(bytes(base)[off..off + 4].try_into().expect("4 bytes"))
}

fn set_word(base: *mut u8, off: usize, v: u32) {
    bytes(base)[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let entries = Blkif::ENTRIES;
    assert!(entries > 0 && entries.is_power_of_two());
    assert!(RING_HEADER_SIZE + entries as usize * Blkif::SLOT_SIZE <= PAGE);
    let base = page();
    // The page: the input repeated (header included).
    let page_bytes = bytes(base);
    if data.is_empty() {
        page_bytes.fill(0);
    } else {
        for (i, b) in page_bytes.iter_mut().enumerate() {
            *b = data[i % data.len()];
        }
    }
    // SAFETY: `base` is a 4 KiB-aligned page mapped read-write for the process's life.
    let mut ring: BackRing<Blkif> = BackRing::attach(unsafe { RingPage::new(base) });
    // The model: the back-end's private indices.
    let mut cons = word(base, RSP_PROD);
    let mut rsp_pvt = cons;
    let ops = data.get(16..).unwrap_or(&[]);
    for op in ops.chunks_exact(5) {
        let v = u32::from_le_bytes(op[1..5].try_into().expect("4 bytes"));
        match op[0] % 8 {
            0 | 1 => {
                let prod = word(base, REQ_PROD);
                let unconsumed = prod.wrapping_sub(cons);
                let pending = cons.wrapping_sub(rsp_pvt);
                let slot = RING_HEADER_SIZE + (cons & (entries - 1)) as usize * Blkif::SLOT_SIZE;
                let expect = BlkifRequest::read_from_bytes(
                    &bytes(base)[slot..slot + size_of::<BlkifRequest>()],
                )
                .expect("request bytes");
                match ring.pop_request() {
                    Err(e) => {
                        assert!(
                            unconsumed > entries - pending,
                            "overflow {e:?} reported wrongly"
                        );
                        assert_eq!(e, RingError::Overflow { prod, cons });
                    }
                    Ok(None) => assert_eq!(unconsumed, 0),
                    Ok(Some(req)) => {
                        assert!(unconsumed != 0 && unconsumed <= entries - pending);
                        assert_eq!(req.as_bytes(), expect.as_bytes(), "request copied wrongly");
                        cons = cons.wrapping_add(1);
                    }
                }
            }
            2 => {
                let rsp = BlkifResponse {
                    id: u64::from(v),
                    operation: op[1],
                    reserved0: 0,
                    status: -5,
                    reserved1: 0,
                };
                let pending = cons.wrapping_sub(rsp_pvt);
                let put = ring.put_response(&rsp);
                assert_eq!(put, pending != 0);
                if put {
                    let slot =
                        RING_HEADER_SIZE + (rsp_pvt & (entries - 1)) as usize * Blkif::SLOT_SIZE;
                    assert_eq!(
                        &bytes(base)[slot..slot + size_of::<BlkifResponse>()],
                        rsp.as_bytes()
                    );
                    rsp_pvt = rsp_pvt.wrapping_add(1);
                }
            }
            3 => {
                let old = word(base, RSP_PROD);
                let notify = ring.push_responses();
                assert_eq!(word(base, RSP_PROD), rsp_pvt);
                let event = word(base, RSP_EVENT);
                assert_eq!(notify, hv_abi::ring::need_notify(old, rsp_pvt, event));
            }
            4 => {
                let n = word(base, REQ_PROD).wrapping_sub(cons);
                match ring.final_check_for_requests() {
                    Err(e) => {
                        assert!(n > entries);
                        assert!(matches!(e, RingError::Overflow { .. }));
                    }
                    Ok(true) => assert!(n != 0),
                    Ok(false) => {
                        assert_eq!(n, 0);
                        assert_eq!(word(base, REQ_EVENT), cons.wrapping_add(1));
                    }
                }
            }
            // The hostile front-end.
            5 => set_word(base, REQ_PROD, v),
            6 => set_word(
                base,
                [REQ_EVENT, RSP_PROD, RSP_EVENT][usize::from(op[1] % 3)],
                v,
            ),
            _ => bytes(base)[(v as usize) % PAGE] = op[1],
        }
        assert_eq!(ring.pending_responses(), cons.wrapping_sub(rsp_pvt));
        assert!(ring.pending_responses() <= entries);
    }
});
