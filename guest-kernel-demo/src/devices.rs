//! `role=devices` and `role=devices-direct`: one block workload on the three device
//! models (SPEC.md §8.9).
//!
//! * `role=devices` prints through the **PV console** (its ring and event channel;
//!   `console=uart` keeps the UART) and drives the **PV block** device (the first in
//!   the device table): connect (ring page and port granted to the back-end), write a
//!   pattern to sectors [`START_SECTOR`]`..`[`END_SECTOR`] with three requests in flight
//!   at once (11 + 11 whole pages, then three partial-page segments), flush, show a
//!   request beyond the disk refused with its own status next to a good one, disconnect
//!   and reconnect, read everything back with three requests and verify it, close.
//!   With `echo-input` it then waits (10 s) for a line of console input and prints it.
//! * `role=devices-direct` runs the same kind of workload on the **emulated block**
//!   device (port I/O, two commands: 128 + 64 sectors; flush; read back; a read beyond
//!   the disk refused) and on the first **passthrough** region (plain stores, no exits).
//!
//! The pattern: the little-endian `u64` at byte offset `o` (multiple of 8) of the disk
//! or region is `TAG << 48 | o`, with TAG `"PV"` (0x5056), `"EM"` (0x454D) or `"PT"`
//! (0x5054): each word says which model wrote it and where. Pattern fills and checks
//! run in ring 3 (native speed; ring 0 is emulated on some hosts).
//!
//! Every part prints one `... ok` line; then `demo <role>: all parts passed` and power
//! off 0. Any failure prints `demo <role>: FAILED: <what>` and powers off with 1.

use guest_sdk::blkfront::{BlkOp, Blkfront, IoBuffers, Segment};
use guest_sdk::devices::{
    self, DeviceTable, DEV_EMU_BLOCK, DEV_PV_BLOCK, STATE_CLOSED, STATE_CONNECTED,
};
use guest_sdk::emublk::{EmuBlock, EmuBlockError};
use guest_sdk::grant::GrantTable;
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::{Errno, Features, PAGE_SIZE};
use guest_sdk::passthrough::Region;
use guest_sdk::pvconsole::PvConsole;
use guest_sdk::volatile::VolatileSlice;
use guest_sdk::{cmdline, console, println, time, Error};

use crate::ring3::{self, Frames};

/// Pattern tags.
pub const TAG_PV: u64 = 0x5056;
/// Emulated block device.
pub const TAG_EMU: u64 = 0x454D;
/// Passthrough region.
pub const TAG_PT: u64 = 0x5054;

/// First disk sector the block workloads write.
pub const START_SECTOR: u64 = 8;
/// Bytes per sector.
const SECTOR: u64 = 512;

/// Grant references: the ring, then the data pages.
const RING_GREF: u32 = 16;
const BUF_GREF: u32 = 32;

/// Pages of PV data buffers.
const PV_PAGES: u32 = 24;
/// The three PV requests: segments (page, first sector, last sector).
const PV_LAYOUT: [&[(u32, u8, u8)]; 3] = [
    &[
        (0, 0, 7),
        (1, 0, 7),
        (2, 0, 7),
        (3, 0, 7),
        (4, 0, 7),
        (5, 0, 7),
        (6, 0, 7),
        (7, 0, 7),
        (8, 0, 7),
        (9, 0, 7),
        (10, 0, 7),
    ],
    &[
        (11, 0, 7),
        (12, 0, 7),
        (13, 0, 7),
        (14, 0, 7),
        (15, 0, 7),
        (16, 0, 7),
        (17, 0, 7),
        (18, 0, 7),
        (19, 0, 7),
        (20, 0, 7),
        (21, 0, 7),
    ],
    &[(22, 2, 7), (23, 0, 1), (23, 4, 7)],
];
/// Sectors the PV workload covers: 88 + 88 + 12.
pub const PV_SECTORS: u64 = 188;
/// One past the last sector of the PV workload.
pub const END_SECTOR: u64 = START_SECTOR + PV_SECTORS;

/// Sectors the emulated workload covers (two commands: 128 + 64).
pub const EMU_SECTORS: u64 = 192;
/// Bytes the passthrough workload covers, from the region's start.
pub const PT_BYTES: u64 = 96 << 10;

/// The pattern word at byte offset `off`.
pub const fn pattern(tag: u64, off: u64) -> u64 {
    tag << 48 | (off & 0xFFFF_FFFF_FFFF)
}

