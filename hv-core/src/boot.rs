//! The boot environment: initial page tables, GDT and TSS, start_info, CPU state.
//!
//! See SPEC.md ("Boot state"). The host builds a flat identity map in the page-table
//! pool: 4 KiB pages, except RAM above [`layout::BOOT_SMALL_PAGES_END`], which kernels
//! built for ABI 1.3 or later get in 2 MiB pages ([`RamMapping`]), so that the boot
//! tables of a big domain take a few MiB instead of 2 MiB per GiB of RAM. Entries carry
//! Accessed (and Dirty on writable leaves) already, so that a CPU walking tables in a
//! read-only memslot never needs to write them.

use hv_abi::layout::{self, GDT_ENTRIES};
use hv_abi::mmu::{LARGE_PAGE_SIZE, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W};
use hv_abi::start_info::{StartInfo, START_INFO_MAGIC};
use hv_abi::{Features, ABI_MAJOR, ABI_MINOR, PAGE_SIZE};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use zerocopy::FromZeros;

use crate::gpa::pool_gpa_for;
use crate::memory::{DomainMemory, MemoryError};

/// CR0 at entry: PE | MP | ET | NE | WP | PG.
pub const BOOT_CR0: u64 = 0x8001_0033;
/// CR4 at entry: PAE | PGE | OSFXSR | OSXMMEXCPT.
pub const BOOT_CR4: u64 = 0x6A0;
/// EFER at entry: SCE | LME | LMA | NXE.
pub const BOOT_EFER: u64 = 0xD01;
/// Size of the 64-bit TSS proper; the I/O permission bitmap follows it.
pub const TSS_BASE_SIZE: u64 = 104;
/// Bytes of I/O permission bitmap: ports 0 to the hypercall port's byte, plus the
/// terminating 0xFF byte the architecture requires.
pub const TSS_IOMAP_BYTES: u64 = (hv_abi::hypercall::HYPERCALL_PORT as u64 / 8) + 2;
/// Size of the boot TSS in bytes, bitmap included.
pub const TSS_SIZE: u64 = TSS_BASE_SIZE + TSS_IOMAP_BYTES;

const ENTRIES: usize = 512;

/// Errors while building the boot environment.
#[derive(Debug, Error)]
pub enum BootError {
    /// The command line breaks the ABI's rule ([`crate::params`]).
    #[error("{0}")]
    Cmdline(#[from] crate::params::ParamError),
    /// The boot page tables do not fit in the pool.
    #[error("boot page tables need {need} frames but the pool has {have}")]
    PoolTooSmall {
        /// Frames needed.
        need: u64,
        /// Frames available.
        have: u64,
    },
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// How the boot tables map RAM (SPEC 4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamMapping {
    /// All RAM with 4 KiB pages: the boot state of ABI 1.0 to 1.2, kept for kernels
    /// whose ELF note asks for one of those versions.
    Small,
    /// 4 KiB pages below [`layout::BOOT_SMALL_PAGES_END`]; above it, 2 MiB pages for
    /// every whole 2 MiB of RAM and 4 KiB pages for a last partial one (ABI 1.3 on).
    Large,
}

impl RamMapping {
    /// The mapping for a kernel whose ELF note asks for ABI minor `minor`.
    pub fn for_kernel_minor(minor: u16) -> RamMapping {
        if minor >= layout::BOOT_LARGE_PAGES_MINOR {
            RamMapping::Large
        } else {
            RamMapping::Small
        }
    }

