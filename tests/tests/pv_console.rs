//! The PV console back-end on real KVM (SPEC.md §8.9.4), driven by the test guest's
//! `pvcons` scenario: output through the ring (more than the ring holds, and a broken
//! `out_prod`), output to a file, input from a file echoed back by the guest. Input from
//! hv's standard input and the `[name]` prefix on standard output are tested through the
//! `hv` binary (hv-core/tests/cli.rs).

use std::path::PathBuf;

use hv_core::devices::{ConsoleInput, ConsoleSpec};
use hv_core::DomainConfig;
use tests::{kvm_available, scenario_with};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("hv-pvcons-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The console text the `pvcons` scenario writes through the ring, in order.
fn ring_output() -> String {
    let mut s = String::from("pv console: hello\n");
    for i in 0..100 {
        s += &format!("pv line {i:03} .................\n");
    }
    s += "pv console: after resync\n";
    s
}

/// The lines of `console` that the ring carried (they start with `pv `).
fn ring_lines(console: &str) -> String {
    console
        .lines()
        .filter(|l| l.starts_with("pv "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn output_through_the_ring_reaches_the_console_in_order() {
    if !kvm_available() {
        return;
    }
    let run = scenario_with("pvcons", "", DomainConfig::default());
    run.assert_poweroff(0);
    // The console port is bound to hv before entry: interdomain with DOMID_HV.
    assert!(run.int("cons_port") > 0);
    assert_eq!(run.int("cons_port_status"), 2);
    assert_eq!(run.int("cons_port_remote"), 0x7FF2);
    assert_eq!(run.int("hello_drained"), 1);
    assert_eq!(run.int("resync"), 1);
    assert_eq!(run.int("echoed"), 0);
    // All 3000+ bytes, in order, and nothing of the 5000 bytes the broken out_prod
    // claimed (the ring's stale contents would show as repeated lines).
    assert_eq!(
        ring_lines(&run.console),
        ring_output(),
        "console:\n{}",
        run.console
    );
}

#[test]
fn output_goes_to_a_file_and_input_from_a_file_is_echoed() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("file");
    let input = dir.0.join("in.txt");
    let output = dir.0.join("out.txt");
    // More than the 1024-byte input ring holds: hv waits for the guest to consume.
    let mut text = String::from("ping 123\n");
    for i in 0..20 {
        text += &format!("line {i:02} {}\n", "x".repeat(90));
    }
    std::fs::write(&input, &text).unwrap();
    let config = DomainConfig {
        console_spec: ConsoleSpec {
            output: Some(output.clone()),
            input: ConsoleInput::File(input),
        },
        ..DomainConfig::default()
    };
    let run = scenario_with("pvcons", "echo=21", config);
    run.assert_poweroff(0);
    // Everything went to the file (the early console's lines too), nothing elsewhere.
    assert!(run.console.is_empty(), "{}", run.console);
    let out = std::fs::read_to_string(&output).unwrap();
    assert_eq!(ring_lines(&out), ring_output(), "{out}");
    assert!(out.contains("echoed=21"), "{out}");
    let echoed: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("echo: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(echoed, text);
}
