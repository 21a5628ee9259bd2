//! Real guests on real KVM: boot, negotiate, make hypercalls, misbehave; check what
//! the host and the guest observed.

use hv_abi::layout;
use hv_abi::{Errno, Op};
use hv_core::stats::ExitKind;
use hv_core::{CrashReason, DomainConfig, DomainError, LoadError, Outcome, FEATURES};
use tests::{kvm_available, run_elf, scenario, scenario_with};

fn poweroff(o: &Outcome) -> u8 {
    match o {
        Outcome::Poweroff { code } => *code,
        other => panic!("expected a poweroff, got {other}"),
    }
}

fn crash_reason(o: &Outcome) -> &CrashReason {
    &o.crash()
        .unwrap_or_else(|| panic!("expected a crash, got {o}"))
        .reason
}

#[test]
fn demo_prints_its_banner_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let run = run_elf(tests::demo_kernel(), DomainConfig::default()).expect("demo runs");
    let stats = &run.report.stats;
    assert_eq!(
        poweroff(&run.report.outcome),
        0,
        "console:\n{}",
        run.console
    );
    let first = run.console.lines().next().unwrap_or_default();
    assert!(first.contains("hv demo kernel"), "banner: {first:?}");
    assert!(
        run.console
            .contains(&format!("ABI v{}.{}", hv_abi::ABI_MAJOR, hv_abi::ABI_MINOR)),
        "console:\n{}",
        run.console
    );
    assert!(
        run.console.contains("64 MiB"),
        "start_info memory shown:\n{}",
        run.console
    );
    assert!(stats.op(Op::ConsoleIo).count >= 3);
    assert!(
        stats.op(Op::Version).count >= 2,
        "SDK init negotiates version and features"
    );
    assert_eq!(stats.op(Op::SchedOp).count, 1);
    assert_eq!(
        stats.exits_of(ExitKind::Hypercall),
        stats.ops.iter().map(|o| o.count).sum::<u64>()
    );
}

#[test]
fn demo_exit_code_and_crash_from_command_line() {
    if !kvm_available() {
        return;
    }
    let cfg = |c: &str| DomainConfig {
        cmdline: c.into(),
        ..DomainConfig::default()
    };
    let run = run_elf(tests::demo_kernel(), cfg("exit=42")).unwrap();
    assert_eq!(poweroff(&run.report.outcome), 42);
    let run = run_elf(tests::demo_kernel(), cfg("panic")).unwrap();
    assert_eq!(crash_reason(&run.report.outcome), &CrashReason::GuestCrash);
    assert!(run.console.contains("panic"), "console:\n{}", run.console);
    assert_eq!(run.report.outcome.exit_code(), hv_core::outcome::EXIT_CRASH);
}

#[test]
fn hello_and_exit_codes() {
    if !kvm_available() {
        return;
    }
    let run = scenario("hello", "");
    assert!(run.console.contains("test-guest: hello"), "{}", run.console);
    assert_eq!(poweroff(&run.report.outcome), 0);
    for code in [1u8, 7, 99] {
        let run = scenario("exit", &format!("code={code}"));
        assert_eq!(poweroff(&run.report.outcome), code, "{}", run.console);
        assert_eq!(run.report.outcome.exit_code(), code);
    }
}

#[test]
fn command_line_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let run = scenario("cmdline", "alpha beta=gamma");
    assert_eq!(
        run.value("cmdline"),
        Some("scenario=cmdline alpha beta=gamma"),
        "{}",
        run.console
    );
}

#[test]
fn guest_panic_is_a_crash_with_its_message() {
    if !kvm_available() {
        return;
    }
    let run = scenario("panic", "");
    assert_eq!(crash_reason(&run.report.outcome), &CrashReason::GuestCrash);
    assert!(run.console.contains("panic: boom"), "{}", run.console);
}

