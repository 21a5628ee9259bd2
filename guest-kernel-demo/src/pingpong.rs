//! `role=ping peer=NAME` / `role=pong peer=NAME`: two connected demo domains use the
//! SDK's event channels, upcalls, grant tables and timer (run them with
//! `hv run --config examples/pingpong.toml`).
//!
//! Each side finds its pre-bound port and its peer's id on the command line
//! (`evtchn.<peer>=<port> domid.<peer>=<id>`, appended by hv), installs the upcall
//! handler and then, in order:
//!
//! 0. **local**: each side alone: an IPI port (upcall, mask, unmask, status, close),
//!    a loopback interdomain pair, the wall clock, the grant table's size.
//! 1. **ping-pong**: ping sends and sleeps until its handler saw the reply, `rounds=N`
//!    times (default 100; **give both sides the same N**); pong replies from its
//!    handler. Ping prints the average round trip, measured with system time.
//! 2. **grant map**: ping grants page [`MAP_REF`] (8) to pong, writable, with a
//!    pattern in its first half, and notifies; pong maps it (`GNTMAP_HOST_MAP` at the
//!    first page of its grant window, on the boot page tables), checks the pattern,
//!    writes a reply into the second half and notifies; ping checks that the grant is
//!    in use (`GTF_READING|GTF_WRITING`) and that revoking it fails with `Busy`, and
//!    notifies; pong unmaps and notifies; ping checks the reply and revokes the grant
//!    (which must succeed now that it is unmapped).
//! 3. **grant copy**: ping grants page [`COPY_REF`] (9) read-only and notifies; pong
//!    copies it into its own memory with `GNTTABOP_COPY`, checks the bytes and
//!    notifies; ping revokes.
//! 4. **timer**: each side ticks every 10 ms with `set_timer_op` re-armed from its
//!    `VIRQ_TIMER` handler, waits for 5 ticks in `SCHEDOP_POLL` and prints them.
//!
//! Every part prints one `... ok` line; then `demo <role>: all parts passed` and power
//! off with 0. Any failure prints `demo <role>: FAILED: <what>` and powers off with 1.
//! Parts 1-3 run under a watchdog (the one-shot timer, every second): a peer that dies
//! (its end of the channel closes) or a wait longer than 30 s fails the demo instead
//! of hanging it.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use guest_sdk::evtchn::{self, Port};
use guest_sdk::grant::{self, GrantError, GrantTable, GNTCOPY_SOURCE_GREF, GNTMAP_HOST_MAP};
use guest_sdk::hv_abi::grant::{GnttabCopy, GTF_READING, GTF_WRITING};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::time::{self, PeriodicTimer};
use guest_sdk::{cmdline, println, sched, upcall, virt_to_phys, Features};

/// The grant reference ping shares writable for part 2.
pub const MAP_REF: u32 = 8;
/// The grant reference ping shares read-only for part 3.
pub const COPY_REF: u32 = 9;

/// Default number of ping-pong rounds.
const DEFAULT_ROUNDS: u64 = 100;
/// Most rounds accepted.
const MAX_ROUNDS: u64 = 1_000_000;
/// How long one wait of parts 1-3 may take before the watchdog fails the demo.
const WATCHDOG_NS: u64 = 30_000_000_000;
/// How often the watchdog checks that the peer is still there.
const WATCHDOG_PERIOD_NS: u64 = 1_000_000_000;
/// Timer period and number of ticks of part 4.
const TICK_NS: u64 = 10_000_000;
const TICKS: usize = 5;

/// Words of a page.
const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Part 2: ping's words (first half) and pong's reply (second half).
const PING_WORD: u64 = 0x5049_4E47_0000_0000;
const PONG_WORD: u64 = 0x504F_4E47_0000_0000;

/// Which side this domain plays.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Starts every exchange.
    Ping,
    /// Answers.
    Pong,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ping => "ping",
            Role::Pong => "pong",
        }
    }
}

