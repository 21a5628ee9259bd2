//! `role=blkbench dev=pv|emu|pt bytes=N` (and `dev=pv op=iops ops=N`): the guest
//! half of `hv bench`'s block rows.
//!
//! Ring 0 prepares the device (PV: connect, grant 32 slots of 11 data pages read-only;
//! emulated: open its ports to ring 3 with `allow_user_ports`; passthrough: find
//! the region), then ring 3 runs the whole timed loop, so that the three models are
//! compared on the same, native-speed guest code (ring 0 is emulated on some hosts):
//! Every page the timed loop touches is written once beforehand (untimed, [`warm`]).
//!
//! * `pv`: fill a slot's pages with the pattern, queue one write of up to 11 pages
//!   (44 KiB), push (an event-channel send from ring 3 when the back-end asked for
//!   one), reap responses; up to 32 requests in flight; wait by spinning on the ring.
//! * `emu`: commands of up to 128 sectors; every 4 bytes of data is an `out` to the
//!   data port (an exit).
//! * `pt`: 8-byte stores into the region.
//! * `op=iops` (`pv` only): `ops` single-page writes, one in flight at a time.
//!
//! Writes wrap around the device (or region) if `bytes` exceeds it. The time is system
//! time (no exit) around the loop, the last response included. Output: one line,
//! `blkbench dev=<d> bytes=<n> ns=<t>` (or `ops=<n>`), then power off with 0; on error
//! `blkbench: FAILED: <what>` and power off with 1.

use guest_sdk::blkfront::{BlkError, BlkOp, Blkfront, Completion, IoBuffers, Segment, WaitMode};
use guest_sdk::devices::{DeviceTable, DEV_EMU_BLOCK, DEV_PV_BLOCK};
use guest_sdk::emublk::{EmuBlock, EMU_BLOCK_PORTS};
use guest_sdk::grant::GrantTable;
use guest_sdk::hv_abi::blkif::{Blkif, BLKIF_MAX_SEGMENTS};
use guest_sdk::hv_abi::ring::RingProtocol;
use guest_sdk::hv_abi::start_info::{StartInfo, SIF_USER_HYPERCALLS};
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::passthrough::Region;
use guest_sdk::volatile::VolatileSlice;
use guest_sdk::{cmdline, println, time, user};

use crate::devices::{pattern, TAG_EMU, TAG_PT, TAG_PV};
use crate::ring3::{self, Frames};

/// Default bytes of a sequential run.
const DEFAULT_BYTES: u64 = 1 << 20;
/// Default operations of an IOPS run.
const DEFAULT_OPS: u64 = 1024;
/// Slots of the PV ring: requests in flight at most.
const SLOTS: usize = Blkif::ENTRIES as usize;
/// Pages per PV request.
const SEG_PAGES: u64 = BLKIF_MAX_SEGMENTS as u64;
/// Bytes per emulated command in the loop (the device's maximum).
const EMU_CHUNK: u64 = 128 * 512;
/// Grant references: the ring, then the data pages.
const RING_GREF: u32 = 16;
const BUF_GREF: u32 = 32;

fn fail(what: core::fmt::Arguments<'_>) -> ! {
    println!("blkbench: FAILED: {what}");
    guest_sdk::poweroff(1)
}

/// Stores the pattern for byte offsets `off..off + 8 * words` at `p` (8-aligned).
///
/// # Safety
/// `p..p + 8 * words` must be writable memory nobody holds references to.
unsafe fn store_pattern(p: *mut u64, words: usize, tag: u64, off: u64) {
    for i in 0..words {
        // SAFETY: inside the range the caller vouches for.
        unsafe { core::ptr::write_volatile(p.add(i), pattern(tag, off + 8 * i as u64)) };
    }
}

/// Which device.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dev {
    Pv,
    Emu,
    Pt,
}

/// `role=blkbench`.
pub fn run(si: &'static StartInfo) -> ! {
    let cmd = si.cmdline_bytes();
    let dev = match cmdline::value(cmd, b"dev") {
        Some(b"pv") => Dev::Pv,
        Some(b"emu") => Dev::Emu,
        Some(b"pt") => Dev::Pt,
        _ => fail(format_args!("want dev=pv, dev=emu or dev=pt")),
    };
    let iops = match cmdline::value(cmd, b"op") {
        None | Some(b"seq") => false,
        Some(b"iops") => true,
        _ => fail(format_args!("want op=seq or op=iops")),
    };
    let number = |key: &[u8], default: u64| match cmdline::value(cmd, key) {
        None => default,
        Some(v) => cmdline::parse_u64(v)
            .filter(|n| *n > 0)
            .unwrap_or_else(|| fail(format_args!("bad number in the command line"))),
    };
    let Some(table) = DeviceTable::from_start_info(si) else {
        fail(format_args!("start_info describes no device table"));
    };
    if iops {
        if dev != Dev::Pv {
            fail(format_args!("op=iops is for dev=pv"));
        }
        let ops = number(b"ops", DEFAULT_OPS);
        let ns = pv(si, &table, ops * PAGE_SIZE, true);
        println!("blkbench dev=pv ops={ops} ns={ns}");
        guest_sdk::poweroff(0)
    }
    let bytes = number(b"bytes", DEFAULT_BYTES);
    if bytes % PAGE_SIZE != 0 {
        fail(format_args!("bytes={bytes} is not a multiple of 4096"));
    }
    let (name, ns) = match dev {
        Dev::Pv => ("pv", pv(si, &table, bytes, false)),
        Dev::Emu => ("emu", emu(&table, bytes)),
        Dev::Pt => ("pt", pt(&table, bytes)),
    };
    println!("blkbench dev={name} bytes={bytes} ns={ns}");
    guest_sdk::poweroff(0)
}

