//! The few x86-64 privileged operations a small kernel needs: IDT, control registers,
//! port I/O and dropping to ring 3.
//!
//! Everything here executes privileged instructions and must run at CPL 0 (except
//! [`outb`]/[`inb`] with a sufficient IOPL).

use core::arch::asm;

use hv_abi::layout::{SEL_KERNEL_CODE, SEL_USER_CODE, SEL_USER_DATA};

/// CR0.WP: when set, ring 0 honours read-only page mappings.
pub const CR0_WP: u64 = 1 << 16;

/// RFLAGS bit 1, which is always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS.IF: interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.IOPL = 3: port I/O allowed at every privilege level.
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// One 16-byte entry of the 64-bit IDT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl IdtEntry {
    /// A not-present entry: delivering its vector raises `#NP` (or `#GP`).
    pub const MISSING: IdtEntry = IdtEntry {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present 64-bit interrupt gate (interrupts disabled on entry) to `handler` in
    /// the boot kernel code segment ([`SEL_KERNEL_CODE`]), without IST, callable by
    /// `int n` from privilege levels up to `dpl` (0 to 3; 3 for system calls).
    pub const fn interrupt_gate(handler: u64, dpl: u8) -> IdtEntry {
        IdtEntry {
            offset_low: handler as u16,
            selector: SEL_KERNEL_CODE,
            ist: 0,
            // P | DPL | type 0xE (64-bit interrupt gate).
            type_attr: 0x80 | ((dpl & 3) << 5) | 0x0E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }

    /// The handler address the entry points to.
    pub const fn handler(&self) -> u64 {
        self.offset_low as u64 | (self.offset_mid as u64) << 16 | (self.offset_high as u64) << 32
    }
}

/// The operand of `lidt`/`lgdt`: limit (size in bytes minus one) and linear base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed)]
pub struct DescriptorTablePointer {
    /// Size of the table in bytes, minus one.
    pub limit: u16,
    /// Linear (virtual) address of the table.
    pub base: u64,
}

impl DescriptorTablePointer {
    /// The pointer describing `entries`.
    pub fn for_idt(entries: &'static [IdtEntry]) -> Self {
        let bytes = core::mem::size_of_val(entries);
        DescriptorTablePointer {
            limit: bytes.saturating_sub(1).min(u16::MAX as usize) as u16,
            base: entries.as_ptr().addr() as u64,
        }
    }
}

/// Loads the IDT register (`lidt`).
///
/// # Safety
///
/// `ptr` must describe a table that stays valid (and whose handlers are correct entry
/// points) for as long as interrupts or exceptions may be delivered through it. A
/// table too small for a vector (down to limit 0) makes that vector's delivery fault,
/// up to a triple fault.
#[inline]
pub unsafe fn load_idt(ptr: &DescriptorTablePointer) {
    // SAFETY: `lidt` reads the 10-byte operand; the caller vouches for the table.
    unsafe {
        asm!("lidt [{}]", in(reg) ptr as *const DescriptorTablePointer, options(readonly, nostack, preserves_flags));
    }
}

/// Reads CR0.
#[inline]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effect (at CPL 0; at CPL 3 it faults, which is
    // not undefined behaviour).
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
///
/// Changing CR0 changes how memory is accessed (paging, protection, caching); the
/// caller must keep the kernel able to run (for example, never clear PG or PE).
#[inline]
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: the caller vouches for the new value. Not `nomem`: it changes how
    // memory behaves.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Reads CR3 (the physical address of the page-table root, plus flags).
#[inline]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes `value` to I/O port `port` (`out dx, al`).
///
/// # Safety
///
/// Port I/O can do anything the device behind the port does; on hv an `out` to port
/// [`HYPERCALL_PORT`](hv_abi::hypercall::HYPERCALL_PORT) is a hypercall (with
/// whatever RAX and the argument registers hold) and to an unknown port crashes the
/// domain.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Reads a byte from I/O port `port` (`in al, dx`).
///
/// # Safety
///
/// As for [`outb`]: on hv, reading an unknown port, or the hypercall port, crashes
/// the domain.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, preserves_flags)) };
    v
}

/// Writes the 32-bit `value` to I/O port `port` (`out dx, eax`).
///
/// # Safety
///
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Reads 32 bits from I/O port `port` (`in eax, dx`).
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: the caller vouches for the port.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) };
    v
}

/// Drops to ring 3 at `rip` with stack `rsp` and flags `rflags`, using the boot GDT's
/// user selectors (CS = [`SEL_USER_CODE`], SS = [`SEL_USER_DATA`]), via `iretq`.
///
/// `rflags` should include [`RFLAGS_RESERVED`]; add [`RFLAGS_IOPL3`] to let ring 3 use
/// port I/O (hypercalls included). Ring 3 comes back to ring 0 only through an
/// interrupt or exception, on the stack in the TSS's `rsp0`.
///
/// # Safety
///
/// `rip` must be user-accessible code that never returns, `rsp` a user-accessible
/// stack it owns, and the IDT and TSS must be ready to take whatever ring 3 does.
pub unsafe fn enter_user(rip: u64, rsp: u64, rflags: u64) -> ! {
    // SAFETY: builds the five-word `iretq` frame (SS, RSP, RFLAGS, CS, RIP) on the
    // current stack and returns to ring 3; the caller vouches for the target.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) SEL_USER_DATA as u64,
            rsp = in(reg) rsp,
            rflags = in(reg) rflags,
            cs = in(reg) SEL_USER_CODE as u64,
            rip = in(reg) rip,
            options(noreturn),
        );
    }
}