/// A page-aligned page of this kernel, shared with the peer through raw pointers only.
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u64; WORDS]>);
// SAFETY: accessed only through volatile reads and writes of whole words by vCPU 0
// (and by the peer, through the hypervisor, while granted).
unsafe impl Sync for Page {}

impl Page {
    const fn new() -> Page {
        Page(UnsafeCell::new([0; WORDS]))
    }
    fn addr(&self) -> u64 {
        virt_to_phys(self.0.get())
    }
}

/// Part 2's page (ping grants it).
static MAP_PAGE: Page = Page::new();
/// Part 3's source (ping grants it read-only) and destination (pong's own frame).
static COPY_PAGE: Page = Page::new();

/// Events received on the peer port (the handler counts them).
static RX: AtomicU64 = AtomicU64::new(0);
/// Pong: the handler answers the events numbered up to this (the ping-pong rounds).
static REPLY_UNTIL: AtomicU64 = AtomicU64::new(0);
/// Timer mode: watchdog (0) or ticking (1).
static TIMER_MODE: AtomicU8 = AtomicU8::new(0);
static WATCHDOG_FIRED: AtomicBool = AtomicBool::new(false);
static TIMER: PeriodicTimer = PeriodicTimer::new();
static TICK_COUNT: AtomicU64 = AtomicU64::new(0);
static TICK_AT: [AtomicU64; TICKS] = [const { AtomicU64::new(0) }; TICKS];
static TICK_DUE: [AtomicU64; TICKS] = [const { AtomicU64::new(0) }; TICKS];

/// The peer port's handler: count, and (pong, during the ping-pong) answer at once.
fn on_peer(port: Port) {
    let n = RX.fetch_add(1, Ordering::AcqRel) + 1;
    if n <= REPLY_UNTIL.load(Ordering::Acquire) {
        // A failed reply shows up as ping's timeout.
        let _ = evtchn::send(port);
    }
}

/// VIRQ_TIMER's handler: the watchdog, or a tick (re-armed by `on_tick`).
fn on_timer(_port: Port) {
    if TIMER_MODE.load(Ordering::Acquire) == 0 {
        WATCHDOG_FIRED.store(true, Ordering::Release);
        return;
    }
    let now = time::system_time_ns();
    if let Some(due) = TIMER.on_tick() {
        let i = TICK_COUNT.fetch_add(1, Ordering::AcqRel) as usize;
        if let (Some(at), Some(d)) = (TICK_AT.get(i), TICK_DUE.get(i)) {
            at.store(now, Ordering::Release);
            d.store(due, Ordering::Release);
        }
    }
}

/// What a role needs: its peer's port and id, the number of rounds, the grant table.
struct Ctx {
    role: Role,
    port: Port,
    peer_dom: u16,
    rounds: u64,
    timer_port: Port,
    table: GrantTable,
    window: u64,
}

/// Reports a failure and powers off with 1.
fn fail(role: Role, what: core::fmt::Arguments<'_>) -> ! {
    println!("demo {}: FAILED: {}", role.name(), what);
    guest_sdk::poweroff(1)
}

/// The number in word `<prefix><peer>=<number>` of the command line.
fn peer_value(cmd: &[u8], prefix: &[u8], peer: &[u8]) -> Option<u64> {
    cmdline::words(cmd).find_map(|w| {
        let v = w
            .strip_prefix(prefix)?
            .strip_prefix(peer)?
            .strip_prefix(b"=")?;
        cmdline::parse_u64(v)
    })
}

