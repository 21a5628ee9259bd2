//! A soak of the hostile guest (`scenario=soak`: random hypercalls with biased
//! arguments from ring 0 and ring 3) beside well-behaved neighbours: two domains doing
//! an event-channel ping-pong. Bounded (the number of calls, and the test library's
//! run timeout). hv must never fail: each hostile domain ends by powering off or as a
//! guest crash (its own doing), never a host fault or an hv error, and the neighbours
//! complete their work as if it were not there.

use hv_core::hypervisor::Hypervisor;
use hv_core::{ConsoleSink, DomainConfig, KernelImage, Outcome};
use tests::{kvm, kvm_available, run_bounded, TEST_GUEST};

fn soak_round(seed: u64, calls: u64) {
    let image = KernelImage::from_elf(TEST_GUEST).expect("test guest");
    let mut hv = Hypervisor::new(kvm());
    let mut bufs = Vec::new();
    let mut domain = |hv: &mut Hypervisor, name: &str, domid: u32, cmdline: String, user: bool| {
        let (sink, buf) = ConsoleSink::capture();
        bufs.push(buf);
        hv.create_domain(
            DomainConfig {
                name: name.into(),
                domid,
                cmdline,
                console: sink,
                allow_user_hypercalls: user,
                ..DomainConfig::default()
            },
            &image,
        )
        .expect("create domain")
    };
    let ping = domain(
        &mut hv,
        "ping",
        1,
        "scenario=evtchn-ping peer=pong rounds=300".into(),
        false,
    );
    let pong = domain(
        &mut hv,
        "pong",
        2,
        "scenario=evtchn-pong peer=ping rounds=300".into(),
        false,
    );
    for (i, s) in (0u32..).zip([seed, seed + 1]) {
        let ring3 = i == 1;
        domain(
            &mut hv,
            if ring3 { "soak3" } else { "soak0" },
            3 + i,
            format!(
                "scenario=soak seed={s} calls={calls} ring3={}",
                u8::from(ring3)
            ),
            ring3,
        );
    }
    hv.connect(ping, pong).expect("connect");
    let results = run_bounded(hv, &format!("soak seed {seed}"), &bufs);
    let consoles: Vec<String> = bufs
        .iter()
        .map(|b| String::from_utf8_lossy(&b.lock().expect("console")).into_owned())
        .collect();
    for (r, console) in results.iter().zip(&consoles) {
        let report = r
            .report
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: hv failed: {e}\n{console}", r.name));
        match r.name.as_str() {
            "ping" | "pong" => {
                assert!(
                    matches!(report.outcome, Outcome::Poweroff { code: 0 }),
                    "neighbour {} disturbed: {}\n{console}",
                    r.name,
                    report.outcome
                );
                assert!(console.contains("rounds_done=300"), "{console}");
            }
            _ => {
                assert!(
                    matches!(
                        report.outcome,
                        Outcome::Poweroff { code: 0 } | Outcome::Crash(_)
                    ),
                    "seed {seed}: {} ended as {} (an hv failure)\n{console}",
                    r.name,
                    report.outcome
                );
                eprintln!(
                    "soak seed {seed} {}: {} after {} ring-0 / {} ring-3 calls",
                    r.name,
                    report.outcome,
                    console
                        .lines()
                        .find_map(|l| l.strip_prefix("soak_ring0_calls="))
                        .unwrap_or("<calls>"),
                    console
                        .lines()
                        .find_map(|l| l
                            .split_whitespace()
                            .next()?
                            .strip_prefix("soak_ring3_calls="))
                        .unwrap_or("-"),
                );
            }
        }
    }
}

#[test]
fn hostile_guests_beside_well_behaved_neighbours() {
    if !kvm_available() {
        return;
    }
    for seed in [1, 17, 4242, 90001] {
        soak_round(seed, 1500);
    }
}
