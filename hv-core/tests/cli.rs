//! The `hv` binary: exit codes, messages and output, on real KVM.

use std::process::{Command, Output};

mod common;
use common::{hv, kvm_available, test_guest, text};

#[test]
fn run_demo_prints_banner_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let out = hv(&["run"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("hv demo kernel"), "{stdout}");
    let abi = format!("ABI v{}.{}", hv_abi::ABI_MAJOR, hv_abi::ABI_MINOR);
    assert!(stdout.contains(&abi), "{stdout}");
}

/// Runs the embedded demo with `args` after `hv run`; asserts it powered off with 0
/// and returns its standard output.
fn demo_ok(args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let out = hv(&all);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "hv {all:?}\nstdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("demo: done, powering off with code 0"),
        "{stdout}"
    );
    stdout
}

#[test]
fn demo_runs_on_several_vcpus_and_uses_them() {
    if !kvm_available() {
        return;
    }
    // The demo unpins the boot tables while vCPUs 1.. are still down (hv used to count
    // the boot root as their CR3 and refused: "unpinning the boot tables failed",
    // exit 100), then starts them on its own address space; each reads its heap word
    // through the heap's virtual address and adds it to a sum that vCPU 0 checks.
    for n in [2u64, 4] {
        let stdout = demo_ok(&["--vcpus", &n.to_string()]);
        assert!(
            stdout.contains(&format!("domain 0: {n} vCPU(s)")),
            "{stdout}"
        );
        assert!(stdout.contains("unpinned the boot tables"), "{stdout}");
        let root = stdout
            .lines()
            .find_map(|l| l.split("all on root ").nth(1))
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("no smp summary: {stdout}"))
            .to_string();
        for id in 1..n {
            let word = 0x4845_4150_0000u64 + id;
            let line = format!(
                "  smp: vCPU {id} up on root {root}, read heap word {word:#x} at {:#x}",
                0x2000_0000 + id * 4096
            );
            assert!(
                stdout.lines().any(|l| l == line),
                "{line:?} missing: {stdout}"
            );
        }
        let want: u64 = (1..n).map(|id| 0x4845_4150_0000 + id).sum();
        let summary = format!(
            "  smp: {} secondary vCPU(s) started on the demo's address space: sum of their heap words {want:#x} (expected {want:#x}), replies ok, all on root {root}: ok",
            n - 1
        );
        assert!(
            stdout.lines().any(|l| l == summary),
            "{summary:?} missing: {stdout}"
        );
    }
}

#[test]
fn demo_runs_with_big_ram() {
    if !kvm_available() {
        return;
    }
    // 8G crashed the demo ("too many tables for the demo", exit 100): its address
    // space maps the whole page-table pool, which 4 KiB boot pages made 17 MiB long.
    for mem in ["8G", "64G"] {
        let stdout = demo_ok(&["--mem", mem, "--vcpus", "2"]);
        let gib: u64 = mem.trim_end_matches('G').parse().unwrap();
        assert!(
            stdout.contains(&format!("{} MiB RAM", gib << 10)),
            "{stdout}"
        );
        for part in [
            "unpinned the boot tables",
            "pv mmu: heap of 64 pages at 0x20000000: ok",
            "pv mmu: remapped its data page; ring-3 task (exit vector 6) read 0x2222222222222222",
            "smp: 1 secondary vCPU(s) started",
        ] {
            assert!(stdout.contains(part), "{mem}: {part:?} missing: {stdout}");
        }
    }
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
    // The report is printed once: no WARN log line repeats it.
    assert!(!err.contains("WARN"), "{err}");
    assert_eq!(err.matches("reported a crash").count(), 1, "{err}");
}