/// Runs `role` to the end: powers off.
pub fn run(si: &'static StartInfo, role: Role) -> ! {
    let name = role.name();
    let cmd = si.cmdline_bytes();
    let needed = Features::EVTCHN | Features::TIMER | Features::GNTTAB;
    let have = Features(si.features);
    if !have.contains(needed) {
        fail(
            role,
            format_args!(
                "role={name} needs features {needed}, the hypervisor has {have} (missing {})",
                needed.missing_from(have)
            ),
        );
    }
    let Some(peer) = cmdline::value(cmd, b"peer") else {
        fail(role, format_args!("no peer=NAME on the command line"));
    };
    let peer_name = core::str::from_utf8(peer).unwrap_or("?");
    let port = peer_value(cmd, b"evtchn.", peer).filter(|p| (1..4096).contains(p));
    let dom = peer_value(cmd, b"domid.", peer).filter(|d| *d < 0x7FF0);
    let (Some(port), Some(peer_dom)) = (port, dom) else {
        fail(
            role,
            format_args!(
                "no valid evtchn.{peer_name}= and domid.{peer_name}= on the command line \
                 (is this domain connected to {peer_name}?)"
            ),
        );
    };
    let rounds = match cmdline::value(cmd, b"rounds") {
        None => DEFAULT_ROUNDS,
        Some(v) => match cmdline::parse_u64(v) {
            Some(n) if (1..=MAX_ROUNDS).contains(&n) => n,
            _ => fail(role, format_args!("bad rounds= (want 1-{MAX_ROUNDS})")),
        },
    };
    let Some(table) = GrantTable::from_start_info(si) else {
        fail(role, format_args!("start_info describes no grant table"));
    };
    if si.grant_window_gpa == 0 || si.grant_window_frames == 0 {
        fail(role, format_args!("start_info describes no grant window"));
    }
    println!(
        "demo {name}: domain {}, peer {peer_name} (domain {peer_dom}) on port {port}, {rounds} rounds",
        si.domid
    );

    // Handlers first, then the timer port, then the upcall gate and interrupts.
    let port = port as Port;
    if let Err(e) = evtchn::set_handler(port, on_peer) {
        fail(role, format_args!("set_handler({port}): {e}"));
    }
    let timer_port = match evtchn::bind_virq(evtchn::VIRQ_TIMER, 0) {
        Ok(p) => p,
        Err(e) => fail(role, format_args!("bind_virq(VIRQ_TIMER): {e}")),
    };
    if let Err(e) = evtchn::set_handler(timer_port, on_timer) {
        fail(role, format_args!("set_handler({timer_port}): {e}"));
    }
    if role == Role::Pong {
        REPLY_UNTIL.store(rounds, Ordering::Release);
    }
    if let Err(e) = upcall::install(upcall::DEFAULT_VECTOR) {
        fail(role, format_args!("installing the upcall vector: {e}"));
    }
    upcall::enable_interrupts();
    // Events that arrived before the vector was set raised no interrupt.
    upcall::unmask_upcalls(0);
    arm_watchdog(role);

    let ctx = Ctx {
        role,
        port,
        peer_dom: peer_dom as u16,
        rounds,
        timer_port,
        table,
        window: si.grant_window_gpa,
    };
    local_checks(&ctx);
    match role {
        Role::Ping => {
            ping_pong(&ctx);
            grant_map_ping(&ctx);
            grant_copy_ping(&ctx);
        }
        Role::Pong => {
            pong_answers(&ctx);
            grant_map_pong(&ctx);
            grant_copy_pong(&ctx);
        }
    }
    ticks(&ctx);
    if evtchn::unhandled_events() != 0 {
        fail(
            role,
            format_args!(
                "{} events on ports without a handler",
                evtchn::unhandled_events()
            ),
        );
    }
    println!(
        "demo {name}: all parts passed ({} upcalls taken)",
        upcall::upcalls_taken()
    );
    guest_sdk::poweroff(0)
}

/// Sleeps in `SCHEDOP_BLOCK` until `n` events arrived from the peer. The watchdog
/// fires every second: if the peer's end is gone (it died: hv closed its ports and
/// ours became unbound) or [`WATCHDOG_NS`] passed, the demo fails.
fn wait_rx(ctx: &Ctx, n: u64, what: &str) {
    wait_until(ctx, what, true, || RX.load(Ordering::Acquire) >= n);
}