/// Bytes of a device of `sectors` sectors usable for whole pages.
fn usable(sectors: u64) -> u64 {
    let b = sectors.saturating_mul(512) / PAGE_SIZE * PAGE_SIZE;
    if b == 0 {
        fail(format_args!("the device is smaller than a page"));
    }
    b
}

/// Runs `f` in ring 3; a fault fails the benchmark.
/// Writes one word in each page of `view` (untimed, from ring 3), so that the timed loop
/// of every model starts with its pages mapped: first-touch faults cost ~10 us a page on a
/// shadow-paging host and would otherwise dominate the passthrough figure.
fn warm(view: &VolatileSlice<'_>) {
    for off in (0..view.len()).step_by(PAGE_SIZE as usize) {
        let _ = view.write_u64(off, 0);
    }
}

fn in_ring3(f: impl FnMut()) {
    if let Err(e) = ring3::run(f) {
        fail(format_args!(
            "ring 3 stopped with exception {} at {:#x} (error {:#x}, cr2 {:#x})",
            e.vector, e.rip, e.error, e.cr2
        ));
    }
}

/// The PV runs: sequential writes of `bytes`, or (`iops`) `bytes / 4096` single-page
/// writes one at a time. Returns the ns taken.
fn pv(si: &StartInfo, table: &DeviceTable, bytes: u64, iops: bool) -> u64 {
    if si.flags & SIF_USER_HYPERCALLS == 0 {
        fail(format_args!(
            "dev=pv notifies from ring 3: start the domain with allow_user_hypercalls"
        ));
    }
    let Some(dev) = table.first(DEV_PV_BLOCK) else {
        fail(format_args!("no PV block device"));
    };
    let Some(grants) = GrantTable::from_start_info(si) else {
        fail(format_args!("no grant table"));
    };
    let mut frames = Frames::new(si);
    let pages = SLOTS as u64 * SEG_PAGES;
    let (Some(ring), Some(buf)) = (frames.alloc(1), frames.alloc(pages)) else {
        fail(format_args!(
            "not enough free RAM for the ring and {pages} buffer pages"
        ));
    };
    // SAFETY: a fresh page of free RAM used for nothing else; RING_GREF is ours.
    let mut blk =
        unsafe { Blkfront::connect(*table, dev.index, grants, ring as *mut u8, RING_GREF) }
            .unwrap_or_else(|e| fail(format_args!("connect: {e}")));
    blk.set_wait(WaitMode::Spin, 60_000_000_000);
    // SAFETY: fresh pages of free RAM, written only through raw pointers below.
    let bufs = unsafe {
        IoBuffers::grant(
            grants,
            blk.backend(),
            buf as *mut u8,
            pages as u32,
            BUF_GREF,
            true,
        )
    }
    .unwrap_or_else(|e| fail(format_args!("granting the buffers: {e}")));
    let disk = usable(blk.sectors());
    let mut result = Err(BlkError::Idle);
    in_ring3(|| {
        result = if iops {
            pv_iops(&mut blk, &bufs, disk, bytes / PAGE_SIZE)
        } else {
            pv_seq(&mut blk, &bufs, disk, bytes)
        };
    });
    result.unwrap_or_else(|e| fail(format_args!("dev=pv: {e}")))
}

