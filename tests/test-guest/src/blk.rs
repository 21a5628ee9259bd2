//! PV block and PV console scenarios (SPEC.md §8.9), driven from the guest side with
//! `hv_abi::ring::FrontRing` and raw hypercalls (the back-ends are tested, not the
//! SDK's front-ends). Run by tests/tests/pv_block.rs and tests/tests/pv_console.rs.
//!
//! | scenario | what it does |
//! | --- | --- |
//! | `blk` | device table, dev_op refusals, connect, writes (1 and 11 segments, from a read-only grant), flush, read-back, every malformed request, notification rules, grant flags, disconnect, reconnect, a read-only second disk |
//! | `blk-overflow` | a `req_prod` that claims 33 requests: the back-end closes the device (`-EINVAL`); reconnect; a `req_prod` behind `rsp_prod`: closed again; a port closed by the guest while connected |
//! | `blk-flush` | a write, then waits for the host (`go` word); a flush, then waits again |
//! | `blk-idle` | one write (data page salt 9, sectors 0-7), `idle_connect=`, `idle_write=`, then sleeps until the host stops the domain |
//! | `pvcons` | PV console output (short, 3000 bytes through the 2048-byte ring, a broken `out_prod`), then echoes `echo=N` lines of input |
//!
//! Data pattern (the host test recomputes it): 64-bit word `w` of data page `p` with
//! salt `s` is `pattern(s, p, w)`.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_sdk::grant::GrantTable;
use guest_sdk::hv_abi::blkif::{
    Blkif, BlkifRequest, BlkifResponse, BlkifSegment, BLKIF_OP_FLUSH, BLKIF_OP_READ, BLKIF_OP_WRITE,
};
use guest_sdk::hv_abi::device::{
    DevConnect, DeviceEntry, DEVF_READONLY, DEVOP_CONNECT, DEVOP_DISCONNECT, DEVOP_STATE,
    DEV_PV_BLOCK, DOMID_HV, STATE_CLOSED,
};
use guest_sdk::hv_abi::ring::{FrontRing, RingPage};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::{Op, PAGE_SIZE};
use guest_sdk::hypercall::hypercall2;
use guest_sdk::{cmdline, evtchn, poweroff, println, sched, time, virt_to_phys, Features};

/// Sectors in the disk the host test gives the `blk` scenarios (1 MiB).
pub const DISK_SECTORS: u64 = 2048;

/// The data pattern.
pub fn pattern(salt: u64, page: u64, word: u64) -> u64 {
    (salt << 56) ^ (page << 40) ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

// Free pages after the kernel: rings 0-2, data pages 3-14 (D0..D11), read pages
// 15-26 (Q0..Q11), the read-only page 27, a page for another domain 28.
const RING_A: u64 = 0;
const RING_B: u64 = 1;
const RING_C: u64 = 2;
const D0: u64 = 3;
const Q0: u64 = 15;
const RO_PAGE: u64 = 27;
const OTHER_PAGE: u64 = 28;

// Grant references.
const REF_RING_A: u32 = 10;
const REF_RING_B: u32 = 11;
const REF_RING_C: u32 = 12;
const REF_D0: u32 = 20;
const REF_Q0: u32 = 40;
const REF_RO: u32 = 60;
const REF_OTHER: u32 = 61;
const REF_NOT_GRANTED: u32 = 62;

fn page(si: &StartInfo, i: u64) -> u64 {
    ((si.first_free_gpa + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)) + (64 + i) * PAGE_SIZE
}

fn word_at(addr: u64) -> &'static AtomicU64 {
    // SAFETY: every address used is an 8-aligned word of this kernel's identity-mapped
    // free RAM; pages shared with the back-end are only accessed atomically.
    unsafe { &*(addr as *const AtomicU64) }
}

fn fill(si: &StartInfo, p: u64, salt: u64, id: u64) {
    let base = page(si, p);
    for w in 0..PAGE_SIZE / 8 {
        word_at(base + w * 8).store(pattern(salt, id, w), Ordering::Relaxed);
    }
}

fn zero(si: &StartInfo, p: u64) {
    let base = page(si, p);
    for w in 0..PAGE_SIZE / 8 {
        word_at(base + w * 8).store(0, Ordering::Relaxed);
    }
}