/// Sleeps in `SCHEDOP_BLOCK` until `cond` holds (event handlers make it true), under
/// the watchdog; with `peer`, also fails as soon as the peer's end is gone.
fn wait_until(ctx: &Ctx, what: &str, peer: bool, mut cond: impl FnMut() -> bool) {
    let start = time::system_time_ns();
    loop {
        sched::block_until(|| cond() || WATCHDOG_FIRED.load(Ordering::Acquire));
        if cond() {
            return;
        }
        WATCHDOG_FIRED.store(false, Ordering::Release);
        let peer_state = evtchn::status(ctx.port).map(|s| s.status);
        if peer && peer_state != Ok(evtchn::EVTCHNSTAT_INTERDOMAIN) {
            fail(
                ctx.role,
                format_args!(
                    "the peer is gone while waiting for {what} (port {} state {peer_state:?})",
                    ctx.port
                ),
            );
        }
        if time::system_time_ns() - start >= WATCHDOG_NS {
            fail(ctx.role, format_args!("timed out waiting for {what}"));
        }
        arm_watchdog(ctx.role);
    }
}

/// Events the local ports of part 0 received.
static LOCAL: AtomicU64 = AtomicU64::new(0);

fn on_local(_port: Port) {
    LOCAL.fetch_add(1, Ordering::AcqRel);
}

/// Part 0, both roles: the SDK's event-channel calls on this domain alone (an IPI
/// port, masking, a loopback interdomain pair, status and close), the wall clock and
/// the grant table's size.
fn local_checks(ctx: &Ctx) {
    let role = ctx.role;
    let check = |ok: bool, what: &str| {
        if !ok {
            fail(role, format_args!("local checks: {what}"));
        }
    };
    let must = |r: Result<(), guest_sdk::Error>, what: &str| {
        if let Err(e) = r {
            fail(role, format_args!("local checks: {what}: {e}"));
        }
    };
    let ipi = match evtchn::bind_ipi(0) {
        Ok(p) => p,
        Err(e) => fail(role, format_args!("local checks: bind_ipi: {e}")),
    };
    must(evtchn::set_handler(ipi, on_local), "set_handler(ipi)");
    must(evtchn::send(ipi), "send(ipi)");
    wait_until(ctx, "the IPI", false, || LOCAL.load(Ordering::Acquire) >= 1);
    // Masked: the event stays pending, no handler runs; unmask delivers it.
    must(evtchn::mask(ipi), "mask(ipi)");
    must(evtchn::send(ipi), "send(masked ipi)");
    check(evtchn::is_pending(ipi), "a masked IPI is not pending");
    check(
        LOCAL.load(Ordering::Acquire) == 1,
        "a masked IPI ran its handler",
    );
    must(evtchn::unmask(ipi), "unmask(ipi)");
    wait_until(ctx, "the unmasked IPI", false, || {
        LOCAL.load(Ordering::Acquire) >= 2
    });
    let st = evtchn::status(ipi).map(|s| s.status);
    check(st == Ok(evtchn::EVTCHNSTAT_IPI), "status(ipi) is not IPI");
    must(evtchn::close(ipi), "close(ipi)");
    let st = evtchn::status(ipi).map(|s| s.status);
    check(
        st == Ok(evtchn::EVTCHNSTAT_CLOSED),
        "a closed port is not closed",
    );
    evtchn::clear_handler(ipi);

    // A loopback pair: the bound end starts pending, so bind it and register its
    // handler with interrupts off (the upcall then finds a handler).
    let a = match evtchn::alloc_unbound(evtchn::DOMID_SELF) {
        Ok(p) => p,
        Err(e) => fail(role, format_args!("local checks: alloc_unbound: {e}")),
    };
    must(evtchn::set_handler(a, on_local), "set_handler(a)");
    let b = upcall::without_interrupts(|| {
        let b = evtchn::bind_interdomain(evtchn::DOMID_SELF, a)?;
        evtchn::set_handler(b, on_local)?;
        Ok::<_, guest_sdk::Error>(b)
    });
    let b = match b {
        Ok(b) => b,
        Err(e) => fail(role, format_args!("local checks: bind_interdomain: {e}")),
    };
    wait_until(ctx, "the bound port's first event", false, || {
        LOCAL.load(Ordering::Acquire) >= 3
    });
    must(evtchn::send(a), "send(a)");
    must(evtchn::send(b), "send(b)");
    wait_until(ctx, "the loopback events", false, || {
        LOCAL.load(Ordering::Acquire) >= 5
    });
    must(evtchn::bind_vcpu(a, 0), "bind_vcpu(a, 0)");
    let st = evtchn::status(a);
    check(
        st.is_ok_and(|s| s.status == evtchn::EVTCHNSTAT_INTERDOMAIN && s.remote_port == b),
        "status(a) is not interdomain to b",
    );
    must(evtchn::close(a), "close(a)");
    let st = evtchn::status(b).map(|s| s.status);
    check(
        st == Ok(evtchn::EVTCHNSTAT_UNBOUND),
        "closing one end did not unbind the other",
    );
    must(evtchn::close(b), "close(b)");
    evtchn::clear_handler(a);
    evtchn::clear_handler(b);

    let wc = time::wallclock();
    check(wc.sec > 1_500_000_000, "the wall clock is before 2017");
    let size = grant::query_size();
    check(
        matches!(size, Ok((n, max)) if n >= 1 && n <= max),
        "GNTTABOP_QUERY_SIZE",
    );
    println!(
        "demo {}: local event channels ok: IPI upcall, mask/unmask, loopback pair, status, close; wall clock {}.{:09} s; grant table {} frames",
        role.name(),
        wc.sec,
        wc.nsec,
        size.map(|s| s.0).unwrap_or(0)
    );
}