#[test]
fn cpuid_leaves_identify_hv() {
    if !kvm_available() {
        return;
    }
    let run = scenario("cpuid", "");
    assert_eq!(
        run.value("cpuid_sig"),
        Some("hvParavirtHV"),
        "{}",
        run.console
    );
    assert_eq!(
        run.int("cpuid_version"),
        i64::from(hv_abi::version::packed_version(
            hv_abi::ABI_MAJOR,
            hv_abi::ABI_MINOR
        ))
    );
    assert_eq!(run.uint("cpuid_features"), FEATURES.bits());
    assert_eq!(
        run.int("cpuid_port"),
        i64::from(hv_abi::hypercall::HYPERCALL_PORT)
    );
}

#[test]
fn hypercall_argument_errors() {
    if !kvm_available() {
        return;
    }
    let run = scenario("hypercalls", "");
    assert_eq!(poweroff(&run.report.outcome), 0, "{}", run.console);
    assert_eq!(run.int("unknown_op"), Errno::ENOSYS.to_ret());
    assert_eq!(run.int("version_bad_cmd"), Errno::EINVAL.to_ret());
    assert_eq!(run.int("sched_bad_cmd"), Errno::EINVAL.to_ret());
    assert_eq!(run.int("shutdown_bad_reason"), Errno::EINVAL.to_ret());
    assert_eq!(run.int("shutdown_bad_code"), Errno::EINVAL.to_ret());
    assert_eq!(run.int("yield"), 0);
    assert_eq!(
        run.int("version"),
        i64::from(hv_abi::version::packed_version(
            hv_abi::ABI_MAJOR,
            hv_abi::ABI_MINOR
        ))
    );
    assert_eq!(run.uint("features"), FEATURES.bits());
    let s = &run.report.stats;
    assert_eq!(s.unknown_ops().count, 1);
    assert!(s.op(Op::SchedOp).errors >= 3);
}

/// SPEC §8.3: a shutdown code above 99 is -EINVAL for every reason (reboot and crash
/// included), directly and inside a multicall; the domain runs on.
#[test]
fn shutdown_code_over_99_is_refused_for_every_reason() {
    if !kvm_available() {
        return;
    }
    let run = scenario("shutdown-codes", "");
    // A shutdown that was accepted would have ended the domain as a reboot or a crash.
    run.assert_poweroff(0);
    assert_eq!(run.int("alive"), 1, "{}", run.console);
    assert_eq!(run.int("multicall_ok"), 1, "{}", run.console);
    let einval = Errno::EINVAL.to_ret();
    for reason in ["reboot", "crash", "poweroff"] {
        for code in ["100", "max"] {
            assert_eq!(
                run.int(&format!("direct_{reason}_{code}")),
                einval,
                "{reason} {code}: {}",
                run.console
            );
            assert_eq!(
                run.int(&format!("mc_{reason}_{code}")),
                einval,
                "multicall {reason} {code}: {}",
                run.console
            );
        }
    }
    let s = &run.report.stats;
    // The 6 refused direct calls (multicall entries count under multicall); the final
    // poweroff succeeded.
    assert_eq!(s.op(Op::SchedOp).errors, 6, "{}", run.console);
    assert_eq!(s.op(Op::SchedOp).count, 7, "{}", run.console);
}

#[test]
fn console_buffer_outside_guest_memory_is_efault() {
    if !kvm_available() {
        return;
    }
    let run = scenario("console-efault", "");
    assert_eq!(poweroff(&run.report.outcome), 0, "{}", run.console);
    assert_eq!(run.int("efault_past_end"), Errno::EFAULT.to_ret());
    assert_eq!(run.int("efault_overflow"), Errno::EFAULT.to_ret());
    assert_eq!(run.int("efault_cross"), Errno::EFAULT.to_ret());
    assert_eq!(run.int("too_long"), Errno::E2BIG.to_ret());
    assert_eq!(run.int("zero_len"), 0);
}