/// True if sectors `first..=last` of page `a` equal those of page `b`.
fn same(si: &StartInfo, a: u64, b: u64, first: u8, last: u8) -> bool {
    let (pa, pb) = (page(si, a), page(si, b));
    (u64::from(first) * 64..(u64::from(last) + 1) * 64).all(|w| {
        word_at(pa + w * 8).load(Ordering::Relaxed) == word_at(pb + w * 8).load(Ordering::Relaxed)
    })
}

fn dev_op(cmd: u64, arg: u64) -> i64 {
    // SAFETY: CONNECT reads a DevConnect this kernel owns (or a bad address, refused);
    // the other commands take no pointer.
    unsafe { hypercall2(Op::DevOp, cmd, arg) }
}

fn connect_raw(c: &DevConnect) -> i64 {
    dev_op(DEVOP_CONNECT, virt_to_phys(c as *const DevConnect))
}

/// Entry `i` of the device table (read from RAM, as the hypervisor last wrote it).
fn entry(si: &StartInfo, i: u32) -> DeviceEntry {
    let at = si.devices_gpa + u64::from(i) * 32;
    // SAFETY: the device table is identity-mapped RAM; the copy is volatile because
    // the hypervisor updates it concurrently.
    unsafe { core::ptr::read_volatile(at as *const DeviceEntry) }
}

fn require(si: &StartInfo) -> GrantTable {
    let f = Features(si.features);
    let need = Features::DEV_OP | Features::PV_BLOCK | Features::EVTCHN | Features::GNTTAB;
    match GrantTable::from_start_info(si) {
        Some(g) if f.contains(need) && si.devices_gpa != 0 => g,
        _ => {
            println!("blk: features missing ({:#x})", si.features);
            poweroff(2)
        }
    }
}

fn grant(gt: &GrantTable, gref: u32, domid: u16, gpa: u64, readonly: bool) {
    // SAFETY: the page is free RAM used only by this scenario, shared with the back-end
    // through atomics only.
    if unsafe { gt.grant_access(gref, domid, gpa / PAGE_SIZE, readonly) }.is_err() {
        println!("blk: cannot grant ref {gref}");
        guest_sdk::crash()
    }
}

/// A front-end: a ring and its port (masked: the scenario polls).
struct Front {
    ring: FrontRing<Blkif>,
    port: u32,
    base: u64,
}

fn new_front(si: &StartInfo, p: u64) -> Front {
    zero(si, p);
    let base = page(si, p);
    // SAFETY: a zeroed free page of this kernel, used only as this ring.
    let ring = FrontRing::new(unsafe { RingPage::new(base as *mut u8) });
    let port = match evtchn::alloc_unbound(u32::from(DOMID_HV)) {
        Ok(p) => p,
        Err(_) => {
            println!("blk: alloc_unbound(DOMID_HV) failed");
            guest_sdk::crash()
        }
    };
    let _ = evtchn::mask(port);
    Front { ring, port, base }
}

fn header(f: &Front, off: u64) -> &'static AtomicU32 {
    // SAFETY: one of the ring header's aligned words, in the ring page.
    unsafe { &*((f.base + off) as *const AtomicU32) }
}

fn deadline() -> u64 {
    time::system_time_ns() + 20_000_000_000
}

fn timeout(what: &str) -> ! {
    println!("timeout={what}");
    guest_sdk::crash()
}

fn wait_response(f: &mut Front) -> BlkifResponse {
    let end = deadline();
    loop {
        evtchn::clear_pending(f.port);
        match f.ring.pop_response() {
            Ok(Some(r)) => return r,
            Ok(None) => {}
            Err(_) => {
                println!("blk: the back-end broke the ring");
                guest_sdk::crash()
            }
        }
        if f.ring.final_check_for_responses() {
            continue;
        }
        if time::system_time_ns() > end {
            timeout("response")
        }
        let _ = sched::poll(&[f.port], end);
    }
}

static IDS_OK: AtomicU64 = AtomicU64::new(1);

fn submit(f: &mut Front, r: &BlkifRequest) -> i64 {
    if !f.ring.put_request(r) {
        println!("blk: ring full");
        guest_sdk::crash()
    }
    if f.ring.push_requests() {
        let _ = evtchn::send(f.port);
    }
    let rsp = wait_response(f);
    if rsp.id != r.id || rsp.operation != r.operation {
        IDS_OK.store(0, Ordering::Relaxed);
    }
    i64::from(rsp.status)
}