    /// RAM mapped with 2 MiB pages, `[start, end)` (empty if none).
    pub fn large_range(self, ram_bytes: u64) -> (u64, u64) {
        let start = layout::BOOT_SMALL_PAGES_END;
        match self {
            RamMapping::Large if ram_bytes > start => (
                start,
                start + (ram_bytes - start) / LARGE_PAGE_SIZE * LARGE_PAGE_SIZE,
            ),
            _ => (0, 0),
        }
    }
}

/// Page-table frames needed to identity-map RAM of `ram_bytes` and a pool of
/// `pool_frames` frames placed after it, plus the (empty) L1 tables that cover the
/// grant window after the pool.
pub fn boot_pt_frames(ram_bytes: u64, pool_frames: u64) -> u64 {
    boot_pt_frames_with(ram_bytes, pool_frames, &[], RamMapping::Large)
}

/// [`boot_pt_frames`] with passthrough regions of `region_sizes` bytes mapped too (at
/// [`crate::gpa::region_gpas`]), and RAM mapped as `mapping` says.
pub fn boot_pt_frames_with(
    ram_bytes: u64,
    pool_frames: u64,
    region_sizes: &[u64],
    mapping: RamMapping,
) -> u64 {
    let pool = pool_gpa_for(ram_bytes);
    let pool_end = pool + pool_frames * PAGE_SIZE;
    let window = crate::gpa::window_gpa_for(pool_end);
    let (large, large_end) = mapping.large_range(ram_bytes);
    // (start, end, mapped with 2 MiB pages: needs no L1 tables), in ascending order.
    let mut ranges = if large < large_end {
        vec![
            (0, large, false),
            (large, large_end, true),
            (large_end, ram_bytes, false),
        ]
    } else {
        vec![(0, ram_bytes, false)]
    };
    ranges.push((pool, pool_end, false));
    ranges.push((window, window + crate::gpa::WINDOW_BYTES, false));
    let gpas = crate::gpa::region_gpas(pool_end, region_sizes);
    ranges.extend(
        gpas.iter()
            .zip(region_sizes)
            .map(|(g, s)| (*g, g + s, false)),
    );
    let mut total = 0;
    // Tables at level n cover 4 KiB << (9 * n) bytes each (L1: 2 MiB, L2: 1 GiB, ...).
    for shift in [21u32, 30, 39] {
        let mut last: Option<u64> = None;
        for &(start, end, in_large_pages) in &ranges {
            if end <= start || (shift == 21 && in_large_pages) {
                continue;
            }
            let first = start >> shift;
            let lastidx = (end - 1) >> shift;
            let mut n = lastidx - first + 1;
            if last == Some(first) {
                n -= 1;
            }
            total += n;
            last = Some(lastidx);
        }
    }
    total + 1 // the L4
}

/// Sizes the pool: boot tables plus `extra` frames for the guest.
pub fn pool_frames_for(ram_bytes: u64, extra: u64) -> (u64, u64) {
    pool_frames_for_regions(ram_bytes, extra, &[], RamMapping::Large)
}

/// [`pool_frames_for`] for a domain with passthrough regions of `region_sizes` bytes
/// and RAM mapped as `mapping` says.
pub fn pool_frames_for_regions(
    ram_bytes: u64,
    extra: u64,
    region_sizes: &[u64],
    mapping: RamMapping,
) -> (u64, u64) {
    let mut boot = 1;
    loop {
        let pool = boot + extra;
        let need = boot_pt_frames_with(ram_bytes, pool, region_sizes, mapping);
        if need == boot {
            return (pool, boot);
        }
        boot = need;
    }
}

/// Builds page tables in host memory, allocating frames from the pool in order.
struct PtBuilder {
    pool_gpa: u64,
    frames: Vec<[u64; ENTRIES]>,
}

impl PtBuilder {
    fn new(pool_gpa: u64) -> Self {
        PtBuilder {
            pool_gpa,
            frames: vec![[0; ENTRIES]],
        }
    }

    fn gpa_of(&self, idx: usize) -> u64 {
        self.pool_gpa + idx as u64 * PAGE_SIZE
    }

