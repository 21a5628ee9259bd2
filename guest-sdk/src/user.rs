//! Running code in ring 3 and getting control back when it traps.
//!
//! [`install`] loads an IDT whose 32 exception vectors all lead back into [`run_user`]'s
//! caller, and points the TSS's RSP0 at a dedicated exception stack. [`run_user`]
//! enters ring 3 at a given RIP and RSP (interrupts off) and returns a [`UserExit`]
//! when ring 3 raises any exception: a ring-3 task "calls" the kernel with `ud2`, for
//! example (software interrupts from ring 3 are not delivered on every KVM host).
//!
//! Single vCPU: the saved kernel context and the exit record are global.

use core::cell::UnsafeCell;

use hv_abi::layout::TSS_GPA;

use crate::arch::{self, DescriptorTablePointer, IdtEntry};

/// Why ring 3 stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UserExit {
    /// Exception vector (6 for `ud2`, 13 for #GP, 14 for #PF, ...).
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CR2 (the faulting address for #PF).
    pub cr2: u64,
    /// CS at the exception: its low two bits are the privilege level that trapped.
    pub cs: u64,
}

struct Global<T>(UnsafeCell<T>);
// SAFETY: single-vCPU use only (documented above); the CPU is the other writer.
unsafe impl<T> Sync for Global<T> {}

#[no_mangle]
static HV_USER_KERNEL_RSP: Global<u64> = Global(UnsafeCell::new(0));
#[no_mangle]
static HV_USER_EXIT: Global<UserExit> = Global(UnsafeCell::new(UserExit {
    vector: 0,
    error: 0,
    rip: 0,
    cr2: 0,
    cs: 0,
}));

extern "C" {
    static hv_user_trap_table: [u64; 32];
    fn hv_run_user(rip: u64, rsp: u64);
}

core::arch::global_asm!(
    ".pushsection .text.hv_user, \"ax\"",
    ".global hv_run_user",
    "hv_run_user:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rip + HV_USER_KERNEL_RSP], rsp",
    "    push {udata}",
    "    push rsi",
    "    push 2",
    "    push {ucode}",
    "    push rdi",
    "    iretq",
    // Vectors without an error code push a zero one.
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "hv_user_trap_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp hv_user_trap",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "hv_user_trap_\\v:",
    "    push \\v",
    "    jmp hv_user_trap",
    ".endr",
    // Frame: vector, error, RIP, CS, RFLAGS, RSP, SS.
    "hv_user_trap:",
    "    mov rax, [rsp]",
    "    mov [rip + HV_USER_EXIT], rax",
    "    mov rax, [rsp + 8]",
    "    mov [rip + HV_USER_EXIT + 8], rax",
    "    mov rax, [rsp + 16]",
    "    mov [rip + HV_USER_EXIT + 16], rax",
    "    mov rax, cr2",
    "    mov [rip + HV_USER_EXIT + 24], rax",
    "    mov rax, [rsp + 24]",
    "    mov [rip + HV_USER_EXIT + 32], rax",
    "    mov rsp, [rip + HV_USER_KERNEL_RSP]",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".popsection",
    ".pushsection .rodata.hv_user, \"a\"",
    ".balign 8",
    ".global hv_user_trap_table",
    "hv_user_trap_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad hv_user_trap_\\v",
    ".endr",
    ".popsection",
    udata = const hv_abi::layout::SEL_USER_DATA as u64,
    ucode = const hv_abi::layout::SEL_USER_CODE as u64,
);

/// An interrupt descriptor table.
#[repr(C, align(16))]
pub struct Idt(UnsafeCell<[IdtEntry; 256]>);
// SAFETY: written by `install` before it is loaded; read by the CPU afterwards.
unsafe impl Sync for Idt {}

impl Idt {
    /// An IDT with every gate missing.
    pub const fn new() -> Self {
        Idt(UnsafeCell::new([IdtEntry::MISSING; 256]))
    }

    /// Sets gate `vector` to `entry`.
    ///
    /// # Safety
    /// No other code may access the table at the same time (the CPU only reads it, one
    /// 16-byte gate at a time, when it delivers that vector: do not change the gate of
    /// a vector that can be delivered meanwhile), and `entry` must be a valid gate for
    /// as long as the table is loaded.
    pub unsafe fn set(&self, vector: u8, entry: IdtEntry) {
        // SAFETY: the caller guarantees exclusive access to the table.
        unsafe { (*self.0.get())[vector as usize] = entry };
    }

    /// Loads this table into the IDT register (`lidt`, all 256 gates).
    ///
    /// # Safety
    /// Every gate that can be delivered from now on must be valid (missing gates fault
    /// on delivery), and the address space must keep the table mapped at the physical
    /// address [`crate::virt_to_phys`] gives for it.
    pub unsafe fn load(&'static self) {
        let idtr = DescriptorTablePointer {
            limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: crate::virt_to_phys(self.0.get()),
        };
        // SAFETY: the table is static; the caller vouches for its gates.
        unsafe { arch::load_idt(&idtr) };
    }
}

