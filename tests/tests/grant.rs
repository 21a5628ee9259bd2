//! Grant tables v1 on real KVM (SPEC.md 8.8): two test-guest domains share pages by
//! mapping and copying grants; flags, refusals, ring-3 visibility, and both kinds of
//! death (the mapper's, the granter's).

use tests::{kvm_available, run_domains, DomSpec, GuestRun};

const EPERM: i64 = -1;
const ENOENT: i64 = -2;
const ESRCH: i64 = -3;
const E2BIG: i64 = -7;
const EACCES: i64 = -13;
const EFAULT: i64 = -14;
const EBUSY: i64 = -16;
const EINVAL: i64 = -22;

const GTF_PERMIT: i64 = 0x1;
const GTF_READONLY: i64 = 0x4;
const GTF_READING: i64 = 0x8;
const GTF_WRITING: i64 = 0x10;

const MAGIC_P: i64 = 0x5041_4745_0000_0050;
const MAGIC_R: i64 = 0x5245_4144_0000_0052;
const MAGIC_Q: i64 = 0x4845_4c44_0000_0051;
const MAGIC_S: i64 = 0x5345_4c46_0000_0053;

fn expect(run: &GuestRun, pairs: &[(&str, i64)]) {
    for (k, v) in pairs {
        assert_eq!(run.int(k), *v, "{k}; console:\n{}", run.console);
    }
}