    fn child(&mut self, table: usize, index: usize) -> usize {
        let e = self.frames[table][index];
        if e & PTE_P != 0 {
            return crate::conv::usize_from(
                ((e & hv_abi::mmu::PTE_ADDR_MASK) - self.pool_gpa) / PAGE_SIZE,
            );
        }
        self.frames.push([0; ENTRIES]);
        let idx = self.frames.len() - 1;
        self.frames[table][index] = self.gpa_of(idx) | PTE_P | PTE_W | PTE_U | PTE_A;
        idx
    }

    /// Creates the (empty) L1 tables that cover `[start, end)`, leaving every leaf
    /// entry not present.
    fn cover(&mut self, start: u64, end: u64) {
        let mut va = start;
        while va < end {
            let l3 = self.child(0, ((va >> 39) & 511) as usize);
            let l2 = self.child(l3, ((va >> 30) & 511) as usize);
            self.child(l2, ((va >> 21) & 511) as usize);
            va = ((va >> 21) + 1) << 21;
        }
    }

    /// Identity-maps `[start, end)` (2 MiB-aligned) with 2 MiB pages: L2 entries with
    /// PS and leaf flags `flags`.
    fn map_large(&mut self, start: u64, end: u64, flags: u64) {
        let mut va = start;
        while va < end {
            let l3 = self.child(0, ((va >> 39) & 511) as usize);
            let l2 = self.child(l3, ((va >> 30) & 511) as usize);
            self.frames[l2][((va >> 21) & 511) as usize] = va | flags | PTE_PS;
            va += LARGE_PAGE_SIZE;
        }
    }

    /// Identity-maps `[start, end)` (page-aligned) with leaf flags `flags`.
    fn map(&mut self, start: u64, end: u64, flags: u64) {
        let mut va = start;
        while va < end {
            let l3 = self.child(0, ((va >> 39) & 511) as usize);
            let l2 = self.child(l3, ((va >> 30) & 511) as usize);
            let l1 = self.child(l2, ((va >> 21) & 511) as usize);
            let chunk_end = ((va >> 21) + 1) << 21;
            let stop = chunk_end.min(end);
            let table = &mut self.frames[l1];
            while va < stop {
                table[((va >> 12) & 511) as usize] = va | flags;
                va += PAGE_SIZE;
            }
        }
    }
}

/// What the boot environment looks like, for start_info and the vCPU state.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// Guest-physical address of the boot PML4.
    pub pt_base: u64,
    /// Frames used by the boot tables.
    pub nr_pt_frames: u64,
}

/// Writes the boot page tables into the pool.
pub fn build_page_tables(mem: &DomainMemory) -> Result<BootInfo, BootError> {
    build_page_tables_with(mem, &[], RamMapping::Large)
}

