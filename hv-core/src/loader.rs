//! Kernel images: ELF parsing and validation, ABI note negotiation.
//!
//! A kernel file is hostile input. Every rule here turns a violation into a
//! [`LoadError`]; nothing is written to guest memory until the whole image checks out
//! ([`KernelImage::load_into`] re-checks bounds against the domain's RAM).

use hv_abi::note::{AbiNote, NOTE_NAME, NOTE_TYPE_ABI};
use hv_abi::{layout, Features, ABI_MAJOR, ABI_MINOR, PAGE_SIZE};
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;
use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

use crate::memory::DomainMemory;

/// Largest kernel file accepted.
pub const MAX_KERNEL_FILE: usize = 64 << 20;
/// Largest number of program headers accepted.
pub const MAX_PHDRS: usize = 64;

/// Why a kernel image was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoadError {
    /// The file is larger than [`MAX_KERNEL_FILE`].
    #[error("kernel file is {0} bytes; the limit is {MAX_KERNEL_FILE}")]
    TooLarge(usize),
    /// Not an ELF file, or a malformed header.
    #[error("not a valid ELF file: {0}")]
    NotElf(String),
    /// ELF class is not 64-bit.
    #[error("ELF class is not 64-bit")]
    NotElf64,
    /// ELF data encoding is not little-endian.
    #[error("ELF file is not little-endian")]
    NotLittleEndian,
    /// e_machine is not x86-64.
    #[error("ELF machine is {0}, expected x86-64 ({em})", em = elf::EM_X86_64)]
    WrongMachine(u16),
    /// e_type is not ET_EXEC.
    #[error("ELF type is {0}, expected an executable (ET_EXEC = 2); position-independent kernels are not supported{hint}", hint = if *.0 == 3 { " (this is ET_DYN: link with guest-sdk's link.ld and --no-pie, SPEC 3.2)" } else { "" })]
    NotExecutable(u16),
    /// Too many program headers.
    #[error("ELF has {0} program headers; the limit is {MAX_PHDRS}")]
    TooManySegments(usize),
    /// No PT_LOAD segment.
    #[error("ELF has no loadable segment")]
    NoLoadableSegments,
    /// A segment's file range lies outside the file.
    #[error("segment {index}: file range {offset:#x}+{size:#x} is outside the file")]
    SegmentFileRange {
        /// Program header index.
        index: usize,
        /// p_offset.
        offset: u64,
        /// p_filesz.
        size: u64,
    },
    /// p_filesz > p_memsz.
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSizeExceedsMemSize {
        /// Program header index.
        index: usize,
        /// p_filesz.
        filesz: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// p_paddr + p_memsz overflows.
    #[error("segment {index}: address {paddr:#x} + size {memsz:#x} overflows")]
    SegmentOverflow {
        /// Program header index.
        index: usize,
        /// p_paddr.
        paddr: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// A segment starts below [`layout::KERNEL_MIN_GPA`].
    #[error("segment {index} at {paddr:#x} is below the kernel area, which starts at {min:#x}", min = layout::KERNEL_MIN_GPA)]
    SegmentBelowKernelArea {
        /// Program header index.
        index: usize,
        /// p_paddr.
        paddr: u64,
    },
    /// A segment does not fit in the domain's RAM.
    #[error("segment {index} [{start:#x}, {end:#x}) does not fit in {ram:#x} bytes of RAM")]
    SegmentBeyondMemory {
        /// Program header index.
        index: usize,
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
        /// RAM size.
        ram: u64,
    },
    /// Two PT_LOAD segments overlap.
    #[error("segments {a} and {b} overlap")]
    Overlap {
        /// First segment index.
        a: usize,
        /// Second segment index.
        b: usize,
    },
    /// The entry point is not in an executable loaded segment.
    #[error("entry point {0:#x} is not inside an executable loaded segment")]
    BadEntry(u64),
    /// No hv ABI note.
    #[error("kernel has no hv ABI note (PT_NOTE named \"hv\", type {NOTE_TYPE_ABI}): it was not built for hv")]
    MissingNote,
    /// The note is malformed.
    #[error("hv ABI note is malformed: {0}")]
    BadNote(String),
    /// The kernel needs another major version or a newer minor version.
    #[error("kernel requires ABI {kernel_major}.{kernel_minor}, hypervisor implements {ABI_MAJOR}.{ABI_MINOR}")]
    VersionMismatch {
        /// The kernel's major.
        kernel_major: u16,
        /// The kernel's minor.
        kernel_minor: u16,
    },
    /// The kernel needs features the hypervisor lacks.
    #[error(
        "kernel requires features {missing}, which this hypervisor lacks (it has {available})"
    )]
    MissingFeatures {
        /// The missing bits.
        missing: Features,
        /// What the hypervisor has.
        available: Features,
    },
}