#[test]
fn debug_logs_name_each_failing_hypercall() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hv"))
        .arg("run")
        .arg(test_guest())
        .args(["--cmdline", "scenario=hypercalls"])
        .env("RUST_LOG", "hv_core=debug")
        .output()
        .expect("run hv");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = text(&out.stderr);
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hypercall failed"))
        .collect();
    assert!(
        failed
            .iter()
            .any(|l| l.contains("op=\"Version\"") && l.contains("errno=\"EINVAL\"")),
        "{log}"
    );
    assert!(
        failed
            .iter()
            .any(|l| l.contains("op=\"unknown\"") && l.contains("errno=\"ENOSYS\"")),
        "{log}"
    );
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

    // The RAM rule is checked before the kernel-fit rule (a 1-byte domain used to be
    // refused for a segment that does not fit).
    for mem in ["1M", "1"] {
        let out = hv(&["run", "--mem", mem]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains("bytes of RAM: it must be a multiple of 4 KiB"),
            "{}",
            text(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn version_and_help() {
    let out = hv(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    let abi = format!("ABI {}.{}", hv_abi::ABI_MAJOR, hv_abi::ABI_MINOR);
    assert!(text(&out.stdout).contains(&abi), "{}", text(&out.stdout));
    let out = hv(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("Examples"));
    // `hv bench --help` names every row, `hv run --help` the RAM range.
    let bench_help = text(&hv(&["bench", "--help"]).stdout).replace(['\n', ' '], "");
    for name in hv_core::bench::ALL {
        assert!(
            bench_help.contains(name),
            "{name} missing from hv bench --help"
        );
    }
    assert!(text(&hv(&["run", "--help"]).stdout).contains("from 2M to 256G"));
    // Shell completions (bash: syntax-checked by bash itself) and the manual page.
    let out = hv(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    let script = std::env::temp_dir().join(format!("hv-completion-{}.bash", std::process::id()));
    std::fs::write(&script, &out.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    let _ = std::fs::remove_file(&script);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&out.stdout).contains("--console-input"));
    for shell in ["zsh", "fish"] {
        assert_eq!(hv(&["completions", shell]).status.code(), Some(0));
    }
    let man = text(&hv(&["man"]).stdout);
    assert!(
        man.starts_with(".ie") && man.contains(".TH hv 1") && man.contains("bench"),
        "{man}"
    );
    // `hv --version` says the same as `hv version`.
    let long = hv(&["--version"]);
    assert_eq!(long.status.code(), Some(0));
    assert_eq!(text(&long.stdout), text(&hv(&["version"]).stdout));
    // Logs to a pipe carry no ANSI colour codes.
    let out = Command::new(env!("CARGO_BIN_EXE_hv"))
        .args(["run", "/nonexistent/kernel.elf"])
        .env("RUST_LOG", "debug")
        .output()
        .expect("run hv");
    let log = text(&out.stderr);
    assert!(log.contains("RLIMIT_NOFILE"), "no debug line: {log}");
    assert!(!log.contains('\x1b'), "{log}");
}

#[test]
fn bench_json_reports_every_result_with_ratios() {
    if !kvm_available() {
        return;
    }
    // 20 density domains keep the run short (`hv bench` boots 1000 by default).
    let out = hv(&["bench", "--json", "--domains", "20"]);
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
            "evtchn_pingpong",
            "evtchn_pingpong_poll",
            "memcpy_4k",
            "grant_copy_4k",
            "grant_map_unmap",
            "blk_host_seq_write",
            "blk_passthrough_seq_write",
            "blk_pv_seq_write",
            "blk_emulated_seq_write",
            "blk_host_4k_iops",
            "blk_pv_4k_iops",
            "density_boot_rate",
            "density_overhead",
            "density_rss",
            "density_touched",
            "density_idle_cpu"
        ]
    );
    for r in results {
        let v = r["value"].as_f64().unwrap();
        // Memory and CPU figures of only 20 domains may read 0 (or below, with other
        // processes freeing memory meanwhile): finite is all that is certain.
        if r["name"].as_str().unwrap().starts_with("density_") {
            assert!(v.is_finite(), "{r}");
        } else {
            assert!(v > 0.0, "{r}");
        }
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
    assert_eq!(by("evtchn_pingpong")["vs"], "irq_floor");
    assert_eq!(by("evtchn_pingpong_poll")["vs"], "irq_floor");
    assert_eq!(by("memcpy_4k")["unit"], "GB/s");
    assert_eq!(by("grant_copy_4k")["vs"], "memcpy_4k");
    assert_eq!(by("density_overhead")["unit"], "KiB/domain");
    assert!(by("blk_host_seq_write")["vs"].is_null());
    assert_eq!(by("blk_passthrough_seq_write")["vs"], "blk_host_seq_write");
    assert_eq!(by("blk_pv_seq_write")["vs"], "blk_passthrough_seq_write");
    assert_eq!(by("blk_emulated_seq_write")["vs"], "blk_pv_seq_write");
    assert_eq!(by("blk_pv_4k_iops")["vs"], "blk_host_4k_iops");
    assert_eq!(by("blk_pv_seq_write")["unit"], "MB/s");
    assert_eq!(by("blk_pv_4k_iops")["unit"], "IOPS");
}

// ---- hv run --config ----

/// A fresh directory for one test's configuration files.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("hv-cli-config-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Writes `name` in the directory and returns its path as a string.
    fn write(&self, name: &str, contents: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write config");
        p.to_str().expect("UTF-8 temp path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `[[domain]]` table running the test guest with `cmdline`.
fn guest_domain(name: &str, cmdline: &str) -> String {
    format!(
        "[[domain]]\nname = \"{name}\"\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n",
        test_guest().display()
    )
}

/// The summary line of domain `name` (stderr lines start with the name).
fn summary_line<'a>(stderr: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name} ");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 1, "one summary line for {name}: {stderr}");
    lines[0]
}

#[test]
fn config_runs_connected_domains_with_prefixed_output_and_a_summary() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("connected");
    // A relative kernel path is relative to the configuration file's directory.
    std::fs::copy(test_guest(), dir.0.join("guest.elf")).expect("copy test guest");
    let cfg = dir.write(
        "two.toml",
        "[[domain]]\nname = \"left\"\nkernel = \"guest.elf\"\ncmdline = \"scenario=cmdline\"\n\
         [[domain]]\nname = \"right-2\"\nkernel = \"guest.elf\"\ncmdline = \"scenario=cmdline x=1\"\n\
         domid = 7\nmemory = \"16M\"\nvcpus = 2\n\
         [[domain]]\nname = \"lone\"\nkernel = \"guest.elf\"\ncmdline = \"scenario=cmdline\"\n\
         [[connection]]\nbetween = [\"left\", \"right-2\"]\n",
    );
    let out = hv(&["run", "--config", &cfg]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let cmdline_of = |name: &str| {
        let prefix = format!("[{name}] cmdline=");
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        lines[0][prefix.len()..].to_string()
    };
    // Each side is told the other's port and id; the unconnected domain nothing.
    let left: Vec<String> = cmdline_of("left").split(' ').map(String::from).collect();
    assert_eq!(left[0], "scenario=cmdline");
    assert!(left[1].starts_with("evtchn.right-2="), "{left:?}");
    assert!(left[1]["evtchn.right-2=".len()..].parse::<u32>().unwrap() > 0);
    assert_eq!(left[2..], ["domid.right-2=7"]);
    let right: Vec<String> = cmdline_of("right-2").split(' ').map(String::from).collect();
    assert_eq!(right[..2], ["scenario=cmdline", "x=1"]);
    assert!(right[2].starts_with("evtchn.left="), "{right:?}");
    // left got the lowest free id, 1; lone the next, 2.
    assert_eq!(right[3..], ["domid.left=1"]);
    assert_eq!(cmdline_of("lone"), "scenario=cmdline");
    // Every stdout line carries a domain prefix.
    assert!(stdout.lines().all(|l| l.starts_with('[')), "{stdout}");

    for (name, id) in [("left", 1), ("right-2", 7), ("lone", 2)] {
        let line = summary_line(&stderr, name);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], id.to_string(), "{line}");
        assert!(
            cols[2].parse::<f64>().unwrap() > 0.0 && cols[3] == "ms",
            "{line}"
        );
        assert!(line.ends_with("powered off with code 0"), "{line}");
    }
}

#[test]
fn config_crash_of_one_domain_leaves_the_other_running_and_exits_100() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("crash");
    let cfg = dir.write(
        "crash.toml",
        &[
            // A crash outranks a non-zero poweroff code earlier in the file.
            guest_domain("seven", "scenario=exit code=7"),
            guest_domain("crasher", "scenario=panic"),
            guest_domain("worker", "scenario=mmu"),
            "[[connection]]\nbetween = [\"worker\", \"crasher\"]\n".into(),
        ]
        .concat(),
    );
    let out = hv(&["run", "--config", &cfg, "--stats"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(100), "{stdout}\n{stderr}");
    assert!(stdout.contains("[crasher] panic: boom"), "{stdout}");
    // The worker ran its whole scenario (the last check it prints is mc4) and powered
    // off normally, whatever the crasher did.
    assert!(stdout.contains("[worker] mc4=-38"), "{stdout}");
    assert!(stderr.contains("hv: domain crasher crashed"), "{stderr}");
    assert!(
        summary_line(&stderr, "crasher").contains("crashed: the guest reported a crash"),
        "{stderr}"
    );
    assert!(
        summary_line(&stderr, "worker").ends_with("powered off with code 0"),
        "{stderr}"
    );
    // --stats: each domain's exit statistics.
    assert!(
        stderr.contains("domain crasher (id 2): crashed")
            && stderr.contains("domain worker (id 3)"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("exits by reason").count(), 3, "{stderr}");
    assert!(
        summary_line(&stderr, "seven").ends_with("powered off with code 7"),
        "{stderr}"
    );
}

#[test]
fn config_exit_status_is_the_first_nonzero_poweroff_code() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("codes");
    let cfg = dir.write(
        "codes.toml",
        &[
            guest_domain("zero", "scenario=hello"),
            guest_domain("five", "scenario=exit code=5"),
            guest_domain("three", "scenario=exit code=3"),
            // The embedded demo kernel, when no kernel is given.
            "[[domain]]\nname = \"demo\"\ncmdline = \"exit=4\"\n".into(),
        ]
        .concat(),
    );
    let out = hv(&["run", "--config", &cfg]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{stdout}\n{stderr}");
    assert!(stdout.contains("[zero] test-guest: hello"), "{stdout}");
    assert!(stdout.contains("[demo] hv demo kernel"), "{stdout}");
    for (name, code) in [("zero", 0), ("five", 5), ("three", 3), ("demo", 4)] {
        let line = summary_line(&stderr, name);
        assert!(
            line.ends_with(&format!("powered off with code {code}")),
            "{line}"
        );
    }
}

#[test]
fn config_errors_exit_2_before_any_domain_runs() {
    let dir = TempDir::new("errors");
    let guest = test_guest().display().to_string();
    std::fs::write(dir.0.join("junk.elf"), b"this is not a kernel").unwrap();
    let two = |extra: &str| {
        format!(
            "[[domain]]\nname = \"a\"\nkernel = \"{guest}\"\ncmdline = \"scenario=hello\"\n\
             [[domain]]\nname = \"b\"\nkernel = \"{guest}\"\ncmdline = \"scenario=hello\"\n{extra}"
        )
    };
    let many: String = (0..=4096)
        .map(|i| format!("[[domain]]\nname = \"d{i}\"\n"))
        .collect();
    let cases: Vec<(String, &str)> = vec![
        (two("memroy = \"1M\"\n"), "unknown field `memroy`"),
        (
            two("[[domain]]\nname = \"a\"\n"),
            "domain \"a\" is defined twice",
        ),
        (
            "[[domain]]\nname = \"a\"\ndomid = 3\n[[domain]]\nname = \"b\"\ndomid = 3\n".into(),
            "domains \"a\" and \"b\" both have domain id 3",
        ),
        (
            "[[domain]]\nname = \"a\"\ndomid = 32752\n".into(),
            "domain \"a\": domid: 32752 is out of range",
        ),
        (
            two("[[connection]]\nbetween = [\"a\", \"c\"]\n"),
            "connection #1: no domain is named \"c\"",
        ),
        (
            two("[[connection]]\nbetween = [\"b\", \"b\"]\n"),
            "connection #1: domain \"b\" cannot be connected to itself",
        ),
        (many, "4097 domains; a configuration has at most 4096"),
        (
            "[[domain]]\nname = \"a\"\nmemory = \"12X\"\n".into(),
            "domain \"a\": memory: invalid size \"12X\"",
        ),
        (
            "[[domain]]\nname = \"a\"\nmemory = \"1M\"\n".into(),
            "domain \"a\": memory: 1048576 bytes",
        ),
        (
            "[[domain]]\nname = \"a\"\nvcpus = 0\n".into(),
            "domain \"a\": vcpus: 0",
        ),
        (
            "[[domain]]\nname = \"bad name\"\n".into(),
            "domain #1: invalid name \"bad name\"",
        ),
        (
            "[[domain]]\nname = \"a\"\nkernel = \"missing.elf\"\n".into(),
            "domain \"a\": cannot read kernel",
        ),
        (
            "[[domain]]\nname = \"a\"\nkernel = \"junk.elf\"\n".into(),
            "junk.elf refused: not a valid ELF",
        ),
        ("".into(), "no domains"),
        ("[[domain]\n".into(), "TOML parse error"),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let cfg = dir.write(&format!("bad{i}.toml"), config);
        let out = hv(&["run", "--config", &cfg]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{want}: {stderr}");
        // Named after the file, and nothing ran.
        assert!(stderr.starts_with(&format!("hv: {cfg}: ")), "{stderr}");
        assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
        assert!(stdout.is_empty(), "{stdout}");
    }

    let out = hv(&["run", "--config", "/nonexistent/hv.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read /nonexistent/hv.toml"),
        "{}",
        text(&out.stderr)
    );
    // --config replaces the single-domain options.
    let cfg = dir.write("ok.toml", &two(""));
    for extra in [
        &["k.elf"][..],
        &["--mem", "64M"],
        &["--vcpus", "2"],
        &["--cmdline", "x"],
    ] {
        let mut args = vec!["run", "--config", &cfg];
        args.extend_from_slice(extra);
        let out = hv(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(
            text(&out.stderr).contains("cannot be used with"),
            "{}",
            text(&out.stderr)
        );
    }
}

// ---- devices: disks, passthrough regions, the PV console (SPEC 8.9) ----

/// Runs hv with `args`, `input` on its standard input.
fn hv_with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hv"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hv");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("wait for hv")
}

#[test]
fn console_input_from_stdin_and_prefixed_output() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().display().to_string();
    // One domain: its console is hv's standard output, unprefixed.
    let out = hv_with_stdin(
        &[
            "run",
            &guest,
            "--cmdline",
            "scenario=pvcons echo=2",
            "--console-input",
            "-",
        ],
        b"hello stdin\nsecond line\n",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("\necho: hello stdin\necho: second line\n"),
        "{stdout}"
    );
    assert!(stdout.contains("pv console: hello\n"), "{stdout}");

    // With --config: each line with the domain's name; only one domain reads stdin.
    let dir = TempDir::new("console");
    let cfg = dir.write(
        "cons.toml",
        &format!(
            "{}[domain.console]\ninput = \"stdin\"\n{}",
            guest_domain("c1", "scenario=pvcons echo=1"),
            guest_domain("c2", "scenario=pvcons")
        ),
    );
    let out = hv_with_stdin(&["run", "--config", &cfg], b"to c1\n");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("[c1] echo: to c1\n"), "{stdout}");
    assert!(stdout.contains("[c1] pv console: hello\n"), "{stdout}");
    assert!(stdout.contains("[c2] pv line 099 ."), "{stdout}");
    assert!(stdout.contains("[c2] echoed=0\n"), "{stdout}");
    assert!(!stdout.contains("[c2] echo: "), "{stdout}");
}

#[test]
fn disks_and_console_files_from_the_command_line_and_a_config() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().display().to_string();
    let dir = TempDir::new("disks");
    let img = dir.0.join("d.img");
    let log = dir.0.join("console.log");
    let img_s = img.display().to_string();
    let out = hv(&[
        "run",
        &guest,
        "--cmdline",
        "scenario=blk",
        "--disk",
        &format!("{img_s},size=1M"),
        "--console-output",
        &log.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The console went to the file; the disk was created with the size asked for.
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(
        console.contains("readback=1") && console.contains("reconnect_data=1"),
        "{console}"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);

    // The same from a configuration file (relative paths), with the image now existing.
    let cfg = dir.write(
        "disk.toml",
        &format!(
            "{}[[domain.disk]]\npath = \"d.img\"\n",
            guest_domain("d", "scenario=blk")
        ),
    );
    let out = hv(&["run", "--config", &cfg]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("[d] write1=0 write11=0 flush=0"),
        "{stdout}"
    );
}

#[test]
fn device_errors_exit_2_before_any_domain_runs() {
    let dir = TempDir::new("device-errors");
    let guest = test_guest().display().to_string();
    std::fs::write(dir.0.join("odd.img"), [0u8; 700]).unwrap();
    std::fs::write(dir.0.join("ok.img"), [0u8; 4096]).unwrap();
    let dom = |name: &str, body: &str| format!("{}{body}", guest_domain(name, "scenario=hello"));
    let cases: Vec<(String, &str)> = vec![
        (
            dom("a", "[[domain.disk]]\npath = \"missing.img\"\n"),
            "domain \"a\": disk #1: ",
        ),
        (
            dom("a", "[[domain.disk]]\npath = \"odd.img\"\n"),
            "odd.img is 700 bytes",
        ),
        (
            dom("a", "[[domain.disk]]\npath = \"n.img\"\nsize = \"1000\"\n"),
            "size 1000 bytes",
        ),
        (
            dom("a", "[[domain.disk]]\npath = \"ok.img\"\nkind = \"nvme\"\n"),
            "kind \"nvme\"",
        ),
        (
            dom("a", "[[domain.disk]]\npath = \"ok.img\"\n")
                + &dom("b", "[[domain.disk]]\npath = \"ok.img\"\n"),
            "is used by domains \"a\" and \"b\"",
        ),
        (
            dom(
                "a",
                "[[domain.passthrough]]\npath = \"r.bin\"\nsize = \"2M\"\ncreate = true\n",
            ) + &dom(
                "b",
                "[[domain.passthrough]]\npath = \"r.bin\"\nsize = \"2M\"\ncreate = true\n",
            ),
            "given to both a and b",
        ),
        (
            dom("a", "[domain.console]\ninput = \"stdin\"\n")
                + &dom("b", "[domain.console]\ninput = \"stdin\"\n"),
            "both read standard input",
        ),
        (
            dom("a", "[domain.console]\ninput = \"missing.txt\"\n"),
            "console.input: cannot open",
        ),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let cfg = dir.write(&format!("bad{i}.toml"), config);
        let out = hv(&["run", "--config", &cfg]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{want}: {stderr}");
        assert!(stderr.starts_with(&format!("hv: {cfg}: ")), "{stderr}");
        assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
        assert!(stdout.is_empty(), "{stdout}");
        // Nothing was created.
        assert!(!dir.0.join("r.bin").exists() && !dir.0.join("n.img").exists());
    }
    let missing = dir.0.join("missing.img").display().to_string();
    let cli_cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--disk".into(), missing.clone()], "disk #1: "),
        (
            vec!["--disk".into(), format!("{missing},size=12X")],
            "invalid size",
        ),
        (
            vec!["--disk".into(), format!("{missing},fast")],
            "unknown option \"fast\"",
        ),
        (
            vec![
                "--passthrough".into(),
                dir.0.join("r.bin").display().to_string(),
            ],
            "no size",
        ),
        (
            vec!["--console-input".into(), missing.clone()],
            "console.input: cannot open",
        ),
    ];
    for (extra, want) in cli_cases {
        let mut args: Vec<&str> = vec!["run", &guest];
        args.extend(extra.iter().map(String::as_str));
        let out = hv(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
        assert!(text(&out.stdout).is_empty());
    }
}

// ---- several hv processes ----

/// A running `hv` (output piped), killed and reaped when dropped.
struct HvProcess(std::process::Child);

impl HvProcess {
    fn spawn(args: &[&str]) -> HvProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_hv"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run hv");
        HvProcess(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Panics with its output if the process has ended.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.0.try_wait().expect("try_wait") {
            let (mut out, mut err) = (String::new(), String::new());
            use std::io::Read;
            if let Some(o) = self.0.stdout.as_mut() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(e) = self.0.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("hv ended ({status}) {what}\nstdout: {out}\nstderr: {err}");
        }
    }
}

impl Drop for HvProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 60 s) until `hv` holds a lock on `path`, seen in /proc/locks (which
/// takes no lock itself, so it cannot get in hv's way).
fn wait_for_lock(hv: &mut HvProcess, path: &std::path::Path) {
    use hv_core::devices::filelock::{self, LockKind};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        hv.assert_running("before it locked the image");
        if let Ok(f) = std::fs::File::open(path) {
            if filelock::holder(&f, LockKind::Exclusive).is_some_and(|h| h.pid == hv.pid()) {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hv {} did not lock {} within 60 s",
            hv.pid(),
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_disk_image_is_shared_between_processes_only_read_only() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("disk-lock");
    let img = dir.0.join("shared.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img_s = img.display().to_string();
    let disk = |ro: bool| format!("{img_s}{}", if ro { ",readonly" } else { "" });
    // (first holds, second asks): refused unless both are read-only.
    for (first_ro, second_ro) in [(false, false), (true, true), (true, false), (false, true)] {
        let case = format!("first readonly={first_ro}, second readonly={second_ro}");
        let mut first =
            HvProcess::spawn(&["run", "--cmdline", "role=idle", "--disk", &disk(first_ro)]);
        wait_for_lock(&mut first, &img);
        // The demo kernel (no role) prints its banner and powers off at once.
        let out = hv(&["run", "--disk", &disk(second_ro)]);
        let stderr = text(&out.stderr);
        if first_ro && second_ro {
            assert_eq!(out.status.code(), Some(0), "{case}: {stderr}");
        } else {
            assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
            let mode = |ro| if ro { "read-only" } else { "writable" };
            let want = format!(
                "cannot open disk image {img_s} {}: it is in use by process {} (",
                mode(second_ro),
                first.pid()
            );
            assert!(stderr.contains(&want), "{case}: {stderr:?} lacks {want:?}");
            assert!(
                stderr.contains(&format!("which has it open {}", mode(first_ro))),
                "{case}: {stderr}"
            );
            // The holder's command line is named.
            assert!(
                stderr.contains(" run --cmdline role=idle --disk "),
                "{case}: {stderr}"
            );
            assert!(text(&out.stdout).is_empty(), "{case}: nothing ran");
        }
        first.assert_running("while the second hv ran");
    }
}

// ---- resource limits ----

/// Runs hv with `args` and RLIMIT_NOFILE set to (`soft`, `hard`).
fn hv_with_nofile(args: &[&str], soft: u64, hard: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hv"));
    cmd.args(args);
    // SAFETY: runs in the forked child before exec and calls only setrlimit, which is
    // async-signal-safe, on a local value.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run hv")
}

#[test]
fn the_soft_descriptor_limit_is_raised_and_running_out_names_the_limit() {
    if !kvm_available() {
        return;
    }
    // 40 one-vCPU domains hold 160 descriptors, far more than a soft limit of 64.
    const DOMAINS: usize = 40;
    let dir = TempDir::new("nofile");
    let cfg = dir.write(
        "many.toml",
        &(0..DOMAINS)
            .map(|i| {
                format!(
                    "{}memory = \"4M\"\n",
                    guest_domain(&format!("d{i}"), "scenario=hello")
                )
            })
            .collect::<String>(),
    );
    let out = hv_with_nofile(&["run", "--config", &cfg], 64, 4096);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for i in 0..DOMAINS {
        assert!(
            stdout.contains(&format!("[d{i}] test-guest: hello\n")),
            "d{i}: {stdout}"
        );
        assert!(
            summary_line(&stderr, &format!("d{i}")).ends_with("powered off with code 0"),
            "{stderr}"
        );
    }

    // The hard limit is too low: a clear message, status 1.
    let out = hv_with_nofile(&["run", "--config", &cfg], 64, 64);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("hv: {cfg}: cannot create domain \"d")),
        "{stderr}"
    );
    assert!(
        stderr.contains("Too many open files")
            && stderr.contains("RLIMIT_NOFILE is 64 (hard limit 64), and this domain holds 4 ")
            && stderr.contains("(2 + 2 per vCPU + 1 per disk, region or console file)"),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).is_empty(),
        "nothing ran: {}",
        text(&out.stdout)
    );
}

// ---- signals ----

/// A running hv whose standard output is read line by line as it comes.
struct LiveHv {
    proc: HvProcess,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl LiveHv {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> LiveHv {
        use std::io::{BufRead, Read};
        let mut child = Command::new(env!("CARGO_BIN_EXE_hv"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run hv");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        LiveHv {
            proc: HvProcess(child),
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits (at most 60 s) for a stdout line containing `needle`.
    fn wait_for_line(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.stdout.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.stdout.push(l),
                Err(e) => {
                    let _ = self.proc.0.kill();
                    let err = self.stderr.take().and_then(|h| h.join().ok());
                    panic!(
                        "no stdout line with {needle:?} ({e}); stdout: {:?}\nstderr: {}",
                        self.stdout,
                        err.unwrap_or_default()
                    );
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.proc.pid()).expect("pid");
        // SAFETY: kill has no memory effects; the pid is our own live child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill");
    }

    /// Waits (at most `bound`) for hv to end: its status, stdout, stderr, how long it took.
    fn wait_exit(
        mut self,
        bound: std::time::Duration,
    ) -> (
        std::process::ExitStatus,
        String,
        String,
        std::time::Duration,
    ) {
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(s) = self.proc.0.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                t0.elapsed() < bound,
                "hv still runs {bound:?} after the signal"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let took = t0.elapsed();
        while let Ok(l) = self.lines.recv_timeout(std::time::Duration::from_secs(10)) {
            self.stdout.push(l);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status, self.stdout.join("\n"), stderr, took)
    }
}

/// How long hv may take to stop after a signal (generous: the machine is shared).
const STOP_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn sigterm_stops_the_domain_prints_summary_and_stats_and_exits_143() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().display().to_string();
    let name = test_guest()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut hv = LiveHv::spawn(
        &["run", &guest, "--cmdline", "scenario=idle", "--stats"],
        &[],
    );
    hv.wait_for_line("idle: ready");
    hv.signal(libc::SIGTERM);
    let (status, stdout, stderr, _) = hv.wait_exit(STOP_BOUND);
    assert_eq!(status.code(), Some(143), "{status}: {stdout}\n{stderr}");
    assert!(
        stderr.contains("hv: SIGTERM: stopping every domain"),
        "{stderr}"
    );
    // --stats, then the summary.
    assert!(
        stderr.contains(&format!("domain {name}: destroyed by the host (created in")),
        "{stderr}"
    );
    assert!(stderr.contains("exits by reason"), "{stderr}");
    assert!(
        summary_line(&stderr, &name).ends_with("destroyed by the host"),
        "{stderr}"
    );
}

#[test]
fn sigint_stops_every_domain_and_syncs_the_disks_and_exits_130() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("sigint");
    let cfg = dir.write(
        "two.toml",
        &format!(
            "{}{}[[domain.disk]]\npath = \"d.img\"\nsize = \"1M\"\n",
            guest_domain("idler", "scenario=idle"),
            guest_domain("writer", "scenario=blk-idle"),
        ),
    );
    let mut hv = LiveHv::spawn(
        &["run", "--config", &cfg, "--stats"],
        &[("RUST_LOG", "hv_core::devices=debug")],
    );
    hv.wait_for_line("[idler] idle: ready");
    hv.wait_for_line("[writer] idle_connect=0 idle_write=0");
    hv.signal(libc::SIGINT);
    let (status, stdout, stderr, _) = hv.wait_exit(STOP_BOUND);
    assert_eq!(status.code(), Some(130), "{status}: {stdout}\n{stderr}");
    assert!(
        stderr.contains("hv: SIGINT: stopping every domain"),
        "{stderr}"
    );
    for (name, id) in [("idler", 1), ("writer", 2)] {
        assert!(
            summary_line(&stderr, name).ends_with("destroyed by the host"),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("domain {name} (id {id}): destroyed by the host")),
            "{stderr}"
        );
    }
    assert_eq!(stderr.matches("exits by reason").count(), 2, "{stderr}");
    // The PV block back-end was stopped and the image synced; the write is in it.
    assert!(stderr.contains("disk image synced"), "{stderr}");
    let image = std::fs::read(dir.0.join("d.img")).unwrap();
    assert_eq!(image.len(), 1 << 20);
    for w in 0..512u64 {
        // The test guest's pattern(salt 9, page 0, word w), written to sectors 0-7.
        let want = (9u64 << 56) ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let at = hv_core::conv::usize_from(w * 8);
        assert_eq!(
            u64::from_le_bytes(image[at..at + 8].try_into().unwrap()),
            want,
            "word {w}"
        );
    }
}

#[test]
fn a_second_signal_while_stopping_does_not_hang() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().display().to_string();
    let mut hv = LiveHv::spawn(&["run", &guest, "--cmdline", "scenario=idle"], &[]);
    hv.wait_for_line("idle: ready");
    hv.signal(libc::SIGTERM);
    hv.signal(libc::SIGINT);
    let (status, stdout, stderr, _) = hv.wait_exit(STOP_BOUND);
    // sigwait takes whichever is pending first (the lower number, SIGINT, if both are);
    // the other one then either comes during the stop and ends hv at once with its own
    // status, or finds hv done (the summary printed, the first signal's status).
    let again = [("SIGINT", 130), ("SIGTERM", 143)]
        .into_iter()
        .find(|(s, _)| stderr.contains(&format!("hv: {s} again while stopping: exiting now")));
    match again {
        Some((_, code)) => assert_eq!(status.code(), Some(code), "{stdout}\n{stderr}"),
        None => {
            assert!(
                matches!(status.code(), Some(130 | 143)),
                "{status}: {stdout}\n{stderr}"
            );
            assert!(stderr.contains("destroyed by the host"), "{stderr}");
        }
    }
}