/// Ring 3: the sequential PV loop.
fn pv_seq(blk: &mut Blkfront, bufs: &IoBuffers, disk: u64, bytes: u64) -> Result<u64, BlkError> {
    let view = bufs.view();
    let mut slot_id = [0u64; SLOTS];
    let mut busy = [false; SLOTS];
    let complete = |c: Completion, slot_id: &[u64; SLOTS], busy: &mut [bool; SLOTS]| {
        c.result().map_err(|error| BlkError::Request {
            id: c.id,
            operation: c.operation,
            error,
        })?;
        if let Some(s) = (0..SLOTS).find(|&s| busy[s] && slot_id[s] == c.id) {
            busy[s] = false;
        }
        Ok::<(), BlkError>(())
    };
    warm(&view);
    let t0 = time::system_time_ns();
    let mut off = 0u64;
    loop {
        while let Some(c) = blk.try_response()? {
            complete(c, &slot_id, &mut busy)?;
        }
        let free = (0..SLOTS).find(|&s| !busy[s]);
        if let (true, Some(s)) = (off < bytes, free) {
            let pos = off % disk;
            let len = (SEG_PAGES * PAGE_SIZE).min(bytes - off).min(disk - pos);
            let first = s as u64 * SEG_PAGES;
            let part = view
                .subslice((first * PAGE_SIZE) as usize, len as usize)
                .map_err(|_| BlkError::BadRequest("buffer slot out of range"))?;
            // SAFETY: the slot's pages are ours (no request in flight uses them).
            unsafe { store_pattern(part.as_ptr().cast(), len as usize / 8, TAG_PV, pos) };
            let (segs, n) = Segment::whole_pages(first as u32, (len / PAGE_SIZE) as usize);
            slot_id[s] = blk.queue(BlkOp::Write, pos / 512, &segs[..n], bufs)?;
            busy[s] = true;
            blk.push()?;
            off += len;
            continue;
        }
        if blk.in_flight() == 0 {
            break;
        }
        let c = blk.wait_response()?;
        complete(c, &slot_id, &mut busy)?;
    }
    Ok(time::system_time_ns() - t0)
}

/// Ring 3: `ops` single-page writes, one in flight at a time.
fn pv_iops(blk: &mut Blkfront, bufs: &IoBuffers, disk: u64, ops: u64) -> Result<u64, BlkError> {
    let page = bufs
        .view()
        .subslice(0, PAGE_SIZE as usize)
        .map_err(|_| BlkError::BadRequest("no buffer page"))?;
    let seg = [Segment::whole(0)];
    warm(&page);
    let t0 = time::system_time_ns();
    for i in 0..ops {
        let pos = (i * PAGE_SIZE) % disk;
        // SAFETY: page 0 is ours between requests.
        unsafe { store_pattern(page.as_ptr().cast(), PAGE_SIZE as usize / 8, TAG_PV, pos) };
        blk.write(pos / 512, &seg, bufs)?;
    }
    Ok(time::system_time_ns() - t0)
}

/// The emulated run: ring 3 writes through the device's ports.
fn emu(table: &DeviceTable, bytes: u64) -> u64 {
    let Some(dev) = table.first(DEV_EMU_BLOCK) else {
        fail(format_args!("no emulated block device"));
    };
    let emu = EmuBlock::from_device(&dev).unwrap_or_else(|e| fail(format_args!("{e}")));
    // SAFETY: the boot TSS is loaded and mapped; ring 3 is the benchmark's own code.
    if let Err(e) = unsafe { user::allow_user_ports(emu.base(), EMU_BLOCK_PORTS) } {
        fail(format_args!(
            "opening the emulated device's ports to ring 3: {e}"
        ));
    }
    let disk = usable(emu.sectors());
    let mut result = Ok(0);
    in_ring3(|| {
        let t0 = time::system_time_ns();
        let mut off = 0u64;
        while off < bytes {
            let pos = off % disk;
            let len = EMU_CHUNK.min(bytes - off).min(disk - pos);
            let r = emu.write_with(pos / 512, len / 512, |i| {
                let b = pos + 4 * i;
                let w = pattern(TAG_EMU, b & !7);
                if b % 8 == 0 {
                    w as u32
                } else {
                    (w >> 32) as u32
                }
            });
            if let Err(e) = r {
                result = Err(e);
                return;
            }
            off += len;
        }
        result = Ok(time::system_time_ns() - t0);
    });
    result.unwrap_or_else(|e| fail(format_args!("dev=emu: {e}")))
}

/// The passthrough run: ring 3 stores into the region.
fn pt(table: &DeviceTable, bytes: u64) -> u64 {
    let Some(region) = Region::find(table, 0) else {
        fail(format_args!("no passthrough region"));
    };
    // SAFETY: the boot page tables map the region.
    let view: VolatileSlice<'static> = unsafe { region.view() };
    let size = (view.len() as u64) & !(PAGE_SIZE - 1);
    if size == 0 {
        fail(format_args!("the region is smaller than a page"));
    }
    let mut ns = 0;
    in_ring3(|| {
        warm(&view);
        let t0 = time::system_time_ns();
        let mut off = 0u64;
        while off < bytes {
            let pos = off % size;
            let len = (bytes - off).min(size - pos);
            // SAFETY: `pos + len <= size <= view.len()`: inside the region.
            unsafe {
                store_pattern(
                    view.as_ptr().add(pos as usize).cast(),
                    len as usize / 8,
                    TAG_PT,
                    pos,
                )
            };
            off += len;
        }
        ns = time::system_time_ns() - t0;
    });
    ns
}