fn seg(gref: u32, first: u8, last: u8) -> BlkifSegment {
    BlkifSegment {
        gref,
        first_sect: first,
        last_sect: last,
        reserved: 0,
    }
}

fn request(op: u8, id: u64, sector: u64, segs: &[BlkifSegment]) -> BlkifRequest {
    let mut r = BlkifRequest {
        operation: op,
        nr_segments: segs.len() as u8,
        handle: 0,
        reserved: 0,
        id,
        sector_number: sector,
        seg: [BlkifSegment::default(); 11],
    };
    r.seg[..segs.len()].copy_from_slice(segs);
    r
}

/// The segment shape of data page `i` of the 11-segment write.
pub fn shape(i: u64) -> (u8, u8) {
    ((i % 3) as u8, 7 - (i % 2) as u8)
}

fn connect(dev: u32, gref: u32, port: u32) -> i64 {
    connect_raw(&DevConnect {
        dev,
        ring_gref: gref,
        port,
        reserved: 0,
    })
}

fn pv_block_devices(si: &StartInfo) -> (Option<u32>, Option<u32>) {
    let mut rw = None;
    let mut ro = None;
    for i in 0..si.nr_devices {
        let e = entry(si, i);
        if e.kind == DEV_PV_BLOCK {
            if e.flags & DEVF_READONLY != 0 {
                ro = ro.or(Some(i));
            } else {
                rw = rw.or(Some(i));
            }
        }
    }
    (rw, ro)
}

// ---------------------------------------------------------------------------------
// blk

