//! The PV MMU through the real hypercall path on KVM: every rule refused with its error,
//! batches that stop at the first failure, mmuext_op, update_va_mapping, multicall;
//! ring 3 seeing page-table changes, and the other vCPUs paused around a memslot zap
//! (with the shadow-paging strategy forced, so that it happens on every host).

use hv_abi::{Errno, Op};
use hv_core::coherence::HostPaging;
use hv_core::{CrashReason, DomainConfig, Outcome};
use tests::{kvm_available, scenario};

#[test]
fn every_rule_through_the_hypercall_path() {
    if !kvm_available() {
        return;
    }
    let run = scenario("mmu", "");
    assert!(
        matches!(run.report.outcome, Outcome::Poweroff { code: 0 }),
        "{}\n{}",
        run.report.outcome,
        run.console
    );
    let e = |x: Errno| x.to_ret();
    let expect: &[(&str, i64)] = &[
        ("pin_root_again", e(Errno::EEXIST)),
        ("untyped_write", 0),
        ("pin_l1", 0),
        ("writable_pt", e(Errno::EACCES)),
        ("readonly_pt", 0),
        ("reserved_bits", e(Errno::EINVAL)),
        ("outside", e(Errno::EACCES)),
        ("ram_target", 0),
        ("stored_ad", 1),
        ("untyped_write2", 0),
        ("huge_page", e(Errno::EINVAL)),
        ("hv_slot", e(Errno::EACCES)),
        ("type_conflict", e(Errno::EBUSY)),
        ("update_in_ram", e(Errno::EACCES)),
        ("bad_command", e(Errno::EINVAL)),
        ("batch_done", 2),
        ("batch_rc", e(Errno::EACCES)),
        ("batch_not_applied", 0),
        ("baseptr_unpinned", e(Errno::EINVAL)),
        ("unpin_in_use", e(Errno::EBUSY)),
        ("mmuext_bad_cmd", e(Errno::EINVAL)),
        ("flush", 0),
        ("uva", 0),
        ("uva_bad_flags", e(Errno::EINVAL)),
        ("uva_hv_range", e(Errno::EINVAL)),
        ("multicall", 0),
        (
            "mc0",
            i64::from(hv_abi::version::packed_version(
                hv_abi::ABI_MAJOR,
                hv_abi::ABI_MINOR,
            )),
        ),
        ("mc1", e(Errno::EACCES)),
        ("mc2", e(Errno::EINVAL)),
        ("mc3", e(Errno::EINVAL)),
        ("mc4", e(Errno::ENOSYS)),
    ];
    for (key, want) in expect {
        assert_eq!(run.int(key), *want, "{key}; console:\n{}", run.console);
    }
    let s = &run.report.stats;
    assert!(s.op(Op::MmuUpdate).count >= 10);
    assert_eq!(s.op(Op::Multicall).count, 1);
}

#[test]
fn direct_writes_into_the_pool_trap_and_are_validated() {
    if !kvm_available() {
        return;
    }
    let run = scenario("trapped-write", "");
    let c = &run.console;
    let si_ram = |line: &str| run.uint(line);
    // Into a frame that is no page table: stored as is (no A bit added).
    let untyped = si_ram("trapped_untyped");
    assert_eq!(untyped & 0xFFF, 0x3, "{c}");
    assert_eq!(run.int("pin_l1"), 0, "{c}");
    // Into a pinned L1: validated, stored with Accessed set.
    assert_eq!(
        si_ram("trapped_valid"),
        ((untyped & !0xFFF) + 0x1000) | 0x21,
        "{c}"
    );
    assert!(
        c.contains("about_to_write_bad") && !c.contains("survived_bad_write"),
        "{c}"
    );
    match &run.report.outcome {
        Outcome::Crash(r) => match r.reason {
            CrashReason::PageTableWrite {
                size: 8,
                errno: Errno::EACCES,
                ..
            } => {}
            ref other => panic!("expected a refused page-table write, got {other}"),
        },
        other => panic!("expected a crash, got {other}"),
    }
    assert!(run.report.stats.exits_of(hv_core::stats::ExitKind::Mmio) >= 3);
}