/// Writes the pattern for byte offsets `off..off + v.len()` into `v` (8-aligned).
fn fill(v: VolatileSlice<'_>, tag: u64, off: u64) {
    for i in (0..v.len()).step_by(8) {
        let _ = v.write_u64(i, pattern(tag, off + i as u64));
    }
}

/// The first word of `v` that does not hold the pattern for `off..`: (index, value).
fn check(v: VolatileSlice<'_>, tag: u64, off: u64) -> Option<(u64, u64)> {
    (0..v.len()).step_by(8).find_map(|i| {
        let got = v.read_u64(i).unwrap_or(!0);
        (got != pattern(tag, off + i as u64)).then_some((off + i as u64, got))
    })
}

/// Reports a failure and powers off with 1.
fn fail(role: &str, what: core::fmt::Arguments<'_>) -> ! {
    println!("demo {role}: FAILED: {what}");
    finish(1)
}

/// Waits (up to 2 s) until the PV console's ring is drained if it is in use, then
/// powers off.
fn finish(code: u8) -> ! {
    if console::sink() == console::Sink::PvConsole {
        let deadline = time::system_time_ns() + 2_000_000_000;
        let c = PV_CONSOLE.get();
        while c.is_some_and(|c| c.output_pending() != 0) && time::system_time_ns() < deadline {
            core::hint::spin_loop();
        }
    }
    guest_sdk::poweroff(code)
}

/// The PV console in use, for [`finish`].
struct ConsoleSlot(core::cell::UnsafeCell<Option<PvConsole>>);
// SAFETY: written once by vCPU 0 before it is read; the demo runs on vCPU 0 only.
unsafe impl Sync for ConsoleSlot {}
impl ConsoleSlot {
    fn get(&self) -> Option<PvConsole> {
        // SAFETY: see the Sync impl.
        unsafe { *self.0.get() }
    }
    fn set(&self, c: PvConsole) {
        // SAFETY: see the Sync impl.
        unsafe { *self.0.get() = Some(c) }
    }
}
static PV_CONSOLE: ConsoleSlot = ConsoleSlot(core::cell::UnsafeCell::new(None));

/// Checks features, prints the device table; returns it.
fn common(si: &StartInfo, role: &str, needed: Features) -> DeviceTable {
    let have = Features(si.features);
    if !have.contains(needed) {
        fail(
            role,
            format_args!(
                "needs features {needed}, the hypervisor has {have} (missing {})",
                needed.missing_from(have)
            ),
        );
    }
    let Some(table) = DeviceTable::from_start_info(si) else {
        fail(role, format_args!("start_info describes no device table"));
    };
    for d in table.iter() {
        println!(
            "demo {role}: device {}: {} base {:#x} size {} state {}{}",
            d.index,
            devices::kind_name(d.kind()),
            d.entry.base,
            d.entry.size,
            devices::state_name(d.entry.state),
            if d.readonly() { " read-only" } else { "" }
        );
    }
    table
}

/// Runs `f` in ring 3, failing the demo if it faults.
fn user(role: &str, what: &str, f: impl FnMut()) {
    if let Err(e) = ring3::run(f) {
        fail(
            role,
            format_args!(
                "{what}: ring 3 stopped with exception {} at {:#x} (error {:#x}, cr2 {:#x})",
                e.vector, e.rip, e.error, e.cr2
            ),
        );
    }
}

/// The (buffer offset, disk offset) of each sector of the PV layout, from
/// [`START_SECTOR`].
fn pv_sectors() -> impl Iterator<Item = (u64, u64)> {
    PV_LAYOUT
        .iter()
        .flat_map(|req| req.iter())
        .flat_map(|&(page, first, last)| {
            (first..=last).map(move |s| u64::from(page) * PAGE_SIZE + u64::from(s) * SECTOR)
        })
        .zip((START_SECTOR..END_SECTOR).map(|s| s * SECTOR))
}