pub fn blk(si: &StartInfo) -> ! {
    let gt = require(si);
    let (Some(dev), ro_dev) = pv_block_devices(si) else {
        println!("blk: no writable PV block device");
        poweroff(2)
    };
    let e0 = entry(si, 0);
    let e1 = entry(si, 1);
    let ed = entry(si, dev);
    println!(
        "nr_devices={} dev0_kind={} dev0_state={} dev0_base={:#x} dev1_kind={} dev1_base={:#x} \
         blk_dev={dev} blk_sectors={} blk_state={} blk_backend={:#x} console_evtchn={} console_gpa={:#x}",
        si.nr_devices,
        e0.kind,
        e0.state,
        e0.base,
        e1.kind,
        e1.base,
        ed.size,
        ed.state,
        ed.backend_domid,
        si.console_evtchn,
        si.console_ring_gpa
    );

    // Pages and grants.
    for i in 0..12 {
        fill(si, D0 + i, 1, i);
        zero(si, Q0 + i);
        grant(&gt, REF_D0 + i as u32, DOMID_HV, page(si, D0 + i), false);
        grant(&gt, REF_Q0 + i as u32, DOMID_HV, page(si, Q0 + i), false);
    }
    fill(si, RO_PAGE, 3, 99);
    grant(&gt, REF_RO, DOMID_HV, page(si, RO_PAGE), true);
    grant(&gt, REF_OTHER, 5, page(si, OTHER_PAGE), false);

    // dev_op refusals before connecting.
    let mut a = new_front(si, RING_A);
    grant(&gt, REF_RING_A, DOMID_HV, page(si, RING_A), false);
    let ipi = evtchn::bind_ipi(0).unwrap_or(0);
    let self_port = evtchn::alloc_unbound(evtchn::DOMID_SELF).unwrap_or(0);
    let bad_reserved = connect_raw(&DevConnect {
        dev,
        ring_gref: REF_RING_A,
        port: a.port,
        reserved: 1,
    });
    println!(
        "dev_connect_console={} dev_connect_uart={} dev_connect_nodev={} dev_state_nodev={} \
         dev_bad_cmd={} dev_reserved={} dev_efault={} dev_ring_ro={} dev_ring_range={} \
         dev_ring_not_granted={} dev_port_ipi={} dev_port_self={} dev_port_bad={} \
         dev_disconnect_console={} dev_disconnect_idle={} dev_state_console={} dev_state_initial={}",
        connect(0, REF_RING_A, a.port),
        connect(1, REF_RING_A, a.port),
        connect(99, REF_RING_A, a.port),
        dev_op(DEVOP_STATE, 99),
        dev_op(9, u64::from(dev)),
        bad_reserved,
        dev_op(DEVOP_CONNECT, si.nr_pages * PAGE_SIZE),
        connect(dev, REF_RO, a.port),
        connect(dev, 5000, a.port),
        connect(dev, REF_NOT_GRANTED, a.port),
        connect(dev, REF_RING_A, ipi),
        connect(dev, REF_RING_A, self_port),
        connect(dev, REF_RING_A, 4000),
        dev_op(DEVOP_DISCONNECT, 0),
        dev_op(DEVOP_DISCONNECT, u64::from(dev)),
        dev_op(DEVOP_STATE, 0),
        dev_op(DEVOP_STATE, u64::from(dev)),
    );
    println!(
        "ring_flags_after_refusals={:#x}",
        gt.flags(REF_RING_A).unwrap_or(0xFFFF)
    );

    // Connect.
    let rc = connect(dev, REF_RING_A, a.port);
    let st = evtchn::status(a.port).unwrap_or_default();
    println!(
        "connect={rc} state_connected={} table_state={} ring_flags={:#x} ring_revoke_busy={} \
         port_status={} port_remote={:#x} connect_again={}",
        dev_op(DEVOP_STATE, u64::from(dev)),
        entry(si, dev).state,
        gt.flags(REF_RING_A).unwrap_or(0xFFFF),
        u8::from(gt.revoke(REF_RING_A).is_err()),
        st.status,
        st.remote_dom_or_virq,
        connect(dev, REF_RING_A, a.port),
    );

    // Writes: one full page at sector 0; 11 segments from sector 100; flush.
    let w1 = submit(&mut a, &request(BLKIF_OP_WRITE, 1, 0, &[seg(REF_D0, 0, 7)]));
    let mut segs = [BlkifSegment::default(); 11];
    for (i, s) in segs.iter_mut().enumerate() {
        let (f, l) = shape(i as u64);
        *s = seg(REF_D0 + 1 + i as u32, f, l);
    }
    let w2 = submit(&mut a, &request(BLKIF_OP_WRITE, 2, 100, &segs));
    let fl = submit(&mut a, &request(BLKIF_OP_FLUSH, 3, 0, &[]));
    // Read back into Q0..Q10 with the same shapes, and sector 0 into Q11.
    for (i, s) in segs.iter_mut().enumerate() {
        s.gref = REF_Q0 + i as u32;
    }
    let r1 = submit(&mut a, &request(BLKIF_OP_READ, 4, 100, &segs));
    let r2 = submit(
        &mut a,
        &request(BLKIF_OP_READ, 5, 0, &[seg(REF_Q0 + 11, 0, 7)]),
    );
    let mut readback = (0..11).all(|i| {
        let (f, l) = shape(i);
        same(si, Q0 + i, D0 + 1 + i, f, l)
    });
    readback &= same(si, Q0 + 11, D0, 0, 7);
    println!(
        "write1={w1} write11={w2} flush={fl} read11={r1} read1={r2} readback={}",
        u8::from(readback)
    );

    // A write from a read-only grant (sector 200); a read into it is refused.
    let w3 = submit(
        &mut a,
        &request(BLKIF_OP_WRITE, 6, 200, &[seg(REF_RO, 0, 7)]),
    );
    let read_ro = submit(
        &mut a,
        &request(BLKIF_OP_READ, 7, 200, &[seg(REF_RO, 0, 7)]),
    );
    // A request whose second segment is bad moves no data (sector 300 stays zero).
    let partial = submit(
        &mut a,
        &request(
            BLKIF_OP_WRITE,
            8,
            300,
            &[seg(REF_D0, 0, 7), seg(5000, 0, 7)],
        ),
    );
    println!("write_ro_grant={w3} read_into_ro_grant={read_ro} partial_bad_gref={partial}");

    // Malformed requests.
    let mut id = 100;
    let mut one = |r: BlkifRequest| {
        id += 1;
        submit(&mut a, &BlkifRequest { id, ..r })
    };
    let good = request(BLKIF_OP_READ, 0, 0, &[seg(REF_Q0, 0, 7)]);
    let bad_op = one(BlkifRequest {
        operation: 7,
        ..good
    });
    let no_segs = one(BlkifRequest {
        nr_segments: 0,
        ..good
    });
    let twelve = one(BlkifRequest {
        nr_segments: 12,
        ..good
    });
    let first_gt_last = one(request(BLKIF_OP_READ, 0, 0, &[seg(REF_Q0, 5, 3)]));
    let last8 = one(request(BLKIF_OP_READ, 0, 0, &[seg(REF_Q0, 0, 8)]));
    let handle = one(BlkifRequest { handle: 1, ..good });
    let reserved = one(BlkifRequest {
        reserved: 1,
        ..good
    });
    let mut sr = good;
    sr.seg[0].reserved = 1;
    let seg_reserved = one(sr);
    let flush_sector = one(request(BLKIF_OP_FLUSH, 0, 5, &[]));
    let mut fs = request(BLKIF_OP_FLUSH, 0, 0, &[]);
    fs.nr_segments = 1;
    let flush_segs = one(fs);
    let range = one(request(
        BLKIF_OP_READ,
        0,
        DISK_SECTORS - 1,
        &[seg(REF_Q0, 0, 1)],
    ));
    let range_wrap = one(request(
        BLKIF_OP_WRITE,
        0,
        u64::MAX - 3,
        &[seg(REF_D0, 0, 7)],
    ));
    let gref_range = one(request(BLKIF_OP_READ, 0, 0, &[seg(5000, 0, 7)]));
    let not_granted = one(request(BLKIF_OP_READ, 0, 0, &[seg(REF_NOT_GRANTED, 0, 7)]));
    let other_dom = one(request(BLKIF_OP_WRITE, 0, 0, &[seg(REF_OTHER, 0, 7)]));
    println!(
        "st_bad_op={bad_op} st_no_segs={no_segs} st_12_segs={twelve} st_first_gt_last={first_gt_last} \
         st_last_8={last8} st_handle={handle} st_reserved={reserved} st_seg_reserved={seg_reserved} \
         st_flush_sector={flush_sector} st_flush_segs={flush_segs} st_range={range} \
         st_range_wrap={range_wrap} st_gref_range={gref_range} st_not_granted={not_granted} \
         st_other_dom={other_dom} ids_ok={} seg_flags={:#x} ro_flags={:#x}",
        IDS_OK.load(Ordering::Relaxed),
        gt.flags(REF_D0).unwrap_or(0xFFFF),
        gt.flags(REF_RO).unwrap_or(0xFFFF),
    );

    // Notification: none while rsp_event is far ahead; one when asked. A CONNECT of
    // the connected device (refused, -EBUSY) waits for the back-end's current request,
    // response and event included: it separates the requests' events.
    let barrier = || connect(dev, REF_RING_A, a.port);
    let b0 = barrier();
    evtchn::clear_pending(a.port);
    let cons = header(&a, 8).load(Ordering::Acquire);
    header(&a, 12).store(cons.wrapping_add(100), Ordering::SeqCst);
    let r = request(BLKIF_OP_READ, 500, 0, &[seg(REF_Q0, 0, 0)]);
    a.ring.put_request(&r);
    if a.ring.push_requests() {
        let _ = evtchn::send(a.port);
    }
    spin_until(|| header(&a, 8).load(Ordering::Acquire) != cons);
    let b1 = barrier();
    let quiet = !evtchn::is_pending(a.port);
    let _ = a.ring.pop_response();
    let cons = header(&a, 8).load(Ordering::Acquire);
    let _ = a.ring.final_check_for_responses();
    a.ring.put_request(&BlkifRequest { id: 501, ..r });
    if a.ring.push_requests() {
        let _ = evtchn::send(a.port);
    }
    spin_until(|| header(&a, 8).load(Ordering::Acquire) != cons);
    let b2 = barrier();
    let asked = evtchn::is_pending(a.port);
    let _ = a.ring.pop_response();
    println!(
        "no_event_unless_asked={} event_when_asked={} barriers={b0},{b1},{b2}",
        u8::from(quiet),
        u8::from(asked)
    );

    // Disconnect: ring released, port unbound for DOMID_HV again.
    let dc = dev_op(DEVOP_DISCONNECT, u64::from(dev));
    let st = evtchn::status(a.port).unwrap_or_default();
    println!(
        "disconnect={dc} state_closed={} table_error={} ring_flags_closed={:#x} ring_revoke={} \
         port_status_closed={} port_remote_closed={:#x} disconnect_again={}",
        dev_op(DEVOP_STATE, u64::from(dev)),
        entry(si, dev).error,
        gt.flags(REF_RING_A).unwrap_or(0xFFFF),
        u8::from(gt.revoke(REF_RING_A).is_ok()),
        st.status,
        st.remote_dom_or_virq,
        dev_op(DEVOP_DISCONNECT, u64::from(dev)),
    );

    // Reconnect with a new ring on the same port: read sector 0, write the last sector,
    // flush; one sector beyond the end is refused.
    let mut b = new_front(si, RING_B);
    let _ = evtchn::close(b.port);
    b.port = a.port;
    grant(&gt, REF_RING_B, DOMID_HV, page(si, RING_B), false);
    let rc = connect(dev, REF_RING_B, b.port);
    zero(si, Q0);
    let rd = submit(
        &mut b,
        &request(BLKIF_OP_READ, 600, 0, &[seg(REF_Q0, 0, 7)]),
    );
    let rd_ok = same(si, Q0, D0, 0, 7);
    let last = submit(
        &mut b,
        &request(
            BLKIF_OP_WRITE,
            601,
            DISK_SECTORS - 1,
            &[seg(REF_D0 + 2, 7, 7)],
        ),
    );
    let beyond = submit(
        &mut b,
        &request(BLKIF_OP_WRITE, 602, DISK_SECTORS, &[seg(REF_D0 + 2, 7, 7)]),
    );
    let fl = submit(&mut b, &request(BLKIF_OP_FLUSH, 603, 0, &[]));
    println!(
        "reconnect={rc} reconnect_read={rd} reconnect_data={} last_sector={last} beyond_end={beyond} \
         flush2={fl}",
        u8::from(rd_ok)
    );

    // A read-only disk: writes refused, reads work.
    if let Some(ro) = ro_dev {
        let mut c = new_front(si, RING_C);
        grant(&gt, REF_RING_C, DOMID_HV, page(si, RING_C), false);
        let rc = connect(ro, REF_RING_C, c.port);
        let w = submit(
            &mut c,
            &request(BLKIF_OP_WRITE, 700, 0, &[seg(REF_D0, 0, 7)]),
        );
        let r = submit(
            &mut c,
            &request(BLKIF_OP_READ, 701, 0, &[seg(REF_Q0, 0, 7)]),
        );
        println!(
            "ro_connect={rc} ro_write={w} ro_read={r} ro_table_flags={}",
            entry(si, ro).flags
        );
    }
    // Power off with the device connected: the back-end stops with the domain.
    poweroff(0)
}