#[test]
fn loading_an_unregistered_cr3_is_detected() {
    if !kvm_available() {
        return;
    }
    let run = scenario("cr3-bypass", "");
    let copy = run.uint("loading_copy");
    assert!(!run.console.contains("bypassed"), "{}", run.console);
    match &run.report.outcome {
        Outcome::Crash(r) => assert_eq!(r.reason, CrashReason::Cr3Bypass { cr3: copy }),
        other => panic!("expected a crash, got {other}"),
    }
}

#[test]
fn ring3_sees_a_changed_mapping_after_update_va_mapping() {
    if !kvm_available() {
        return;
    }
    // Ring 3 reads a page, ring 0 remaps its virtual address to another frame with
    // update_va_mapping(UVMF_INVLPG), ring 3 reads again. On hosts with shadow paging
    // this needs the hypervisor's remedy (without it the second read is stale).
    let run = scenario("ring3-remap", "");
    assert!(
        matches!(run.report.outcome, Outcome::Poweroff { code: 0 }),
        "{}\n{}",
        run.report.outcome,
        run.console
    );
    assert_eq!(run.int("r3_before"), 0xAAAA_0001, "{}", run.console);
    assert_eq!(run.int("remap_ok"), 1);
    assert_eq!(run.int("r3_after"), 0xBBBB_0002, "{}", run.console);
}

#[test]
fn ring3_sees_an_upper_level_change() {
    if !kvm_available() {
        return;
    }
    // Same, but the guest builds a new L1 table in the pool (one 512-entry batch) and
    // points the L2 entry at it: an upper-level change, which on shadow-paging hosts
    // needs the pool memslot zapped (without it the second read is stale).
    let run = scenario("ring3-remap-l2", "");
    assert!(
        matches!(run.report.outcome, Outcome::Poweroff { code: 0 }),
        "{}\n{}",
        run.report.outcome,
        run.console
    );
    assert_eq!(run.int("r3_before"), 0xAAAA_0001, "{}", run.console);
    assert_eq!(run.int("remap_ok"), 1, "{}", run.console);
    assert_eq!(run.int("r3_after"), 0xBBBB_0002, "{}", run.console);
    assert_eq!(run.report.stats.op(Op::MmuUpdate).count, 2);
}

#[test]
fn upper_level_change_with_another_vcpu_running() {
    if !kvm_available() {
        return;
    }
    // vCPU 1 spins in the guest while vCPU 0 swaps an L2 entry: the hypervisor pauses
    // vCPU 1 around the pool memslot zap and lets it run again afterwards. The
    // shadow-paging strategy is forced: on an EPT/NPT host the probe picks the coherent
    // one, which zaps nothing and pauses nobody, and this test would check nothing.
    let run = tests::scenario_with(
        "ring3-remap-l2",
        "",
        DomainConfig {
            vcpus: 2,
            host_paging: Some(HostPaging::Shadow),
            ..DomainConfig::default()
        },
    );
    run.assert_poweroff(0);
    assert!(
        run.console.contains("vcpu1 arg=42") && run.console.contains("vcpu1 spinning"),
        "{}",
        run.console
    );
    // vCPU 1 was running in the guest, so the zap had to wait for it to leave. (Its
    // Interrupted exits prove nothing: stopping the domain kicks it too.)
    assert!(
        run.report.vcpu_pauses >= 1,
        "no vCPU was paused around the zap; console:\n{}",
        run.console
    );
    assert_eq!(run.int("r3_after"), 0xBBBB_0002, "{}", run.console);
}