/// One loadable segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub gpa: u64,
    /// Bytes from the file.
    pub data: Vec<u8>,
    /// Size in memory (the rest is zero).
    pub mem_size: u64,
    /// Executable segment.
    pub executable: bool,
}

/// A validated kernel image, ready to be loaded into a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelImage {
    /// Entry point (guest-physical = virtual in the boot address space).
    pub entry: u64,
    /// Loadable segments, sorted by address, non-overlapping.
    pub segments: Vec<Segment>,
    /// The ABI the kernel declared.
    pub note: AbiNote,
}

impl KernelImage {
    /// Parses and validates an ELF kernel.
    pub fn from_elf(bytes: &[u8]) -> Result<Self, LoadError> {
        if bytes.len() > MAX_KERNEL_FILE {
            return Err(LoadError::TooLarge(bytes.len()));
        }
        // The ELF structures are read in place and need 8-byte alignment; a file
        // embedded with include_bytes! or sliced from a larger buffer may lack it.
        let mut aligned: Vec<u64> = Vec::new();
        let bytes = if bytes.as_ptr().align_offset(8) != 0 {
            aligned.resize(bytes.len().div_ceil(8), 0);
            let buf = &mut aligned.as_mut_bytes()[..bytes.len()];
            buf.copy_from_slice(bytes);
            &*buf
        } else {
            bytes
        };
        if bytes.len() < 16 || bytes[..4] != elf::ELFMAG {
            return Err(LoadError::NotElf("bad magic".into()));
        }
        if bytes[4] != elf::ELFCLASS64 {
            return Err(LoadError::NotElf64);
        }
        if bytes[5] != elf::ELFDATA2LSB {
            return Err(LoadError::NotLittleEndian);
        }
        let header = elf::FileHeader64::<Endianness>::parse(bytes)
            .map_err(|e| LoadError::NotElf(e.to_string()))?;
        let endian = header
            .endian()
            .map_err(|e| LoadError::NotElf(e.to_string()))?;
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(LoadError::WrongMachine(machine));
        }
        let etype = header.e_type(endian);
        if etype != elf::ET_EXEC {
            return Err(LoadError::NotExecutable(etype));
        }
        let phnum = header
            .phnum(endian, bytes)
            .map_err(|e| LoadError::NotElf(e.to_string()))?;
        if phnum > MAX_PHDRS {
            return Err(LoadError::TooManySegments(phnum));
        }
        let phdrs = header
            .program_headers(endian, bytes)
            .map_err(|e| LoadError::NotElf(e.to_string()))?;