/// Arms the one-shot timer [`WATCHDOG_PERIOD_NS`] from now.
fn arm_watchdog(role: Role) {
    if let Err(e) = time::set_timer(time::system_time_ns() + WATCHDOG_PERIOD_NS) {
        fail(role, format_args!("set_timer (watchdog): {e}"));
    }
}

fn send(ctx: &Ctx) {
    if let Err(e) = evtchn::send(ctx.port) {
        fail(ctx.role, format_args!("send on port {}: {e}", ctx.port));
    }
}

/// Part 1, ping: `rounds` round trips, timed.
fn ping_pong(ctx: &Ctx) {
    let t0 = time::system_time_ns();
    for i in 1..=ctx.rounds {
        send(ctx);
        wait_rx(ctx, i, "pong's reply");
    }
    let total = time::system_time_ns() - t0;
    let avg = total / ctx.rounds;
    println!(
        "demo ping: ping-pong ok: {} rounds, average round trip {} ns ({}.{:03} us)",
        ctx.rounds,
        avg,
        avg / 1000,
        avg % 1000
    );
}

/// Part 1, pong: the handler answers; wait until it answered every round.
fn pong_answers(ctx: &Ctx) {
    wait_rx(ctx, ctx.rounds, "ping's rounds");
    println!("demo pong: ping-pong ok: answered {} pings", ctx.rounds);
}

fn word_ptr(base: u64, i: usize) -> *mut u64 {
    (base + 8 * i as u64) as *mut u64
}