#[test]
fn forced_coherent_paging_pauses_nobody() {
    if !kvm_available() {
        return;
    }
    // The other strategy, forced: no remedy, so no zap and no pause (on a shadow-paging
    // host ring 3 may then read a stale mapping; that is why the probe exists).
    let run = tests::scenario_with(
        "ring3-remap-l2",
        "",
        DomainConfig {
            vcpus: 2,
            host_paging: Some(HostPaging::Coherent),
            ..DomainConfig::default()
        },
    );
    run.assert_poweroff(0);
    assert_eq!(run.int("remap_ok"), 1, "{}", run.console);
    assert_eq!(run.report.vcpu_pauses, 0, "{}", run.console);
}

#[test]
fn only_the_roots_vcpus_hold_are_busy() {
    if !kvm_available() {
        return;
    }
    // SPEC 8.4 / 8.5.4: a vCPU that is down holds no page table (hv used to count the
    // boot root as every vCPU's CR3, so a 2-vCPU guest could never unpin it); from
    // VCPUOP_INITIALISE on, the context's root (a pinned L4) is the vCPU's CR3.
    let run = tests::scenario_with(
        "unpin-vcpus",
        "",
        hv_core::DomainConfig {
            vcpus: 2,
            ..hv_core::DomainConfig::default()
        },
    );
    run.assert_poweroff(0);
    let e = |x: Errno| x.to_ret();
    for (key, want) in [
        ("switch_a", 0),
        ("unpin_boot_v1_down", 0),
        ("init_unpinned", e(Errno::EINVAL)),
        ("init_b", 0),
        ("unpin_initialised", e(Errno::EBUSY)),
        ("reinit_a", 0),
        ("unpin_after_reinit", 0),
        ("up", 0),
        ("v1_started_on_a", 1),
        ("v1_switch", 0),
        ("unpin_other_vcpu", e(Errno::EBUSY)),
        ("unpin_own", e(Errno::EBUSY)),
    ] {
        assert_eq!(run.int(key), want, "{key}; console:\n{}", run.console);
    }
}

#[test]
fn big_ram_is_mapped_with_2mib_pages_that_the_validator_accepts() {
    if !kvm_available() {
        return;
    }
    // SPEC 4.5 (ABI 1.3): RAM above 4 GiB in 2 MiB pages, a last partial 2 MiB in
    // 4 KiB pages; SPEC 8.5.2: 2 MiB pages in L2 entries, wholly in RAM.
    let ram = (8u64 << 30) + (1 << 20);
    let run = tests::scenario_with(
        "big-ram",
        "",
        hv_core::DomainConfig {
            mem_bytes: ram,
            ..hv_core::DomainConfig::default()
        },
    );
    run.assert_poweroff(0);
    let e = |x: Errno| x.to_ret();
    let rw_large = 0xE7; // P W U A D PS
    let c = &run.console;
    assert_eq!(run.int("boot_6g_level"), 2, "{c}");
    assert_eq!(run.int("boot_6g_entry"), (6 << 30) | rw_large, "{c}");
    assert_eq!(run.int("boot_below_4g_level"), 1, "{c}");
    assert_eq!(
        run.int("boot_below_4g_entry"),
        ((4 << 30) - 4096) | 0x67,
        "{c}"
    );
    assert_eq!(run.int("boot_last_level"), 1, "{c}");
    assert_eq!(
        run.int("boot_last_entry"),
        ((ram - 4096) | 0x67) as i64,
        "{c}"
    );
    for (key, want) in [
        ("high_rw", 1),
        ("uva_large", e(Errno::EINVAL)),
        ("uva_last", 0),
        ("remap_large", 0),
        ("remapped_read", 0x4444),
        ("remap_back", 0),
        ("back_read", 0x6666),
        ("pin_past_ram_end", e(Errno::EACCES)),
        ("pin_large", 0),
        ("update_large", 0),
        ("large_stored_ad", 1),
        ("update_misaligned", e(Errno::EINVAL)),
        ("pin_l3_large", e(Errno::EINVAL)),
    ] {
        assert_eq!(run.int(key), want, "{key}; console:\n{c}");
    }
}
