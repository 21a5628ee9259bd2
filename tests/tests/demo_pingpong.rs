//! The demo kernel's `role=ping` / `role=pong` on real KVM: two connected domains
//! exercising the guest SDK's event channels (IPI, loopback and interdomain ports,
//! masking, status, close), upcall handler, block and poll, grant tables (map, unmap,
//! copy, revoke refused while mapped) and periodic timer
//! (guest-kernel-demo/src/pingpong.rs).

use tests::{demo_kernel, kvm_available, run_domains_of, DomSpec, GuestRun};

/// Runs demo domains with these (name, command line) pairs, connecting the pairs of
/// indices in `connect`; domain ids 1, 2, ... in order.
fn run_demo(doms: &[(&'static str, &str)], connect: &[(usize, usize)]) -> Vec<GuestRun> {
    let specs: Vec<DomSpec> = doms.iter().map(|(n, c)| DomSpec::new(n, *c)).collect();
    run_domains_of(demo_kernel(), &specs, connect)
}

/// The ticks a role printed: (at, due) in ns.
fn ticks(run: &GuestRun) -> Vec<(u64, u64)> {
    run.console
        .lines()
        .filter(|l| l.contains("  tick "))
        .map(|l| {
            let num = |key: &str| -> u64 {
                let rest = &l[l.find(key).expect("tick field") + key.len()..];
                rest.split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
                    .unwrap_or_else(|| panic!("bad tick line {l:?}"))
            };
            (num(" at "), num("(due "))
        })
        .collect()
}

#[test]
fn ping_and_pong_pass_every_part() {
    if !kvm_available() {
        return;
    }
    let rounds = 40;
    let runs = run_demo(
        &[
            ("ping", &format!("role=ping peer=pong rounds={rounds}")),
            ("pong", &format!("role=pong peer=ping rounds={rounds}")),
        ],
        &[(0, 1)],
    );
    let (ping, pong) = (&runs[0], &runs[1]);
    for run in [ping, pong] {
        run.assert_poweroff(0);
        assert!(!run.console.contains("FAILED"), "{}", run.console);
    }

    // Each side found the other on its command line.
    ping.line_with("demo ping: domain 1, peer pong (domain 2) on port");
    pong.line_with("demo pong: domain 2, peer ping (domain 1) on port");

    // Part 0: each side's local event channels, wall clock and grant table size.
    for run in [ping, pong] {
        let l = run.line_with("local event channels ok: IPI upcall, mask/unmask, loopback pair");
        assert!(l.ends_with("grant table 4 frames"), "{l}");
    }

    // Part 1: every round answered; a plausible average round trip.
    let l = ping.line_with("demo ping: ping-pong ok:");
    assert!(l.contains(&format!("{rounds} rounds")), "{l}");
    let avg: u64 = l
        .split("average round trip ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no average in {l:?}"));
    assert!(
        avg > 0 && avg < 1_000_000_000,
        "average round trip {avg} ns"
    );
    pong.line_with(&format!("demo pong: ping-pong ok: answered {rounds} pings"));

    // Part 2: pong mapped ref 8 in its grant window; ping saw the grant in use and
    // could not revoke it until pong unmapped it, and saw pong's reply.
    pong.line_with("demo pong: grant map ok: mapped ref 8 of domain 1");
    ping.line_with(
        "demo ping: grant map ok: pong read ref 8 and wrote its reply (256 words checked); \
         revoke refused while mapped, done after the unmap",
    );
    // Part 3: copy through a read-only grant.
    pong.line_with("demo pong: grant copy ok: 4096 bytes copied from ref 9 of domain 1");
    ping.line_with("demo ping: grant copy ok: pong copied ref 9; revoked");

    // Part 4: five ticks, 10 ms apart, never early.
    for run in [ping, pong] {
        run.line_with("timer ok: 5 ticks every 10 ms");
        let t = ticks(run);
        assert_eq!(t.len(), 5, "{}", run.console);
        for (i, (at, due)) in t.iter().enumerate() {
            assert!(at >= due, "tick {i} early: {t:?}");
            if i > 0 {
                assert!(
                    due - t[i - 1].1 >= 10_000_000,
                    "ticks closer than 10 ms: {t:?}"
                );
            }
        }
        let l = run.line_with("all parts passed");
        // The upcall interrupt handler ran (the ping-pong waits take upcalls).
        let upcalls: u64 = l
            .split('(')
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no upcall count in {l:?}"));
        assert!(upcalls >= 1, "{l}");
    }
}

#[test]
fn an_unconnected_role_fails_clearly() {
    if !kvm_available() {
        return;
    }
    let runs = run_demo(&[("ping", "role=ping peer=pong")], &[]);
    runs[0].assert_poweroff(1);
    runs[0]
        .line_with("demo ping: FAILED: no valid evtchn.pong= and domid.pong= on the command line");
}

#[test]
fn mismatched_rounds_fail_instead_of_hanging() {
    if !kvm_available() {
        return;
    }
    // Pong answers 3 pings, then takes ping's 4th as the grant notification and finds
    // no grant: it fails. Ping's 4th ping goes unanswered; its watchdog sees that
    // pong's end of the channel closed (pong died) and fails too.
    let runs = run_demo(
        &[
            ("ping", "role=ping peer=pong rounds=5"),
            ("pong", "role=pong peer=ping rounds=3"),
        ],
        &[(0, 1)],
    );
    runs[1].assert_poweroff(1);
    runs[1].line_with("demo pong: FAILED: mapping ref 8 of domain 1");
    runs[0].assert_poweroff(1);
    runs[0].line_with("demo ping: FAILED: the peer is gone while waiting for pong's reply");
}