/// [`build_page_tables`] that also identity-maps passthrough regions, given as
/// (guest-physical address, bytes), writable and user-accessible like RAM, and maps
/// RAM as `mapping` says.
pub fn build_page_tables_with(
    mem: &DomainMemory,
    regions: &[(u64, u64)],
    mapping: RamMapping,
) -> Result<BootInfo, BootError> {
    let pool = mem.pool_gpa();
    let mut b = PtBuilder::new(pool);
    let ram = PTE_P | PTE_W | PTE_U | PTE_A | PTE_D;
    let (large, large_end) = mapping.large_range(mem.ram_bytes());
    if large < large_end {
        b.map(PAGE_SIZE, large, ram);
        b.map_large(large, large_end, ram);
        b.map(large_end, mem.ram_bytes(), ram);
    } else {
        b.map(PAGE_SIZE, mem.ram_bytes(), ram);
    }
    b.map(pool, mem.pool_end(), PTE_P | PTE_U | PTE_A);
    let window = crate::gpa::window_gpa_for(mem.pool_end());
    b.cover(window, window + crate::gpa::WINDOW_BYTES);
    for (gpa, size) in regions {
        b.map(*gpa, gpa + size, PTE_P | PTE_W | PTE_U | PTE_A | PTE_D);
    }
    let need = b.frames.len() as u64;
    if need > mem.pool_frames() {
        return Err(BootError::PoolTooSmall {
            need,
            have: mem.pool_frames(),
        });
    }
    // Frame by frame, with no second copy of the tables; the pool starts zeroed, so
    // empty tables (those of the grant window) need no write.
    let mut bytes = [0u8; crate::conv::usize_from(PAGE_SIZE)];
    for (i, f) in b.frames.iter().enumerate() {
        if f.iter().all(|e| *e == 0) {
            continue;
        }
        for (chunk, e) in bytes.chunks_exact_mut(8).zip(f) {
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        mem.write_any(b.gpa_of(i), &bytes)?;
    }
    Ok(BootInfo {
        pt_base: pool,
        nr_pt_frames: need,
    })
}

/// The 8-byte GDT descriptors of the boot GDT (the TSS takes the last two).
pub fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let base = layout::TSS_GPA;
    let limit = TSS_SIZE - 1;
    // 64-bit available TSS (type 9), present, DPL 0.
    let tss_low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    let tss_high = base >> 32;
    [
        0,
        0x00AF_9B00_0000_FFFF, // 0x08 kernel code, 64-bit
        0x00CF_9300_0000_FFFF, // 0x10 kernel data
        0x00CF_F300_0000_FFFF, // 0x18 user data, DPL 3
        0x00AF_FB00_0000_FFFF, // 0x20 user code, 64-bit, DPL 3
        tss_low,               // 0x28 TSS
        tss_high,
    ]
}

/// Writes the GDT and the TSS.
pub fn write_gdt_tss(mem: &DomainMemory) -> Result<(), BootError> {
    let mut gdt = Vec::new();
    for e in gdt_entries() {
        gdt.extend_from_slice(&e.to_le_bytes());
    }
    mem.write_ram(layout::GDT_GPA, &gdt)?;
    let mut tss = [0u8; crate::conv::usize_from(TSS_SIZE)];
    tss[4..12].copy_from_slice(&layout::BOOT_STACK_TOP.to_le_bytes()); // rsp0
    tss[102..104].copy_from_slice(&const { crate::conv::imm16(TSS_BASE_SIZE) }.to_le_bytes()); // I/O map base
                                                                                               // I/O permission bitmap: every port denied (bit set) except the hypercall port,
                                                                                               // so a hypercall from CPL 3 reaches hv (which refuses it unless the domain allows
                                                                                               // user hypercalls) instead of faulting in the guest. Ports past the bitmap are
                                                                                               // denied by the CPU.
    let port = hv_abi::hypercall::HYPERCALL_PORT as usize;
    let iomap = &mut tss[crate::conv::usize_from(TSS_BASE_SIZE)..];
    iomap.fill(0xFF);
    iomap[port / 8] &= !(1 << (port % 8));
    mem.write_ram(layout::TSS_GPA, &tss)?;
    Ok(())
}

/// Inputs of start_info that are not in memory.
#[derive(Clone, Debug)]
pub struct StartInfoParams<'a> {
    /// Domain id.
    pub domid: u32,
    /// vCPUs.
    pub nr_vcpus: u32,
    /// SIF_* flags.
    pub flags: u32,
    /// Hypervisor features.
    pub features: Features,
    /// Kernel span.
    pub kernel: (u64, u64),
    /// First free address after the kernel.
    pub first_free: u64,
    /// Command line.
    pub cmdline: &'a str,
}