        let mut segments: Vec<(usize, Segment)> = Vec::new();
        let mut note = None;
        for (index, ph) in phdrs.iter().enumerate() {
            match ph.p_type(endian) {
                elf::PT_LOAD => {
                    let offset = ph.p_offset(endian);
                    let filesz = ph.p_filesz(endian);
                    let memsz = ph.p_memsz(endian);
                    let paddr = ph.p_paddr(endian);
                    if memsz == 0 {
                        continue;
                    }
                    let data =
                        file_range(bytes, offset, filesz).ok_or(LoadError::SegmentFileRange {
                            index,
                            offset,
                            size: filesz,
                        })?;
                    if filesz > memsz {
                        return Err(LoadError::FileSizeExceedsMemSize {
                            index,
                            filesz,
                            memsz,
                        });
                    }
                    if paddr.checked_add(memsz).is_none() {
                        return Err(LoadError::SegmentOverflow {
                            index,
                            paddr,
                            memsz,
                        });
                    }
                    if paddr < layout::KERNEL_MIN_GPA {
                        return Err(LoadError::SegmentBelowKernelArea { index, paddr });
                    }
                    segments.push((
                        index,
                        Segment {
                            gpa: paddr,
                            data: data.to_vec(),
                            mem_size: memsz,
                            executable: ph.p_flags(endian) & elf::PF_X != 0,
                        },
                    ));
                }
                elf::PT_NOTE => {
                    let notes = ph
                        .notes(endian, bytes)
                        .map_err(|e| LoadError::BadNote(e.to_string()))?;
                    let Some(mut notes) = notes else { continue };
                    while let Some(n) = notes
                        .next()
                        .map_err(|e| LoadError::BadNote(e.to_string()))?
                    {
                        if n.name() == NOTE_NAME && n.n_type(endian) == NOTE_TYPE_ABI {
                            if note.is_some() {
                                return Err(LoadError::BadNote("more than one hv ABI note".into()));
                            }
                            let desc = n.desc();
                            let parsed = AbiNote::read_from_bytes(desc).map_err(|_| {
                                LoadError::BadNote(format!(
                                    "descriptor is {} bytes, expected {}",
                                    desc.len(),
                                    core::mem::size_of::<AbiNote>()
                                ))
                            })?;
                            if parsed.reserved != 0 {
                                return Err(LoadError::BadNote(
                                    "reserved field is not zero".into(),
                                ));
                            }
                            note = Some(parsed);
                        }
                    }
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(LoadError::NoLoadableSegments);
        }
        segments.sort_by_key(|(_, s)| s.gpa);
        for w in segments.windows(2) {
            let (ia, a) = &w[0];
            let (ib, b) = &w[1];
            if a.gpa + a.mem_size > b.gpa {
                return Err(LoadError::Overlap {
                    a: (*ia).min(*ib),
                    b: (*ia).max(*ib),
                });
            }
        }
        let entry = header.e_entry(endian);
        let entry_ok = segments
            .iter()
            .any(|(_, s)| s.executable && entry >= s.gpa && entry < s.gpa + s.mem_size);
        if !entry_ok {
            return Err(LoadError::BadEntry(entry));
        }
        let note = note.ok_or(LoadError::MissingNote)?;
        Ok(KernelImage {
            entry,
            segments: segments.into_iter().map(|(_, s)| s).collect(),
            note,
        })
    }

    /// Checks the kernel's ABI note against what this hypervisor implements.
    pub fn check_abi(&self, available: Features) -> Result<(), LoadError> {
        if self.note.major != ABI_MAJOR || self.note.minor > ABI_MINOR {
            return Err(LoadError::VersionMismatch {
                kernel_major: self.note.major,
                kernel_minor: self.note.minor,
            });
        }
        let missing = Features(self.note.required_features).missing_from(available);
        if !missing.is_empty() {
            return Err(LoadError::MissingFeatures { missing, available });
        }
        Ok(())
    }

    /// Lowest address of the image.
    pub fn start(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.gpa)
    }

    /// One past the highest address of the image.
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.gpa + s.mem_size)
    }

    /// Checks that the image fits in `ram_bytes` of RAM.
    pub fn check_fits(&self, ram_bytes: u64) -> Result<(), LoadError> {
        for (index, s) in self.segments.iter().enumerate() {
            let end = s.gpa + s.mem_size;
            if end > ram_bytes {
                return Err(LoadError::SegmentBeyondMemory {
                    index,
                    start: s.gpa,
                    end,
                    ram: ram_bytes,
                });
            }
        }
        Ok(())
    }

    /// Copies the segments into guest RAM (memory is fresh, so the rest is zero).
    /// Returns the first page-aligned free address after the image.
    pub fn load_into(&self, mem: &DomainMemory) -> Result<u64, LoadError> {
        self.check_fits(mem.ram_bytes())?;
        for (index, s) in self.segments.iter().enumerate() {
            mem.write_ram(s.gpa, &s.data)
                .map_err(|_| LoadError::SegmentBeyondMemory {
                    index,
                    start: s.gpa,
                    end: s.gpa + s.mem_size,
                    ram: mem.ram_bytes(),
                })?;
        }
        Ok(self.end().div_ceil(PAGE_SIZE) * PAGE_SIZE)
    }

    /// Builds an image from raw machine code placed at `gpa` (entry at `gpa`), for
    /// benchmarks and tests that need a guest without an ELF file. The note declares
    /// this hypervisor's version and no required features.
    pub fn from_code(gpa: u64, code: &[u8]) -> Self {
        KernelImage {
            entry: gpa,
            segments: vec![Segment {
                gpa,
                data: code.to_vec(),
                mem_size: code.len() as u64,
                executable: true,
            }],
            note: AbiNote {
                major: ABI_MAJOR,
                minor: ABI_MINOR,
                reserved: 0,
                required_features: 0,
            },
        }
    }
}

fn file_range(bytes: &[u8], offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(size).ok()?;
    bytes.get(start..start.checked_add(len)?)
}
