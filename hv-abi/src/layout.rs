//! The guest-physical memory layout a domain boots with.
//!
//! ```text
//! 0x0000_0000  null page, never mapped
//! 0x0000_1000  boot GDT (0x1000) and TSS (0x1080)
//! 0x0000_2000  start_info page
//! 0x0000_3000  shared_info page
//! 0x0000_4000  device table (ABI 1.2)
//! 0x0000_5000  PV console page (ABI 1.2)
//! 0x0000_6000  reserved for the hypervisor (0x6000..0x10000)
//! 0x0001_0000  grant table, 4 frames (0x10000..0x14000; ABI 1.1)
//! 0x0001_4000  reserved for the hypervisor (0x14000..0x40000)
//! 0x0004_0000  boot stack, 256 KiB; RSP starts at 0x80000 - 8
//! 0x0008_0000  reserved (0x80000..0x100000)
//! 0x0010_0000  kernel image (ELF PT_LOAD segments, by physical address)
//!  ...         free RAM from start_info.first_free_gpa to nr_pages * 4096
//! pool         page-table pool: starts at RAM size rounded up to 2 MiB;
//!              its first start_info.nr_pt_frames frames hold the boot page tables
//! window       grant window (ABI 1.1): starts at the pool's end rounded up to 2 MiB;
//!              start_info.grant_window_frames frames where mapped grants appear
//! regions      passthrough regions (ABI 1.2): from the window's end rounded up to
//!              2 MiB, each region 2 MiB-aligned; the device table gives each one's GPA
//! ```
//!
//! The boot page tables identity-map (virtual = guest-physical) every RAM page except
//! the null page, writable, with U/S set; and every page-table pool frame read-only.

/// Guest-physical address of the boot GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the boot TSS: the 104-byte 64-bit TSS followed by an I/O
/// permission bitmap that allows only the hypercall port (135 bytes in all).
pub const TSS_GPA: u64 = 0x1080;
/// Guest-physical address of the start_info page ([`crate::start_info::StartInfo`]).
pub const START_INFO_GPA: u64 = 0x2000;
/// Guest-physical address of the shared_info page ([`crate::shared_info::SharedInfo`]).
pub const SHARED_INFO_GPA: u64 = 0x3000;
/// Guest-physical address of the device table ([`crate::device::DeviceEntry`]).
pub const DEVICE_TABLE_GPA: u64 = 0x4000;
/// Guest-physical address of the PV console page
/// ([`crate::device::ConsoleInterface`]).
pub const CONSOLE_PAGE_GPA: u64 = 0x5000;
/// Guest-physical address of the grant table (RAM the guest writes entries into).
pub const GRANT_TABLE_GPA: u64 = 0x1_0000;
/// Number of grant-table frames: 4 frames of 512 entries, 2048 grant references.
pub const GRANT_TABLE_FRAMES: u32 = 4;
/// The grant window starts at the pool's end rounded up to this alignment.
pub const GRANT_WINDOW_ALIGN: u64 = 2 << 20;
/// Number of frames in the grant window: the most grants a domain can map at once.
pub const GRANT_WINDOW_FRAMES: u32 = 1024;

/// Lowest address of the boot stack.
pub const BOOT_STACK_BOTTOM: u64 = 0x4_0000;
/// One past the highest address of the boot stack.
pub const BOOT_STACK_TOP: u64 = 0x8_0000;
/// Lowest guest-physical address a kernel segment may occupy.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;
/// The page-table pool starts at RAM size rounded up to this alignment.
pub const PT_POOL_ALIGN: u64 = 2 << 20;
/// The boot page tables of a kernel built for ABI 1.3 or later map RAM below this
/// address with 4 KiB pages and RAM above it with 2 MiB pages (SPEC 4.5); those of an
/// older kernel map all RAM with 4 KiB pages.
pub const BOOT_SMALL_PAGES_END: u64 = 4 << 30;
/// The first ABI minor version whose kernels get 2 MiB pages above
/// [`BOOT_SMALL_PAGES_END`] in their boot tables (from the ELF note's `minor`).
pub const BOOT_LARGE_PAGES_MINOR: u16 = 3;

/// Boot GDT selector: 64-bit kernel code (DPL 0).
pub const SEL_KERNEL_CODE: u16 = 0x08;
/// Boot GDT selector: kernel data (DPL 0).
pub const SEL_KERNEL_DATA: u16 = 0x10;
/// Boot GDT selector: user data (DPL 3), with RPL 3.
pub const SEL_USER_DATA: u16 = 0x1b;
/// Boot GDT selector: 64-bit user code (DPL 3), with RPL 3.
pub const SEL_USER_CODE: u16 = 0x23;
/// Boot GDT selector: the 64-bit TSS (two slots), loaded in TR.
pub const SEL_TSS: u16 = 0x28;
/// Number of 8-byte slots in the boot GDT (null, kcode, kdata, udata, ucode, tss x2).
pub const GDT_ENTRIES: usize = 7;

/// Start of the virtual range reserved for the hypervisor (PML4 slots 256-271, as in
/// Xen). Guests may not map it.
pub const HV_RESERVED_VA_START: u64 = 0xFFFF_8000_0000_0000;
/// One past the end of the hypervisor-reserved virtual range.
pub const HV_RESERVED_VA_END: u64 = 0xFFFF_8800_0000_0000;