/// Writes the start_info page.
pub fn write_start_info(
    mem: &DomainMemory,
    boot: &BootInfo,
    p: &StartInfoParams<'_>,
) -> Result<(), BootError> {
    crate::params::check_cmdline(p.cmdline)?;
    let mut si = StartInfo::new_zeroed();
    si.magic = START_INFO_MAGIC;
    si.abi_major = ABI_MAJOR;
    si.abi_minor = ABI_MINOR;
    si.flags = p.flags;
    si.features = p.features.bits();
    si.domid = p.domid;
    si.nr_vcpus = p.nr_vcpus;
    si.nr_pages = mem.ram_bytes() / PAGE_SIZE;
    si.shared_info_gpa = layout::SHARED_INFO_GPA;
    si.pt_base_gpa = boot.pt_base;
    si.nr_pt_frames = boot.nr_pt_frames;
    si.pt_pool_gpa = mem.pool_gpa();
    si.pt_pool_frames = mem.pool_frames();
    si.kernel_start_gpa = p.kernel.0;
    si.kernel_end_gpa = p.kernel.1;
    si.first_free_gpa = p.first_free;
    si.stack_top_gpa = layout::BOOT_STACK_TOP;
    if p.features.contains(Features::GNTTAB) {
        si.grant_table_gpa = layout::GRANT_TABLE_GPA;
        si.grant_table_frames = layout::GRANT_TABLE_FRAMES;
        si.grant_window_frames = layout::GRANT_WINDOW_FRAMES;
        si.grant_window_gpa = crate::gpa::window_gpa_for(mem.pool_end());
    }
    si.cmdline_len = u32::try_from(p.cmdline.len())
        .map_err(|_| crate::params::ParamError::CmdlineTooLong(p.cmdline.len()))?;
    si.cmdline[..p.cmdline.len()].copy_from_slice(p.cmdline.as_bytes());
    mem.write_obj(layout::START_INFO_GPA, &si)?;
    Ok(())
}

fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: layout::SEL_KERNEL_CODE,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: layout::SEL_KERNEL_DATA,
        type_: 3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// Sets the boot system registers on top of a vCPU's current ones.
pub fn boot_sregs(mut s: kvm_sregs, cr3: u64) -> kvm_sregs {
    s.cs = code_segment();
    let d = data_segment();
    s.ds = d;
    s.es = d;
    s.ss = d;
    s.fs = d;
    s.gs = d;
    s.tr = kvm_segment {
        base: layout::TSS_GPA,
        limit: const { crate::conv::imm16(TSS_SIZE - 1) }.into(),
        selector: layout::SEL_TSS,
        type_: 11, // busy 64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.gdt.base = layout::GDT_GPA;
    s.gdt.limit = const { crate::conv::imm16(GDT_ENTRIES as u64 * 8 - 1) };
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = BOOT_CR0;
    s.cr3 = cr3;
    s.cr4 = BOOT_CR4;
    s.efer = BOOT_EFER;
    s
}

/// The same state in ring 3: user code and data selectors with DPL 3.
pub fn user_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = kvm_segment {
        selector: layout::SEL_USER_CODE,
        dpl: 3,
        ..code_segment()
    };
    let d = kvm_segment {
        selector: layout::SEL_USER_DATA,
        dpl: 3,
        ..data_segment()
    };
    s.ds = d;
    s.es = d;
    s.ss = d;
    s.fs = d;
    s.gs = d;
    s
}