/// Part 2, ping: grant, pattern, notify; check the reply; revoke.
fn grant_map_ping(ctx: &Ctx) {
    let base = MAP_PAGE.addr();
    for i in 0..WORDS / 2 {
        // SAFETY: MAP_PAGE is this kernel's page, not granted yet; raw volatile writes.
        unsafe { core::ptr::write_volatile(word_ptr(base, i), PING_WORD | i as u64) };
    }
    // SAFETY: MAP_PAGE is only ever accessed through volatile raw-pointer accesses,
    // and is used for nothing else.
    if let Err(e) = unsafe {
        ctx.table
            .grant_access(MAP_REF, ctx.peer_dom, base / PAGE_SIZE, false)
    } {
        fail(ctx.role, format_args!("granting ref {MAP_REF}: {e}"));
    }
    send(ctx);
    // Pong has it mapped: the grant is in use and cannot be revoked.
    wait_rx(ctx, ctx.rounds + 1, "pong's mapping");
    let in_use = ctx.table.flags(MAP_REF).unwrap_or(0);
    if in_use & (GTF_READING | GTF_WRITING) != GTF_READING | GTF_WRITING {
        fail(
            ctx.role,
            format_args!("grant map: ref {MAP_REF} mapped writable by pong has flags {in_use:#x}"),
        );
    }
    match ctx.table.revoke(MAP_REF) {
        Err(GrantError::Busy) => {}
        other => fail(
            ctx.role,
            format_args!("grant map: revoking ref {MAP_REF} while mapped gave {other:?}, not Busy"),
        ),
    }
    send(ctx);
    wait_rx(ctx, ctx.rounds + 2, "pong's unmapping");
    for i in WORDS / 2..WORDS {
        // SAFETY: as above; pong is done with the page (it notified after unmapping).
        let v = unsafe { core::ptr::read_volatile(word_ptr(base, i)) };
        if v != PONG_WORD | i as u64 {
            fail(
                ctx.role,
                format_args!("grant map: word {i} of the shared page is {v:#x}, not pong's reply"),
            );
        }
    }
    match ctx.table.is_in_use(MAP_REF) {
        Ok(false) => {}
        other => fail(
            ctx.role,
            format_args!("grant map: ref {MAP_REF} still in use after pong unmapped ({other:?})"),
        ),
    }
    if let Err(e) = ctx.table.revoke(MAP_REF) {
        fail(ctx.role, format_args!("revoking ref {MAP_REF}: {e}"));
    }
    println!(
        "demo ping: grant map ok: pong read ref {MAP_REF} and wrote its reply ({} words checked); revoke refused while mapped, done after the unmap",
        WORDS / 2
    );
}

/// Part 2, pong: map, check, reply, unmap, notify.
fn grant_map_pong(ctx: &Ctx) {
    wait_rx(ctx, ctx.rounds + 1, "ping's grant");
    let at = ctx.window;
    let m = match grant::map(ctx.peer_dom, MAP_REF, at, GNTMAP_HOST_MAP) {
        Ok(m) => m,
        Err(e) => fail(
            ctx.role,
            format_args!(
                "mapping ref {MAP_REF} of domain {} at {at:#x}: {e}",
                ctx.peer_dom
            ),
        ),
    };
    for i in 0..WORDS / 2 {
        // SAFETY: the grant is mapped at `at` (the hypervisor wrote the L1 entry), a
        // page this kernel uses for nothing else; volatile raw-pointer reads.
        let v = unsafe { core::ptr::read_volatile(word_ptr(at, i)) };
        if v != PING_WORD | i as u64 {
            fail(
                ctx.role,
                format_args!("grant map: word {i} of ping's page is {v:#x}"),
            );
        }
    }
    for i in WORDS / 2..WORDS {
        // SAFETY: as above; the mapping is writable.
        unsafe { core::ptr::write_volatile(word_ptr(at, i), PONG_WORD | i as u64) };
    }
    // Ping checks that it cannot revoke the grant while it is mapped.
    send(ctx);
    wait_rx(ctx, ctx.rounds + 2, "ping's revoke attempt");
    // SAFETY: nothing refers to the mapping any more.
    if let Err(e) = unsafe { grant::unmap(m.handle, at) } {
        fail(ctx.role, format_args!("unmapping handle {}: {e}", m.handle));
    }
    send(ctx);
    println!(
        "demo pong: grant map ok: mapped ref {MAP_REF} of domain {} at {at:#x} (window slot {:#x}), pattern checked, reply written, unmapped",
        ctx.peer_dom, m.dev_bus_addr
    );
}

/// The byte at offset `i` of part 3's page.
fn copy_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) + 3) as u8
}

/// Part 3, ping: grant read-only, notify, wait, revoke.
fn grant_copy_ping(ctx: &Ctx) {
    let base = COPY_PAGE.addr();
    for i in 0..WORDS {
        let w = u64::from_le_bytes(core::array::from_fn(|b| copy_byte(i * 8 + b)));
        // SAFETY: COPY_PAGE is this kernel's page, not granted yet.
        unsafe { core::ptr::write_volatile(word_ptr(base, i), w) };
    }
    // SAFETY: read-only grant of a page accessed only through raw pointers.
    if let Err(e) = unsafe {
        ctx.table
            .grant_access(COPY_REF, ctx.peer_dom, base / PAGE_SIZE, true)
    } {
        fail(ctx.role, format_args!("granting ref {COPY_REF}: {e}"));
    }
    send(ctx);
    wait_rx(ctx, ctx.rounds + 3, "pong's grant-copy reply");
    if let Err(e) = ctx.table.revoke(COPY_REF) {
        fail(ctx.role, format_args!("revoking ref {COPY_REF}: {e}"));
    }
    println!("demo ping: grant copy ok: pong copied ref {COPY_REF}; revoked");
}