impl Default for Idt {
    fn default() -> Self {
        Self::new()
    }
}

/// Loads `idt` with the 32 exception vectors leading back to [`run_user`]'s caller and
/// sets the boot TSS's RSP0 to `exception_stack_top` (16-byte aligned).
///
/// # Safety
/// `idt` must not be in use; the exception stack must be reserved for exceptions; the
/// boot TSS (at `layout::TSS_GPA`) must be the loaded TSS and mapped writable.
pub unsafe fn install(idt: &'static Idt, exception_stack_top: u64) {
    // SAFETY: the caller guarantees the IDT is not in use; the table of stub
    // addresses is static data emitted above.
    unsafe {
        let t = &mut *idt.0.get();
        let stubs = &*core::ptr::addr_of!(hv_user_trap_table);
        for (v, stub) in stubs.iter().enumerate() {
            t[v] = IdtEntry::interrupt_gate(*stub, 0);
        }
        core::ptr::write_unaligned((TSS_GPA + 4) as *mut u64, exception_stack_top);
        let idtr = DescriptorTablePointer {
            limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: crate::virt_to_phys(idt.0.get()),
        };
        arch::load_idt(&idtr);
    }
}

/// Runs ring-3 code at `rip` with stack `rsp` until it raises an exception, and
/// returns what stopped it.
///
/// # Safety
/// [`install`] must have been called; `rip` and `rsp` must be mapped user-accessible in
/// the current address space, and ring 3 must not be able to reach kernel memory
/// through them.
pub unsafe fn run_user(rip: u64, rsp: u64) -> UserExit {
    // SAFETY: the caller guarantees the ring-3 side; `hv_run_user` saves the
    // callee-saved registers and stack pointer and returns here on the first exception.
    unsafe {
        hv_run_user(rip, rsp);
        *HV_USER_EXIT.0.get()
    }
}

/// Ports that [`allow_user_ports`] could not open to ring 3: the boot TSS's I/O
/// permission bitmap does not reach them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortsNotCovered {
    /// The first port asked for.
    pub first: u16,
    /// How many.
    pub count: u16,
    /// Ports `0..covered` are covered by the bitmap.
    pub covered: u32,
}

impl core::fmt::Display for PortsNotCovered {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ports {:#x}..{:#x} are beyond the boot TSS's I/O bitmap (it covers ports below {:#x})",
            self.first,
            u32::from(self.first) + u32::from(self.count),
            self.covered
        )
    }
}

/// Lets CPL 3 use I/O ports `first..first + count` by clearing their bits in the boot
/// TSS's I/O permission bitmap (SPEC.md §4: the TSS at `layout::TSS_GPA`, its limit in
/// the boot GDT's descriptor). Fails, changing nothing, if the bitmap (as far as the
/// TSS limit reaches, keeping the byte the CPU reads past the last port) does not cover
/// them all. Ring 3 then reaches the device behind the ports directly (on hv: each
/// access is an exit the hypervisor handles).
///
/// # Safety
/// The boot TSS must be the loaded TSS, at `TSS_GPA` with its descriptor at
/// `SEL_TSS` in the boot GDT at `GDT_GPA`, mapped writable; and ring 3 must be trusted
/// with the devices behind the ports.
pub unsafe fn allow_user_ports(first: u16, count: u16) -> Result<(), PortsNotCovered> {
    use hv_abi::layout::{GDT_GPA, SEL_TSS};
    // SAFETY: the caller guarantees the boot GDT and TSS are mapped where SPEC §4 puts
    // them; the descriptor and the map base are plain reads.
    let (desc, map_base) = unsafe {
        (
            core::ptr::read_volatile((GDT_GPA + u64::from(SEL_TSS)) as *const u64),
            core::ptr::read_volatile((TSS_GPA + 102) as *const u16),
        )
    };
    let limit = (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16;
    // Bitmap bytes within the limit, minus the one the CPU may read past the last port.
    let bytes = (limit + 1)
        .saturating_sub(u64::from(map_base))
        .saturating_sub(1);
    let covered = (bytes * 8).min(u64::from(u32::MAX)) as u32;
    let end = u32::from(first) + u32::from(count);
    if end > covered {
        return Err(PortsNotCovered {
            first,
            count,
            covered,
        });
    }
    let bitmap = TSS_GPA + u64::from(map_base);
    for p in u32::from(first)..end {
        let at = (bitmap + u64::from(p / 8)) as *mut u8;
        // SAFETY: the byte is inside the TSS limit (checked), in the boot TSS the
        // caller vouches for; the CPU reads it on the next ring-3 port access.
        unsafe { core::ptr::write_volatile(at, core::ptr::read_volatile(at) & !(1 << (p % 8))) };
    }
    Ok(())
}