/// Queues the three PV requests of `op`, pushes them once, and checks that each got
/// an OK response.
fn pv_batch(blk: &mut Blkfront, bufs: &IoBuffers, op: BlkOp, what: &str) {
    let role = "devices";
    let mut ids = [0u64; 3];
    let mut sector = START_SECTOR;
    for (i, req) in PV_LAYOUT.iter().enumerate() {
        let mut segs = [Segment::default(); 11];
        for (s, &(page, first_sect, last_sect)) in segs.iter_mut().zip(req.iter()) {
            *s = Segment {
                page,
                first_sect,
                last_sect,
            };
        }
        let segs = &segs[..req.len()];
        ids[i] = blk
            .queue(op, sector, segs, bufs)
            .unwrap_or_else(|e| fail(role, format_args!("{what}: queueing request {i}: {e}")));
        sector += segs.iter().map(Segment::sectors).sum::<u64>();
    }
    if let Err(e) = blk.push() {
        fail(role, format_args!("{what}: push: {e}"));
    }
    let mut seen = [false; 3];
    for _ in 0..3 {
        let c = blk
            .wait_response()
            .unwrap_or_else(|e| fail(role, format_args!("{what}: waiting: {e}")));
        let Some(i) = ids.iter().position(|&id| id == c.id) else {
            fail(
                role,
                format_args!("{what}: response for unknown id {}", c.id),
            );
        };
        if seen[i] {
            fail(role, format_args!("{what}: two responses for id {}", c.id));
        }
        seen[i] = true;
        if let Err(e) = c.result() {
            fail(role, format_args!("{what}: request {} failed: {e}", c.id));
        }
    }
}