/// Boot general-purpose registers: RIP, RSP and RDI.
pub fn boot_regs(rip: u64, rsp: u64, rdi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rdi,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn frame_count_matches_builder() {
        for mapping in [RamMapping::Small, RamMapping::Large] {
            for (ram, extra) in [
                (2u64 << 20, 0u64),
                (64 << 20, 256),
                (3 << 20, 1),
                (GIB, 512),
                (GIB + 4096, 7),
                (4 * GIB, 3),
                (4 * GIB + 4096, 3),
                (4 * GIB + (2 << 20), 3),
                (8 * GIB + (1 << 20), 256),
                (64 * GIB, 256),
                (256 * GIB, 256),
            ] {
                let (pool, boot) = pool_frames_for_regions(ram, extra, &[], mapping);
                let mut b = PtBuilder::new(pool_gpa_for(ram));
                let (large, large_end) = mapping.large_range(ram);
                if large < large_end {
                    b.map(PAGE_SIZE, large, PTE_P);
                    b.map_large(large, large_end, PTE_P);
                    b.map(large_end, ram, PTE_P);
                } else {
                    b.map(PAGE_SIZE, ram, PTE_P);
                }
                let pg = pool_gpa_for(ram);
                b.map(pg, pg + pool * PAGE_SIZE, PTE_P);
                let w = crate::gpa::window_gpa_for(pg + pool * PAGE_SIZE);
                assert_eq!(w % layout::GRANT_WINDOW_ALIGN, 0);
                b.cover(w, w + crate::gpa::WINDOW_BYTES);
                assert_eq!(
                    b.frames.len() as u64,
                    boot,
                    "{mapping:?} ram {ram:#x} extra {extra}"
                );
                assert_eq!(pool, boot + extra);
            }
        }
    }

    /// The entry that maps `va` under `root` and its level (1: 4 KiB page, 2: 2 MiB
    /// page), or `None` if `va` is not mapped.
    fn leaf(mem: &DomainMemory, root: u64, va: u64) -> Option<(u64, u8)> {
        let mut table = root;
        for (shift, level) in [(39u32, 4u8), (30, 3), (21, 2), (12, 1)] {
            let mut e = [0u8; 8];
            mem.guest_memory_read(table + ((va >> shift) & 511) * 8, &mut e)
                .unwrap();
            let e = u64::from_le_bytes(e);
            if e & PTE_P == 0 {
                return None;
            }
            if level == 1 || (level == 2 && e & PTE_PS != 0) {
                return Some((e, level));
            }
            assert_eq!(
                e & 0xFFF,
                PTE_P | PTE_W | PTE_U | PTE_A,
                "table entry {e:#x}"
            );
            table = e & hv_abi::mmu::PTE_ADDR_MASK;
        }
        unreachable!()
    }

    #[test]
    fn big_ram_is_mapped_with_2mib_pages_above_4gib() {
        let rw = PTE_P | PTE_W | PTE_U | PTE_A | PTE_D;
        for (ram, mapping) in [
            (8 * GIB + (1 << 20), RamMapping::Large),
            (8 * GIB + (1 << 20), RamMapping::Small),
            (4 * GIB, RamMapping::Large),
            (256 * GIB, RamMapping::Large),
        ] {
            let (pool, boot) = pool_frames_for_regions(ram, 16, &[], mapping);
            let mem = DomainMemory::new("t", ram, pool).unwrap();
            let bi = build_page_tables_with(&mem, &[], mapping).unwrap();
            assert_eq!(bi.nr_pt_frames, boot);
            let big = mapping == RamMapping::Large && ram > 4 * GIB;
            let small = |va: u64| Some((va | rw, 1));
            assert_eq!(leaf(&mem, bi.pt_base, 0), None, "page 0");
            for va in [
                PAGE_SIZE,
                0x10_0000,
                3 * GIB + 0x1234_5000,
                4 * GIB - PAGE_SIZE,
            ] {
                assert_eq!(leaf(&mem, bi.pt_base, va), small(va), "{ram:#x} {va:#x}");
            }
            // Whole 2 MiB of RAM above 4 GiB: one L2 entry each (Large); a last partial
            // 2 MiB, and everything for Small, in 4 KiB pages.
            let mut va = 4 * GIB;
            while va + (2 << 20) <= ram {
                for off in [0, 0x1F_F000] {
                    let want = if big {
                        Some((va | rw | PTE_PS, 2))
                    } else {
                        small(va + off)
                    };
                    assert_eq!(leaf(&mem, bi.pt_base, va + off), want, "{ram:#x} {va:#x}");
                }
                va += if big { 2 << 20 } else { 61 << 20 };
            }
            if ram % (2 << 20) != 0 {
                for va in [ram / (2 << 20) * (2 << 20), ram - PAGE_SIZE] {
                    assert_eq!(leaf(&mem, bi.pt_base, va), small(va), "tail {va:#x}");
                }
            }
            if mem.pool_gpa() > ram {
                assert_eq!(
                    leaf(&mem, bi.pt_base, ram),
                    None,
                    "{ram:#x}: gap before the pool"
                );
            }
            // The pool: read-only 4 KiB pages.
            let last = mem.pool_end() - PAGE_SIZE;
            assert_eq!(
                leaf(&mem, bi.pt_base, last),
                Some((last | PTE_P | PTE_U | PTE_A, 1))
            );
            // The validator accepts the tables as built.
            let mut mmu = crate::mmu::Mmu::new(crate::mmu::Layout {
                phys_bits: 46,
                ram_frames: ram / PAGE_SIZE,
                pool_base: mem.pool_gpa(),
                pool_frames: mem.pool_frames(),
            });
            mmu.pin(&mut crate::mmu::PoolAccess(&mem), 4, bi.pt_base)
                .unwrap();
        }
        // 256 GiB: a few thousand frames, not the 131,591 of 4 KiB pages throughout.
        let (_, large) = pool_frames_for_regions(256 * GIB, 256, &[], RamMapping::Large);
        let (_, small) = pool_frames_for_regions(256 * GIB, 256, &[], RamMapping::Small);
        assert!(large < 2400 && small > 131_000, "{large} {small}");
    }

    #[test]
    fn frame_count_with_regions_matches_builder() {
        let ram = 64 << 20;
        for sizes in [vec![4096u64], vec![2 << 20, 4096, 5 << 20], vec![1 << 30]] {
            let (pool, boot) = pool_frames_for_regions(ram, 16, &sizes, RamMapping::Large);
            let mem = DomainMemory::new("t", ram, pool).unwrap();
            let gpas = crate::gpa::region_gpas(mem.pool_end(), &sizes);
            let regions: Vec<(u64, u64)> = gpas.into_iter().zip(sizes.clone()).collect();
            let bi = build_page_tables_with(&mem, &regions, RamMapping::Large).unwrap();
            assert_eq!(bi.nr_pt_frames, boot, "{sizes:?}");
            // The last page of each region is mapped writable, user-accessible.
            for (gpa, size) in &regions {
                let va = gpa + size - PAGE_SIZE;
                let mut table = bi.pt_base;
                for shift in [39u32, 30, 21, 12] {
                    let mut e = [0u8; 8];
                    mem.guest_memory_read(table + ((va >> shift) & 511) * 8, &mut e)
                        .unwrap();
                    table = u64::from_le_bytes(e);
                    assert_eq!(table & (PTE_P | PTE_U), PTE_P | PTE_U);
                    table &= hv_abi::mmu::PTE_ADDR_MASK;
                }
                assert_eq!(table, va);
            }
        }
    }

    #[test]
    fn tss_io_bitmap_allows_only_the_hypercall_port() {
        let mem = DomainMemory::new("t", 4 << 20, 8).unwrap();
        write_gdt_tss(&mem).unwrap();
        let mut tss = [0u8; crate::conv::usize_from(TSS_SIZE)];
        mem.read_ram(layout::TSS_GPA, &mut tss).unwrap();
        let base = u16::from_le_bytes([tss[102], tss[103]]) as usize;
        let map = &tss[base..];
        for port in 0..(map.len() - 1) * 8 {
            let denied = map[port / 8] & (1 << (port % 8)) != 0;
            assert_eq!(
                denied,
                port != hv_abi::hypercall::HYPERCALL_PORT as usize,
                "port {port:#x}"
            );
        }
        assert_eq!(*map.last().unwrap(), 0xFF);
    }

    #[test]
    fn tss_descriptor() {
        let g = gdt_entries();
        assert_eq!(g[5] & 0xFFFF, TSS_SIZE - 1);
        assert_eq!((g[5] >> 16) & 0xFF_FFFF, layout::TSS_GPA);
        assert_eq!((g[5] >> 40) & 0xFF, 0x89);
    }
}