/// Part 3, pong: copy ping's page into COPY_PAGE, check it, notify.
fn grant_copy_pong(ctx: &Ctx) {
    wait_rx(ctx, ctx.rounds + 3, "ping's read-only grant");
    let base = COPY_PAGE.addr();
    let mut op = [GnttabCopy {
        source: grant::gref_ptr(ctx.peer_dom, COPY_REF, 0),
        dest: grant::local_ptr(base / PAGE_SIZE, 0),
        len: PAGE_SIZE as u16,
        flags: GNTCOPY_SOURCE_GREF,
        ..Default::default()
    }];
    // SAFETY: the destination is COPY_PAGE, which is only accessed through raw
    // pointers and is used for nothing else.
    let r = unsafe { grant::copy(&mut op) }.and_then(|()| grant::copy_status(&op[0]));
    if let Err(e) = r {
        fail(
            ctx.role,
            format_args!(
                "GNTTABOP_COPY of ref {COPY_REF} of domain {}: {e}",
                ctx.peer_dom
            ),
        );
    }
    for i in 0..WORDS {
        let want = u64::from_le_bytes(core::array::from_fn(|b| copy_byte(i * 8 + b)));
        // SAFETY: as above.
        let v = unsafe { core::ptr::read_volatile(word_ptr(base, i)) };
        if v != want {
            fail(
                ctx.role,
                format_args!("grant copy: word {i} is {v:#x}, want {want:#x}"),
            );
        }
    }
    send(ctx);
    println!(
        "demo pong: grant copy ok: {} bytes copied from ref {COPY_REF} of domain {} and checked",
        PAGE_SIZE, ctx.peer_dom
    );
}

/// Part 4: a 10 ms tick re-armed from the handler; 5 ticks awaited in SCHEDOP_POLL.
fn ticks(ctx: &Ctx) {
    let name = ctx.role.name();
    TIMER_MODE.store(1, Ordering::Release);
    let first = match TIMER.start(TICK_NS) {
        Ok(t) => t,
        Err(e) => fail(ctx.role, format_args!("starting the periodic timer: {e}")),
    };
    let deadline = first + 100 * TICK_NS;
    let done = sched::poll_until(&[ctx.timer_port], deadline, || {
        TICK_COUNT.load(Ordering::Acquire) >= TICKS as u64
    });
    let _ = TIMER.stop();
    match done {
        Ok(true) => {}
        Ok(false) => fail(
            ctx.role,
            format_args!(
                "timer: {} of {TICKS} ticks after {} ms",
                TICK_COUNT.load(Ordering::Acquire),
                100 * TICK_NS / 1_000_000
            ),
        ),
        Err(e) => fail(ctx.role, format_args!("SCHEDOP_POLL: {e}")),
    }
    let mut prev = 0;
    for i in 0..TICKS {
        let at = TICK_AT[i].load(Ordering::Acquire);
        let due = TICK_DUE[i].load(Ordering::Acquire);
        if at < due || due <= prev {
            fail(
                ctx.role,
                format_args!("timer: tick {} at {at} ns, due {due} ns", i + 1),
            );
        }
        prev = due;
        println!(
            "demo {name}:   tick {} at {} ns (due {} ns, {} us late)",
            i + 1,
            at,
            due,
            (at - due) / 1000
        );
    }
    println!(
        "demo {name}: timer ok: {TICKS} ticks every {} ms ({} missed deadlines)",
        TICK_NS / 1_000_000,
        TIMER.missed()
    );
}