#[test]
fn hypercall_from_cpl3_is_refused_unless_allowed() {
    if !kvm_available() {
        return;
    }
    let run = scenario("cpl3", "");
    assert_eq!(
        run.int("cpl3_version"),
        Errno::EPERM.to_ret(),
        "{}",
        run.console
    );
    assert_eq!(poweroff(&run.report.outcome), 0);
    let allowed = scenario_with(
        "cpl3",
        "",
        DomainConfig {
            allow_user_hypercalls: true,
            ..DomainConfig::default()
        },
    );
    assert_eq!(
        allowed.int("cpl3_version"),
        i64::from(hv_abi::version::packed_version(
            hv_abi::ABI_MAJOR,
            hv_abi::ABI_MINOR
        )),
        "{}",
        allowed.console
    );
}

#[test]
fn triple_fault_crashes_the_domain_with_a_report() {
    if !kvm_available() {
        return;
    }
    let run = scenario("triple-fault", "");
    assert_eq!(crash_reason(&run.report.outcome), &CrashReason::TripleFault);
    let c = run.report.outcome.crash().unwrap();
    assert!(c.regs.is_some() && c.sregs.is_some());
    assert!(c.to_string().contains("rip"), "{c}");
    // The guest had loaded an empty IDT: the report says so.
    assert!(c.to_string().contains("no IDT was loaded"), "{c}");
    assert_eq!(run.report.stats.exits_of(ExitKind::Shutdown), 1);
}

#[test]
fn unknown_port_crashes_the_domain() {
    if !kvm_available() {
        return;
    }
    let run = scenario("bad-port", "");
    assert_eq!(
        crash_reason(&run.report.outcome),
        &CrashReason::UnknownPort {
            port: 0x80,
            size: 1,
            dir: "out"
        }
    );
    let run = scenario("bad-port-in", "");
    assert!(matches!(
        crash_reason(&run.report.outcome),
        CrashReason::UnknownPort {
            port: 0xE8,
            dir: "in",
            ..
        }
    ));
}

#[test]
fn invalid_write_into_the_page_table_pool_crashes_the_domain() {
    if !kvm_available() {
        return;
    }
    // The scenario stores 0xdeadbeef (PS set) into the boot L4 with CR0.WP clear: the
    // store exits (read-only memslot), is validated like mmu_update and refused.
    let run = scenario("mmio-write", "");
    let pool = hv_core::memory::pool_gpa_for(DomainConfig::default().mem_bytes);
    assert_eq!(
        crash_reason(&run.report.outcome),
        &CrashReason::PageTableWrite {
            gpa: pool,
            size: 8,
            errno: Errno::EINVAL
        }
    );
}

#[test]
fn secondary_vcpu_starts_with_vcpu_op() {
    if !kvm_available() {
        return;
    }
    let run = scenario_with(
        "vcpus",
        "",
        DomainConfig {
            vcpus: 2,
            ..DomainConfig::default()
        },
    );
    assert_eq!(poweroff(&run.report.outcome), 0, "{}", run.console);
    assert!(run.console.contains("vcpu1 arg=42"), "{}", run.console);
    assert!(run.console.contains("vcpus ok"), "{}", run.console);
    assert_eq!(run.int("vcpu_up_again"), Errno::EEXIST.to_ret());
    assert_eq!(run.int("vcpu_bad"), Errno::EINVAL.to_ret());
}

#[test]
fn bad_domain_parameters_are_user_errors() {
    if !kvm_available() {
        return;
    }
    let cases = [
        DomainConfig {
            vcpus: 0,
            ..DomainConfig::default()
        },
        DomainConfig {
            vcpus: 33,
            ..DomainConfig::default()
        },
        DomainConfig {
            mem_bytes: 1 << 20,
            ..DomainConfig::default()
        },
        DomainConfig {
            mem_bytes: (64 << 20) + 1,
            ..DomainConfig::default()
        },
        DomainConfig {
            cmdline: "x".repeat(1024),
            ..DomainConfig::default()
        },
        DomainConfig {
            cmdline: "a\0b".into(),
            ..DomainConfig::default()
        },
    ];
    for cfg in cases {
        let what = format!("{cfg:?}");
        let err = run_elf(tests::TEST_GUEST, cfg).expect_err(&what);
        assert!(err.is_user_error(), "{what}: {err}");
    }
    // A kernel that does not fit in RAM is refused before it runs.
    let small = DomainConfig {
        mem_bytes: 2 << 20,
        ..DomainConfig::default()
    };
    let img = hv_core::KernelImage::from_elf(tests::TEST_GUEST).unwrap();
    if img.end() > 2 << 20 {
        let err = run_elf(tests::TEST_GUEST, small).unwrap_err();
        assert!(
            matches!(
                err,
                DomainError::Load(LoadError::SegmentBeyondMemory { .. })
            ),
            "{err}"
        );
    }
}