/// Spins (yielding) until `cond` holds; crashes after a long while.
fn spin_until(mut cond: impl FnMut() -> bool) {
    let mut n: u32 = 0;
    while !cond() {
        n += 1;
        if n > 2_000_000 {
            timeout("spin")
        }
        let _ = guest_sdk::sched_yield();
    }
}

// ---------------------------------------------------------------------------------
// blk-overflow

/// Waits (polling the port, which the back-end signals when it closes the device)
/// until `dev` is closed.
fn wait_closed(f: &Front, dev: u32) {
    let end = deadline();
    loop {
        evtchn::clear_pending(f.port);
        if dev_op(DEVOP_STATE, u64::from(dev)) == i64::from(STATE_CLOSED) {
            return;
        }
        if time::system_time_ns() > end {
            timeout("closed")
        }
        let _ = sched::poll(&[f.port], end);
    }
}

pub fn overflow(si: &StartInfo) -> ! {
    let gt = require(si);
    let (Some(dev), _) = pv_block_devices(si) else {
        println!("blk: no writable PV block device");
        poweroff(2)
    };
    zero(si, Q0);
    grant(&gt, REF_Q0, DOMID_HV, page(si, Q0), false);

    // 33 requests claimed in a 32-slot ring.
    let a = new_front(si, RING_A);
    grant(&gt, REF_RING_A, DOMID_HV, page(si, RING_A), false);
    let rc = connect(dev, REF_RING_A, a.port);
    header(&a, 0).store(33, Ordering::SeqCst);
    let _ = evtchn::send(a.port);
    wait_closed(&a, dev);
    let st = evtchn::status(a.port).unwrap_or_default();
    let e = entry(si, dev);
    println!(
        "ov_connect={rc} ov_state={} ov_error={} ov_ring_flags={:#x} ov_port_status={} \
         ov_port_remote={:#x} ov_send_after={}",
        e.state,
        e.error,
        gt.flags(REF_RING_A).unwrap_or(0xFFFF),
        st.status,
        st.remote_dom_or_virq,
        evtchn::send(a.port).map_or(-1, |_| 0),
    );

    // A new ring on the same port works.
    let mut b = new_front(si, RING_B);
    let _ = evtchn::close(b.port);
    b.port = a.port;
    grant(&gt, REF_RING_B, DOMID_HV, page(si, RING_B), false);
    let rc = connect(dev, REF_RING_B, b.port);
    let rd = submit(&mut b, &request(BLKIF_OP_READ, 1, 0, &[seg(REF_Q0, 0, 7)]));
    println!(
        "ov_reconnect={rc} ov_read={rd} ov_error_cleared={}",
        entry(si, dev).error
    );

    // req_prod moved behind rsp_prod: closed again.
    header(&b, 0).store(u32::MAX, Ordering::SeqCst);
    let _ = evtchn::send(b.port);
    wait_closed(&b, dev);
    let e = entry(si, dev);
    println!("ov2_state={} ov2_error={}", e.state, e.error);

    // The guest closes its port while connected: sends fail, the back-end's events go
    // nowhere, and disconnecting still releases the ring.
    let c = new_front(si, RING_C);
    grant(&gt, REF_RING_C, DOMID_HV, page(si, RING_C), false);
    let rc = connect(dev, REF_RING_C, c.port);
    let closed = evtchn::close(c.port).map_or(-1, |_| 0);
    let send = evtchn::send(c.port).map_or(-1, |_| 0);
    let dc = dev_op(DEVOP_DISCONNECT, u64::from(dev));
    println!(
        "pc_connect={rc} pc_close={closed} pc_send={send} pc_disconnect={dc} pc_state={} \
         pc_ring_flags={:#x}",
        dev_op(DEVOP_STATE, u64::from(dev)),
        gt.flags(REF_RING_C).unwrap_or(0xFFFF)
    );
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// blk-flush

static GO: AtomicU64 = AtomicU64::new(0);

fn wait_go(v: u64) {
    spin_until(|| GO.load(Ordering::Acquire) >= v);
}

pub fn flush(si: &StartInfo) -> ! {
    let gt = require(si);
    let (Some(dev), _) = pv_block_devices(si) else {
        println!("blk: no writable PV block device");
        poweroff(2)
    };
    fill(si, D0, 7, 0);
    grant(&gt, REF_D0, DOMID_HV, page(si, D0), true);
    let mut a = new_front(si, RING_A);
    grant(&gt, REF_RING_A, DOMID_HV, page(si, RING_A), false);
    let rc = connect(dev, REF_RING_A, a.port);
    let w = submit(&mut a, &request(BLKIF_OP_WRITE, 1, 8, &[seg(REF_D0, 0, 7)]));
    println!(
        "connect={rc} write={w} go={:#x} write_done=1",
        virt_to_phys(&GO as *const AtomicU64)
    );
    wait_go(1);
    let f = submit(&mut a, &request(BLKIF_OP_FLUSH, 2, 0, &[]));
    println!("flush={f} flush_done=1");
    wait_go(2);
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// blk-idle

pub fn idle(si: &StartInfo) -> ! {
    let gt = require(si);
    let (Some(dev), _) = pv_block_devices(si) else {
        println!("blk: no writable PV block device");
        poweroff(2)
    };
    fill(si, D0, 9, 0);
    grant(&gt, REF_D0, DOMID_HV, page(si, D0), true);
    let mut a = new_front(si, RING_A);
    grant(&gt, REF_RING_A, DOMID_HV, page(si, RING_A), false);
    let rc = connect(dev, REF_RING_A, a.port);
    let w = submit(&mut a, &request(BLKIF_OP_WRITE, 1, 0, &[seg(REF_D0, 0, 7)]));
    println!("idle_connect={rc} idle_write={w}");
    crate::idle()
}

// ---------------------------------------------------------------------------------
// pvcons

const IN_CONS: u64 = 3072;
const IN_PROD: u64 = 3076;
const OUT_CONS: u64 = 3080;
const OUT_PROD: u64 = 3084;

struct Cons {
    base: u64,
    port: u32,
}

impl Cons {
    fn idx(&self, off: u64) -> &'static AtomicU32 {
        // SAFETY: an aligned index word of the console page (identity-mapped RAM).
        unsafe { &*((self.base + off) as *const AtomicU32) }
    }

    fn byte(&self, off: u64) -> *mut u8 {
        (self.base + off) as *mut u8
    }

    /// Waits (polling the port) until `cond` holds.
    fn wait(&self, what: &str, cond: impl Fn(&Cons) -> bool) {
        let end = deadline();
        loop {
            evtchn::clear_pending(self.port);
            if cond(self) {
                return;
            }
            if time::system_time_ns() > end {
                timeout(what)
            }
            let _ = sched::poll(&[self.port], end);
        }
    }

    /// Writes `bytes` to the output ring, waiting for room.
    fn write(&self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            self.wait("out_room", |c| {
                c.idx(OUT_PROD)
                    .load(Ordering::Acquire)
                    .wrapping_sub(c.idx(OUT_CONS).load(Ordering::Acquire))
                    < 2048
            });
            let prod = self.idx(OUT_PROD).load(Ordering::Relaxed);
            let used = prod.wrapping_sub(self.idx(OUT_CONS).load(Ordering::Acquire));
            let n = rest.len().min((2048 - used) as usize);
            for (i, b) in rest[..n].iter().enumerate() {
                let at = 1024 + u64::from(prod.wrapping_add(i as u32) % 2048);
                // SAFETY: a byte of the page's `out` array.
                unsafe { core::ptr::write_volatile(self.byte(at), *b) };
            }
            self.idx(OUT_PROD)
                .store(prod.wrapping_add(n as u32), Ordering::Release);
            let _ = evtchn::send(self.port);
            rest = &rest[n..];
        }
    }

    /// Waits until hv consumed all output.
    fn drained(&self) {
        self.wait("drained", |c| {
            c.idx(OUT_CONS).load(Ordering::Acquire) == c.idx(OUT_PROD).load(Ordering::Acquire)
        });
    }
}