/// `role=devices`.
pub fn run_pv(si: &'static StartInfo) -> ! {
    let role = "devices";
    if console::sink() != console::Sink::Uart {
        let Some(c) = PvConsole::from_start_info(si) else {
            fail(role, format_args!("start_info describes no PV console"));
        };
        PV_CONSOLE.set(c);
        console::use_pv_console(c);
        println!(
            "demo devices: printing through the PV console (page {:#x}, event channel {})",
            c.page(),
            c.port()
        );
    }
    let table = common(
        si,
        role,
        Features::PV_BLOCK | Features::DEV_OP | Features::GNTTAB | Features::EVTCHN,
    );
    let Some(dev) = table.first(DEV_PV_BLOCK) else {
        fail(role, format_args!("no PV block device in the device table"));
    };
    if dev.entry.size < END_SECTOR + 8 {
        fail(
            role,
            format_args!(
                "the PV disk has {} sectors; need {}",
                dev.entry.size,
                END_SECTOR + 8
            ),
        );
    }
    let Some(grants) = GrantTable::from_start_info(si) else {
        fail(role, format_args!("start_info describes no grant table"));
    };
    let mut frames = Frames::new(si);
    let (Some(ring), Some(buf)) = (frames.alloc(1), frames.alloc(u64::from(PV_PAGES))) else {
        fail(role, format_args!("not enough free RAM"));
    };

    // Connect.
    // SAFETY: `ring` is a fresh page of free RAM used for nothing else; RING_GREF is
    // this demo's.
    let mut blk =
        unsafe { Blkfront::connect(table, dev.index, grants, ring as *mut u8, RING_GREF) }
            .unwrap_or_else(|e| fail(role, format_args!("connecting device {}: {e}", dev.index)));
    let st = devices::state(dev.index);
    if st != Ok(STATE_CONNECTED) {
        fail(role, format_args!("state after connect is {st:?}"));
    }
    println!(
        "demo devices: pv block: device {} connected ({} sectors), ring gref {RING_GREF}, event channel {}",
        dev.index,
        blk.sectors(),
        blk.port()
    );
    // SAFETY: fresh pages of free RAM, accessed only through `bufs.view()` from now on.
    let bufs = unsafe {
        IoBuffers::grant(
            grants,
            blk.backend(),
            buf as *mut u8,
            PV_PAGES,
            BUF_GREF,
            false,
        )
    }
    .unwrap_or_else(|e| fail(role, format_args!("granting the data pages: {e}")));

    // Write the pattern with three requests in flight, then flush.
    let view = bufs.view();
    user(role, "filling the buffers", || {
        for (b, d) in pv_sectors() {
            if let Ok(s) = view.subslice(b as usize, SECTOR as usize) {
                fill(s, TAG_PV, d);
            }
        }
    });
    pv_batch(&mut blk, &bufs, BlkOp::Write, "write");
    println!(
        "demo devices: pv block: wrote sectors {START_SECTOR}..{END_SECTOR} ({} bytes) with 3 requests in flight (11 + 11 + 3 segments): 3 responses ok",
        PV_SECTORS * SECTOR
    );
    let t0 = time::system_time_ns();
    if let Err(e) = blk.flush() {
        fail(role, format_args!("flush: {e}"));
    }
    println!(
        "demo devices: pv block: flush ok ({} us)",
        (time::system_time_ns() - t0) / 1000
    );

    // Errors are per request: a good read next to one beyond the disk.
    let one = [Segment::whole(0)];
    let good = blk.queue(BlkOp::Read, START_SECTOR, &one, &bufs);
    let bad = blk.queue(BlkOp::Read, blk.sectors() - 4, &one, &bufs);
    let (Ok(good), Ok(bad)) = (good, bad) else {
        fail(
            role,
            format_args!("queueing the error test: {good:?} {bad:?}"),
        );
    };
    if let Err(e) = blk.push() {
        fail(role, format_args!("push: {e}"));
    }
    let mut statuses = [None, None];
    for _ in 0..2 {
        match blk.wait_response() {
            Ok(c) if c.id == good => statuses[0] = Some(c.result()),
            Ok(c) if c.id == bad => statuses[1] = Some(c.result()),
            Ok(c) => fail(role, format_args!("response for unknown id {}", c.id)),
            Err(e) => fail(role, format_args!("waiting for the error test: {e}")),
        }
    }
    if statuses != [Some(Ok(())), Some(Err(Error::Errno(Errno::ERANGE)))] {
        fail(
            role,
            format_args!("a good read and one beyond the disk gave {statuses:?}"),
        );
    }
    println!(
        "demo devices: pv block: per-request status ok: request {good} ok, request {bad} (beyond the disk) refused with ERANGE"
    );

    // Disconnect and reconnect.
    if let Err(e) = blk.disconnect() {
        fail(role, format_args!("disconnect: {e}"));
    }
    let st = devices::state(dev.index);
    let table_st = blk.table_state().0;
    if st != Ok(STATE_CLOSED) || table_st != STATE_CLOSED {
        fail(
            role,
            format_args!("after disconnect: dev_op state {st:?}, table state {table_st}"),
        );
    }
    if let Err(e) = blk.reconnect() {
        fail(role, format_args!("reconnect: {e}"));
    }
    let st = devices::state(dev.index);
    if st != Ok(STATE_CONNECTED) {
        fail(role, format_args!("state after reconnect is {st:?}"));
    }
    println!(
        "demo devices: pv block: disconnected (state closed) and reconnected (state connected)"
    );

    // Read everything back and verify.
    user(role, "clearing the buffers", || view.fill(0));
    pv_batch(&mut blk, &bufs, BlkOp::Read, "read back");
    let mut bad_word = None;
    user(role, "verifying", || {
        bad_word = pv_sectors().find_map(|(b, d)| {
            let s = view.subslice(b as usize, SECTOR as usize).ok()?;
            check(s, TAG_PV, d)
        });
    });
    if let Some((off, got)) = bad_word {
        fail(
            role,
            format_args!(
                "read back: disk offset {off:#x} holds {got:#x}, want {:#x}",
                pattern(TAG_PV, off)
            ),
        );
    }
    println!(
        "demo devices: pv block: read back {} bytes with 3 requests after the reconnect: pattern verified",
        PV_SECTORS * SECTOR
    );
    if let Err(e) = blk.close() {
        fail(role, format_args!("close: {e}"));
    }
    if let Err((_, e)) = bufs.revoke() {
        fail(role, format_args!("revoking the data pages: {e}"));
    }
    println!("demo devices: pv block: closed; ring and data grants revoked");

    if cmdline::has_flag(si.cmdline_bytes(), b"echo-input") {
        echo_input(role);
    }
    println!("demo devices: all parts passed");
    finish(0)
}

/// Waits up to 10 s for a line of PV console input and prints it.
fn echo_input(role: &str) {
    let Some(c) = PV_CONSOLE.get() else {
        fail(role, format_args!("echo-input needs the PV console"));
    };
    let deadline = time::system_time_ns() + 10_000_000_000;
    let mut line = [0u8; 128];
    let mut n = 0;
    while n < line.len() {
        match c.wait_input(deadline) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => fail(role, format_args!("waiting for console input: {e}")),
        }
        n += c.read(&mut line[n..]);
        if line[..n].contains(&b'\n') {
            break;
        }
    }
    let text = &line[..n];
    let text = match text.iter().position(|&b| b == b'\n') {
        Some(i) => &text[..i],
        None => text,
    };
    if text.is_empty() {
        fail(role, format_args!("no console input within 10 s"));
    }
    println!(
        "demo devices: console input: {}",
        core::str::from_utf8(text).unwrap_or("<not UTF-8>")
    );
}