#[test]
fn start_info_and_boot_layout() {
    if !kvm_available() {
        return;
    }
    // The demo prints what it found in start_info; the host computed the same values.
    let run = run_elf(
        tests::demo_kernel(),
        DomainConfig {
            mem_bytes: 32 << 20,
            cmdline: "hello=world".into(),
            ..DomainConfig::default()
        },
    )
    .unwrap();
    assert!(run.console.contains("32 MiB"), "{}", run.console);
    assert!(run.console.contains("hello=world"), "{}", run.console);
    let pool = hv_core::memory::pool_gpa_for(32 << 20);
    assert!(
        run.console.contains(&format!("{pool:#x}")),
        "pool address shown:\n{}",
        run.console
    );
    assert!(run
        .console
        .contains(&format!("{:#x}", layout::SHARED_INFO_GPA)));
}

/// The "N boot frames" the demo prints (start_info.nr_pt_frames).
fn demo_boot_frames(run: &tests::GuestRun) -> u64 {
    let line = run.line_with("boot frames");
    line.split(", ")
        .find_map(|w| w.strip_suffix(" boot frames"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn demo_runs_with_big_ram_and_boot_tables_stay_small() {
    if !kvm_available() {
        return;
    }
    use hv_core::boot::{pool_frames_for_regions, RamMapping};
    // The demo maps the whole pool in its own address space: with 4 KiB boot pages
    // throughout, 8 GiB needed more tables than it could build ("too many tables for
    // the demo"), and 256 GiB cost 131,591 boot frames (514 MiB of host memory).
    for (ram, extra) in [
        (8u64 << 30, "8 GiB"),
        (256u64 << 30, "256 GiB, the most hv accepts"),
    ] {
        let cfg = DomainConfig {
            mem_bytes: ram,
            ..DomainConfig::default()
        };
        let run = run_elf(tests::demo_kernel(), cfg).expect("demo runs");
        run.assert_poweroff(0);
        run.line_with("unpinned the boot tables");
        let frames = demo_boot_frames(&run);
        let (_, want) = pool_frames_for_regions(ram, 256, &[], RamMapping::Large);
        assert_eq!(frames, want, "{extra}");
        assert!(frames < 2400, "{extra}: {frames} boot frames");
    }
}

#[test]
fn a_kernel_built_for_abi_1_2_keeps_4k_boot_pages_throughout() {
    if !kvm_available() {
        return;
    }
    use hv_core::boot::{pool_frames_for_regions, RamMapping};
    // The boot state is part of the ABI: a kernel whose note asks for 1.2 gets the 1.2
    // boot tables (every RAM page through an L1 entry), even above 4 GiB.
    let mut elf = tests::demo_kernel().to_vec();
    let mut note = tests::elf_edit::note(&elf);
    note.minor = 2;
    tests::elf_edit::set_note(&mut elf, note);
    let ram = 8u64 << 30;
    let cfg = DomainConfig {
        mem_bytes: ram,
        ..DomainConfig::default()
    };
    let run = run_elf(&elf, cfg).expect("demo runs");
    run.assert_poweroff(0);
    let (_, small) = pool_frames_for_regions(ram, 256, &[], RamMapping::Small);
    let (_, large) = pool_frames_for_regions(ram, 256, &[], RamMapping::Large);
    assert_eq!(demo_boot_frames(&run), small);
    assert!(small > large + 2000, "{small} {large}");
}