pub fn pvcons(si: &StartInfo) -> ! {
    if !Features(si.features).contains(Features::PV_CONSOLE | Features::EVTCHN)
        || si.console_ring_gpa == 0
    {
        println!("pvcons: no PV console ({:#x})", si.features);
        poweroff(2)
    }
    let c = Cons {
        base: si.console_ring_gpa,
        port: si.console_evtchn,
    };
    let _ = evtchn::mask(c.port);
    let st = evtchn::status(c.port).unwrap_or_default();
    println!(
        "cons_port={} cons_port_status={} cons_port_remote={:#x}",
        c.port, st.status, st.remote_dom_or_virq
    );
    c.write(b"pv console: hello\n");
    c.drained();
    println!("hello_drained=1");
    // 100 numbered lines, 3000 bytes: more than the ring holds.
    let mut line = *b"pv line 000 .................\n";
    for i in 0..100u32 {
        line[8] = b'0' + (i / 100) as u8;
        line[9] = b'0' + (i / 10 % 10) as u8;
        line[10] = b'0' + (i % 10) as u8;
        c.write(&line);
    }
    c.drained();
    // A broken out_prod: hv drops it and resynchronises.
    let prod = c.idx(OUT_PROD).load(Ordering::Relaxed);
    c.idx(OUT_PROD)
        .store(prod.wrapping_add(5000), Ordering::Release);
    let _ = evtchn::send(c.port);
    c.drained();
    c.write(b"pv console: after resync\n");
    c.drained();
    println!("resync=1");

    // Echo N lines of input.
    let n = cmdline::value(si.cmdline_bytes(), b"echo")
        .and_then(cmdline::parse_u64)
        .unwrap_or(0);
    let mut buf = [0u8; 256];
    let mut len = 0;
    let mut lines = 0;
    while lines < n {
        c.wait("input", |c| {
            c.idx(IN_PROD).load(Ordering::Acquire) != c.idx(IN_CONS).load(Ordering::Relaxed)
        });
        let prod = c.idx(IN_PROD).load(Ordering::Acquire);
        let mut cons = c.idx(IN_CONS).load(Ordering::Relaxed);
        while cons != prod {
            // SAFETY: a byte of the page's `in` array.
            let b = unsafe { core::ptr::read_volatile(c.byte(u64::from(cons % 1024))) };
            cons = cons.wrapping_add(1);
            if b == b'\n' || len == buf.len() {
                c.write(b"echo: ");
                c.write(&buf[..len]);
                c.write(b"\n");
                len = 0;
                lines += 1;
            } else {
                buf[len] = b;
                len += 1;
            }
        }
        c.idx(IN_CONS).store(cons, Ordering::Release);
        let _ = evtchn::send(c.port);
    }
    c.drained();
    println!("echoed={lines}");
    poweroff(0)
}