/// `role=devices-direct`.
pub fn run_direct(si: &'static StartInfo) -> ! {
    let role = "devices-direct";
    let table = common(si, role, Features::NONE);
    let mut frames = Frames::new(si);

    // The emulated block device: port I/O, each access an exit.
    let Some(dev) = table.first(DEV_EMU_BLOCK) else {
        fail(
            role,
            format_args!("no emulated block device in the device table"),
        );
    };
    let emu = EmuBlock::from_device(&dev).unwrap_or_else(|e| fail(role, format_args!("{e}")));
    let len = EMU_SECTORS * SECTOR;
    if emu.sectors() < START_SECTOR + EMU_SECTORS {
        fail(
            role,
            format_args!(
                "the emulated disk has {} sectors; need {}",
                emu.sectors(),
                START_SECTOR + EMU_SECTORS
            ),
        );
    }
    let Some(buf) = frames.alloc(len / PAGE_SIZE) else {
        fail(role, format_args!("not enough free RAM"));
    };
    // SAFETY: fresh pages of free RAM, used only through this view and the slice
    // below (never at the same time).
    let view = unsafe { VolatileSlice::new(buf as *mut u8, len as usize) };
    user(role, "filling the buffer", || {
        fill(view, TAG_EMU, START_SECTOR * SECTOR)
    });
    {
        // SAFETY: as above; nothing else uses the pages while the slice lives.
        let data = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
        if let Err(e) = emu.write(START_SECTOR, data) {
            fail(role, format_args!("emulated write: {e}"));
        }
    }
    if let Err(e) = emu.flush() {
        fail(role, format_args!("emulated flush: {e}"));
    }
    user(role, "clearing the buffer", || view.fill(0));
    {
        // SAFETY: as above.
        let data = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, len as usize) };
        if let Err(e) = emu.read(START_SECTOR, data) {
            fail(role, format_args!("emulated read: {e}"));
        }
    }
    let mut bad = None;
    user(role, "verifying", || {
        bad = check(view, TAG_EMU, START_SECTOR * SECTOR)
    });
    if let Some((off, got)) = bad {
        fail(
            role,
            format_args!("emulated read back: disk offset {off:#x} holds {got:#x}"),
        );
    }
    let mut two = [0u8; 1024];
    let beyond = emu.read(emu.sectors() - 1, &mut two);
    if !matches!(
        beyond,
        Err(EmuBlockError::Device {
            error: Error::Errno(Errno::ERANGE),
            ..
        })
    ) {
        fail(
            role,
            format_args!("a read beyond the emulated disk gave {beyond:?}"),
        );
    }
    println!(
        "demo devices-direct: emulated block: device {}: wrote sectors {START_SECTOR}..{} ({len} bytes) in 2 commands, flush ok, read back and verified; a read beyond the disk refused with ERANGE",
        dev.index,
        START_SECTOR + EMU_SECTORS
    );

    // The passthrough region: plain stores, no exits.
    let Some(region) = guest_sdk::passthrough::Region::find(&table, 0) else {
        fail(
            role,
            format_args!("no passthrough region in the device table"),
        );
    };
    run_region(role, &region);
    println!("demo devices-direct: all parts passed");
    finish(0)
}

/// Writes and checks the pattern over the first [`PT_BYTES`] of `region`.
fn run_region(role: &str, region: &Region) {
    // SAFETY: the boot page tables map the region (the demo never leaves them).
    let all = unsafe { region.view() };
    let Ok(v) = all.subslice(0, (PT_BYTES as usize).min(all.len()) & !7) else {
        fail(role, format_args!("the passthrough region is empty"));
    };
    user(role, "writing the region", || fill(v, TAG_PT, 0));
    let mut bad = None;
    user(role, "verifying the region", || bad = check(v, TAG_PT, 0));
    if let Some((off, got)) = bad {
        fail(
            role,
            format_args!("passthrough: offset {off:#x} holds {got:#x}"),
        );
    }
    println!(
        "demo devices-direct: passthrough: device {} at {:#x} ({} bytes): wrote {} bytes with plain stores from ring 3, read back and verified",
        region.device(),
        region.base(),
        region.len(),
        v.len()
    );
}
