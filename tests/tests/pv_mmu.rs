//! The PV MMU through the real hypercall path on KVM: every rule refused with its error,
//! batches that stop at the first failure, mmuext_op, update_va_mapping, multicall.

use hv_abi::{Errno, Op};
use hv_core::Outcome;
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
        ("mc0", 0x1_0000),
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