#[test]
fn two_domains_map_copy_share_and_revoke() {
    if !kvm_available() {
        return;
    }
    let runs = run_domains(
        &[
            DomSpec::new("a", "scenario=grant-a"),
            DomSpec::new("b", "scenario=grant-b"),
        ],
        &[(0, 1)],
    );
    let (a, b) = (&runs[0], &runs[1]);
    a.assert_poweroff(0);
    b.assert_poweroff(0);

    // Table size and location.
    expect(
        a,
        &[
            ("qs_rc", 0),
            ("qs_status", 0),
            ("qs_nr", 4),
            ("qs_max", 4),
            ("st_rc", 0),
            ("st_ok", 0),
            ("st_frame0", 0x10),
            ("st_frame3", 0x13),
            ("st_too_many", EINVAL),
            ("st_other", EPERM),
            ("st_nobody", ESRCH),
            ("st_bad_list", EFAULT),
            ("st_zero", EINVAL),
            ("bad_array", EFAULT),
            ("bad_cmd", EINVAL),
            ("too_many_ops", E2BIG),
            ("zero_ops", 0),
        ],
    );
    expect(b, &[("window_frames", 1024), ("window_aligned", 1)]);

    // Map: the granter's data, and writes seen on both sides.
    expect(
        b,
        &[
            ("map_status", 0),
            ("map_bus_in_window", 1),
            ("b_sees_magic", MAGIC_P),
            ("b_sees_a_write", 0xA11CE),
        ],
    );
    expect(a, &[("a_sees_b_write", 0xB0B0)]);

    // Flags while mapped (rw: reading and writing; ro: reading) and after copies.
    expect(
        a,
        &[
            ("flags_mapped_rw", GTF_PERMIT | GTF_READING | GTF_WRITING),
            ("flags_mapped_ro", GTF_PERMIT | GTF_READONLY | GTF_READING),
            ("flags_copied_src", GTF_PERMIT | GTF_READONLY),
            ("flags_copied_dst", GTF_PERMIT),
            ("revoke_mapped", 0),
            ("revoke_unmapped", 1),
            ("flags_revoked", 0),
            ("revoke_ro", 1),
        ],
    );

    // Copy batch: failures in the middle do not stop the rest.
    expect(
        b,
        &[
            ("copy_rc", 0),
            ("copy0", 0),
            ("copy1", EINVAL),  // source crosses the page
            ("copy2", 0),       // into a's writable grant
            ("copy3", EACCES),  // into a read-only grant
            ("copy4", ENOENT),  // ref out of range
            ("copy5", ESRCH),   // no such domain
            ("copy6", EINVAL),  // reserved field
            ("copy7", EPERM),   // local frame of another domain
            ("copy8", EACCES),  // grant meant for someone else
            ("copy9", EINVAL),  // destination crosses the page
            ("copy10", 0),      // local to local
            ("copy11", EINVAL), // local frame outside RAM
            ("l2_word0", 0x0C0C_0000_0000_0000),
            ("l2_word7", 0x0C0C_0000_0000_0007),
            ("l2_word8", 0),
            ("l2_self", 0xB1B1_0001),
        ],
    );
    expect(
        a,
        &[("d_copied", 0xB1B1_0000), ("d_after", 0), ("d_before", 0)],
    );

    // Refused maps.
    expect(
        b,
        &[
            ("map_ro_as_rw", EACCES),
            ("map_other_dom", EACCES),
            ("map_bad_ref", ENOENT),
            ("map_nobody", ESRCH),
            ("map_no_host", EINVAL),
            ("map_present", EBUSY),
            ("map_again", EBUSY),
            ("map_bad_array", EFAULT),
            ("unmap_bad_handle", EINVAL),
            ("map_ro", 0),
        ],
    );

    // Ring 3 through the mappings: reads, a write fault on the read-only one (#PF,
    // P|W|U), nothing after unmap (#PF, U), the new frame after a remap.
    expect(
        b,
        &[
            ("r3_read_p_vector", 6),
            ("r3_read_p", MAGIC_P),
            ("r3_read_r_vector", 6),
            ("r3_read_r", MAGIC_R),
            ("r3_write_ro_vector", 14),
            ("r3_write_ro_error", 0x7),
            ("r3_write_ro_cr2_ok", 1),
            ("r_unchanged", MAGIC_R),
            ("unmap_r", 0),
            ("double_unmap", EINVAL),
            ("unmap_p", 0),
            ("pte_after_unmap", 0),
            ("r3_after_unmap_vector", 14),
            ("r3_after_unmap_error", 0x4),
            ("remap", 0),
            ("r3_after_remap_vector", 6),
            ("r3_after_remap", 0x0C0C_0000_0000_0000),
            ("unmap_remap", 0),
        ],
    );

    // A grant to oneself.
    expect(
        b,
        &[
            ("self_map", 0),
            ("self_map_read", MAGIC_S),
            ("self_map_shared", 0x5E1F),
            ("self_flags", GTF_PERMIT | GTF_READING | GTF_WRITING),
            ("self_unmap", 0),
            ("self_flags_after", GTF_PERMIT),
        ],
    );

    // b died holding a's ref 5: the flags are cleared and a can revoke.
    expect(
        b,
        &[
            ("map_held", 0),
            ("held_read", MAGIC_Q),
            ("done_copy", 0),
            ("done_status", 0),
        ],
    );
    expect(
        a,
        &[
            ("flags_held", GTF_PERMIT | GTF_READING | GTF_WRITING),
            ("flags_after_mapper_death", GTF_PERMIT),
            ("revoke_after_death", 1),
        ],
    );
}

#[test]
fn granter_dies_while_mapped_and_the_mapper_survives() {
    if !kvm_available() {
        return;
    }
    let runs = run_domains(
        &[
            DomSpec::new("a", "scenario=grant-die-a"),
            DomSpec::new("b", "scenario=grant-die-b"),
        ],
        &[(0, 1)],
    );
    let (a, b) = (&runs[0], &runs[1]);
    a.assert_poweroff(0);
    b.assert_poweroff(0);
    assert!(b.console.contains("survivor ok"), "{}", b.console);
    expect(
        b,
        &[
            ("map", 0),
            ("before", MAGIC_P),
            ("after_death_read", 0),
            ("survivor_unmap", 0),
            ("survivor_pte", 0),
            ("survivor_double_unmap", EINVAL),
        ],
    );
}
