//! The ELF loader refuses every malformed or mismatched kernel with a precise error.
//! These tests edit a real guest kernel (the test guest) one field at a time.

use hv_abi::note::AbiNote;
use hv_abi::{Features, ABI_MAJOR, ABI_MINOR};
use hv_core::loader::{KernelImage, LoadError, MAX_PHDRS};
use hv_core::FEATURES;
use tests::elf_edit::*;
use tests::TEST_GUEST;

fn guest() -> Vec<u8> {
    TEST_GUEST.to_vec()
}

fn refused(elf: &[u8]) -> LoadError {
    match KernelImage::from_elf(elf) {
        Ok(img) => match img.check_abi(FEATURES) {
            Ok(()) => panic!("kernel was accepted"),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

#[test]
fn the_unmodified_guest_is_accepted() {
    let img = KernelImage::from_elf(TEST_GUEST).expect("test guest parses");
    img.check_abi(FEATURES)
        .expect("test guest's ABI is supported");
    assert!(img.start() >= hv_abi::layout::KERNEL_MIN_GPA);
    assert_eq!(img.note.major, ABI_MAJOR);
    let demo = KernelImage::from_elf(tests::demo_kernel()).expect("demo parses");
    demo.check_abi(FEATURES).expect("demo's ABI is supported");
}

#[test]
fn not_elf() {
    assert!(matches!(refused(b""), LoadError::NotElf(_)));
    assert!(matches!(refused(b"\x7fELF"), LoadError::NotElf(_)));
    assert!(matches!(
        refused(b"MZ\x90\x00 this is not an ELF file"),
        LoadError::NotElf(_)
    ));
    let mut e = guest();
    e.truncate(40);
    assert!(matches!(refused(&e), LoadError::NotElf(_)));
}

#[test]
fn wrong_class_and_endianness() {
    let mut e = guest();
    e[4] = 1; // ELFCLASS32
    assert_eq!(refused(&e), LoadError::NotElf64);
    let mut e = guest();
    e[5] = 2; // ELFDATA2MSB
    assert_eq!(refused(&e), LoadError::NotLittleEndian);
}

#[test]
fn wrong_machine() {
    let mut e = guest();
    set_u16(&mut e, 18, 183); // EM_AARCH64
    assert_eq!(refused(&e), LoadError::WrongMachine(183));
}

#[test]
fn not_executable() {
    let mut e = guest();
    set_u16(&mut e, 16, 3); // ET_DYN
    assert_eq!(refused(&e), LoadError::NotExecutable(3));
    // A position-independent kernel is told how to link.
    let msg = refused(&e).to_string();
    assert!(msg.contains("link.ld") && msg.contains("--no-pie"), "{msg}");
    set_u16(&mut e, 16, 1); // ET_REL
    assert_eq!(refused(&e), LoadError::NotExecutable(1));
    assert!(!refused(&e).to_string().contains("--no-pie"));
}

#[test]
fn too_many_program_headers() {
    let mut e = guest();
    set_u16(&mut e, 56, u16::try_from(MAX_PHDRS + 1).unwrap());
    let err = refused(&e);
    assert!(
        matches!(err, LoadError::TooManySegments(n) if n == MAX_PHDRS + 1)
            || matches!(err, LoadError::NotElf(_)),
        "{err:?}"
    );
}

#[test]
fn segment_outside_the_file() {
    let mut e = guest();
    let i = loads(&e)[0];
    let len = e.len() as u64;
    edit_phdr(&mut e, i, |p| p.p_offset = u64v(len - 4));
    let err = refused(&e);
    assert!(
        matches!(err, LoadError::SegmentFileRange { index, .. } if index == i),
        "{err:?}"
    );
    let mut e = guest();
    edit_phdr(&mut e, i, |p| p.p_offset = u64v(u64::MAX - 2));
    assert!(matches!(refused(&e), LoadError::SegmentFileRange { .. }));
}

#[test]
fn file_size_larger_than_memory_size() {
    let mut e = guest();
    let i = loads(&e)[0];
    let p = phdr(&e, i);
    let le = object::LittleEndian;
    assert!(p.p_filesz.get(le) > 1);
    edit_phdr(&mut e, i, |p| p.p_memsz = u64v(p.p_filesz.get(le) - 1));
    assert!(matches!(refused(&e), LoadError::FileSizeExceedsMemSize { index, .. } if index == i));
}

#[test]
fn segment_address_overflow() {
    let mut e = guest();
    let i = loads(&e)[0];
    edit_phdr(&mut e, i, |p| p.p_paddr = u64v(u64::MAX - 0x10));
    assert!(matches!(refused(&e), LoadError::SegmentOverflow { index, .. } if index == i));
}

#[test]
fn segment_below_the_kernel_area() {
    let mut e = guest();
    let i = loads(&e)[0];
    edit_phdr(&mut e, i, |p| p.p_paddr = u64v(0x2000)); // over start_info
    assert_eq!(
        refused(&e),
        LoadError::SegmentBelowKernelArea {
            index: i,
            paddr: 0x2000
        }
    );
}

#[test]
fn segment_beyond_memory() {
    let img = KernelImage::from_elf(TEST_GUEST).unwrap();
    let err = img.check_fits(img.end() - 1).unwrap_err();
    assert!(
        matches!(err, LoadError::SegmentBeyondMemory { .. }),
        "{err:?}"
    );
    img.check_fits(img.end()).unwrap();
    let mut e = guest();
    let i = *loads(&e).last().unwrap(); // the data segment: the entry stays valid
    edit_phdr(&mut e, i, |p| p.p_paddr = u64v(1 << 40));
    let img = KernelImage::from_elf(&e).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        img.check_fits(64 << 20),
        Err(LoadError::SegmentBeyondMemory { .. })
    ));
}

#[test]
fn overlapping_segments() {
    let mut e = guest();
    let l = loads(&e);
    assert!(l.len() >= 2, "the test guest has several PT_LOAD segments");
    let le = object::LittleEndian;
    let first = phdr(&e, l[0]).p_paddr.get(le);
    edit_phdr(&mut e, l[1], |p| p.p_paddr = u64v(first));
    assert!(matches!(refused(&e), LoadError::Overlap { .. }));
}

#[test]
fn entry_outside_executable_segments() {
    let mut e = guest();
    set_u64(&mut e, 24, 0x10); // e_entry
    assert_eq!(refused(&e), LoadError::BadEntry(0x10));
    let mut e = guest();
    set_u64(&mut e, 24, 1 << 40);
    assert_eq!(refused(&e), LoadError::BadEntry(1 << 40));
}

#[test]
fn too_large() {
    let big = vec![0u8; hv_core::loader::MAX_KERNEL_FILE + 1];
    assert!(matches!(refused(&big), LoadError::TooLarge(_)));
}

#[test]
fn missing_note() {
    let mut e = guest();
    for i in phdrs_of_type(&e, object::elf::PT_NOTE) {
        edit_phdr(&mut e, i, |p| p.p_type = u32v(object::elf::PT_NULL));
    }
    assert_eq!(refused(&e), LoadError::MissingNote);
}

#[test]
fn note_with_reserved_bits() {
    let mut e = guest();
    let mut n = note(&e);
    n.reserved = 1;
    set_note(&mut e, n);
    assert!(matches!(refused(&e), LoadError::BadNote(_)));
}

#[test]
fn version_negotiation() {
    let base = note(TEST_GUEST);
    assert_eq!(base.major, ABI_MAJOR);
    assert_eq!(base.minor, ABI_MINOR);

    // Another major version: refused, naming both versions.
    let mut e = guest();
    set_note(
        &mut e,
        AbiNote {
            major: ABI_MAJOR + 1,
            ..base
        },
    );
    let err = refused(&e);
    assert!(
        matches!(err, LoadError::VersionMismatch { kernel_major, .. } if kernel_major == ABI_MAJOR + 1)
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{}.", ABI_MAJOR + 1))
            && msg.contains(&format!("{ABI_MAJOR}.{ABI_MINOR}")),
        "{msg}"
    );

    // A newer minor version than the hypervisor's: refused.
    let mut e = guest();
    set_note(
        &mut e,
        AbiNote {
            minor: ABI_MINOR + 1,
            ..base
        },
    );
    assert!(
        matches!(refused(&e), LoadError::VersionMismatch { kernel_minor, .. } if kernel_minor == ABI_MINOR + 1)
    );

    // A feature the hypervisor lacks: refused, naming it and what is available.
    for f in [Features(1 << 10), Features(1 << 40)] {
        assert!(!FEATURES.contains(f));
        let mut e = guest();
        set_note(
            &mut e,
            AbiNote {
                required_features: base.required_features | f.bits(),
                ..base
            },
        );
        let err = refused(&e);
        assert_eq!(
            err,
            LoadError::MissingFeatures {
                missing: f,
                available: FEATURES
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{:#x}", f.bits()))
                && msg.contains(&format!("{:#x}", FEATURES.bits())),
            "{msg}"
        );
    }

    // Every feature the hypervisor has: accepted.
    let mut e = guest();
    set_note(
        &mut e,
        AbiNote {
            required_features: FEATURES.bits(),
            ..base
        },
    );
    KernelImage::from_elf(&e)
        .unwrap()
        .check_abi(FEATURES)
        .unwrap();
}
