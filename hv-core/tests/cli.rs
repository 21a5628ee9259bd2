//! The `hv` binary: exit codes, messages and output, on real KVM.

use std::process::{Command, Output};

fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("HV_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("SKIPPING KVM TEST (HV_SKIP_KVM=1): /dev/kvm is not usable: {e}");
            false
        }
        Err(e) => {
            panic!("/dev/kvm is not usable ({e}); set HV_SKIP_KVM=1 to skip KVM tests explicitly")
        }
    }
}

fn hv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hv"))
        .args(args)
        .output()
        .expect("run hv")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_demo_prints_banner_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["run"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("hv demo kernel"), "{stdout}");
    assert!(stdout.contains("ABI v1.0"), "{stdout}");
}

#[test]
fn guest_exit_code_becomes_process_exit_code() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["run", "--cmdline", "exit=7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}

#[test]
fn crash_exits_100_with_a_report() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["run", "--cmdline", "panic"]);
    assert_eq!(out.status.code(), Some(100));
    let err = text(&out.stderr);
    assert!(err.contains("crashed") && err.contains("crash"), "{err}");
}

#[test]
fn stats_are_printed_on_request() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["run", "--stats"]);
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("exits by reason") && err.contains("hypercall"),
        "{err}"
    );
    assert!(
        err.contains("console_io") && err.contains("sched_op"),
        "{err}"
    );
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let out = hv(&["run", "/nonexistent/kernel.elf"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read kernel"));

    let out = hv(&["run", "--mem", "12X"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid size"));

    let out = hv(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));

    let out = hv(&["bench", "no_such_bench"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown benchmark"));

    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("hv-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.elf");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let out = hv(&["run", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a valid ELF"),
        "{}",
        text(&out.stderr)
    );

    let out = hv(&["run", "--vcpus", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("vCPUs"), "{}", text(&out.stderr));

    let out = hv(&["run", "--mem", "1M"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn version_and_help() {
    let out = hv(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("ABI 1.0"));
    let out = hv(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("Examples"));
}

#[test]
fn bench_json_reports_every_result_with_ratios() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["bench", "--json"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let results = v["results"].as_array().expect("results array");
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "exit_floor",
            "null_hypercall",
            "kvm_create_floor",
            "domain_boot",
            "mmu_trapped_write",
            "mmu_batch_512",
            "irq_floor",
            "memcpy_4k"
        ]
    );
    for r in results {
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["unit"].is_string());
    }
    let by = |n: &str| results.iter().find(|r| r["name"] == n).unwrap();
    let nh = by("null_hypercall");
    assert_eq!(nh["vs"], "exit_floor");
    let expect = nh["value"].as_f64().unwrap() / by("exit_floor")["value"].as_f64().unwrap();
    assert!((nh["ratio"].as_f64().unwrap() - expect).abs() < 1e-9);
    assert_eq!(by("domain_boot")["vs"], "kvm_create_floor");
    assert_eq!(by("mmu_batch_512")["vs"], "mmu_trapped_write");
    assert!(by("exit_floor")["vs"].is_null());
    assert_eq!(by("irq_floor")["unit"], "us");
    assert_eq!(by("memcpy_4k")["unit"], "GB/s");
}
