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
/// sets the loaded TSS's RSP0 (the boot TSS, or the SDK's own after
/// [`allow_user_ports`] switched to it) to `exception_stack_top` (16-byte aligned).
///
/// # Safety
/// `idt` must not be in use; the exception stack must be reserved for exceptions; the
/// kernel must run on the boot GDT, whose TSS slot describes the loaded TSS (the boot
/// TSS at `layout::TSS_GPA`, or the SDK's), mapped writable.
pub unsafe fn install(idt: &'static Idt, exception_stack_top: u64) {
    // SAFETY: the caller guarantees the IDT is not in use; the table of stub
    // addresses is static data emitted above.
    unsafe {
        let t = &mut *idt.0.get();
        let stubs = &*core::ptr::addr_of!(hv_user_trap_table);
        for (v, stub) in stubs.iter().enumerate() {
            t[v] = IdtEntry::interrupt_gate(*stub, 0);
        }
        core::ptr::write_unaligned((current_tss().0 + 4) as *mut u64, exception_stack_top);
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

/// Ports the SDK's own TSS covers ([`allow_user_ports`]): `0..SDK_TSS_PORTS`.
pub const SDK_TSS_PORTS: u32 = 0x800;
/// Size of the 64-bit TSS proper; the I/O permission bitmap follows it.
const TSS_BASE_BYTES: usize = 104;
/// The SDK's TSS: the TSS proper, a bitmap for [`SDK_TSS_PORTS`] ports, and the byte
/// of ones the CPU may read past the last port.
const SDK_TSS_BYTES: usize = TSS_BASE_BYTES + SDK_TSS_PORTS as usize / 8 + 1;

#[repr(C, align(16))]
struct SdkTss(UnsafeCell<[u8; SDK_TSS_BYTES]>);
// SAFETY: written once by `switch_tss` on vCPU 0 before it is loaded; the CPU reads it
// afterwards (single-vCPU use, as the rest of this module).
unsafe impl Sync for SdkTss {}
static SDK_TSS: SdkTss = SdkTss(UnsafeCell::new([0; SDK_TSS_BYTES]));

/// The base and limit the boot GDT's TSS descriptor gives (the loaded TSS as long as
/// the kernel runs on the boot GDT).
fn current_tss() -> (u64, u64) {
    use hv_abi::layout::{GDT_GPA, SEL_TSS};
    let at = GDT_GPA + u64::from(SEL_TSS);
    // SAFETY: the boot GDT is identity-mapped RAM (SPEC §4); the two 8-byte halves of
    // the TSS descriptor are plain reads.
    let (lo, hi) = unsafe {
        (
            core::ptr::read_volatile(at as *const u64),
            core::ptr::read_volatile((at + 8) as *const u64),
        )
    };
    let base = (lo >> 16) & 0xFF_FFFF | ((lo >> 56) & 0xFF) << 24 | (hi & 0xFFFF_FFFF) << 32;
    let limit = (lo & 0xFFFF) | ((lo >> 48) & 0xF) << 16;
    (base, limit)
}

/// Ports the loaded TSS's bitmap covers, keeping the byte the CPU reads past the last
/// port: (bitmap address, ports).
fn covered_ports() -> (u64, u32) {
    let (base, limit) = current_tss();
    // SAFETY: the I/O map base field of the loaded TSS, identity-mapped RAM.
    let map_base = unsafe { core::ptr::read_volatile((base + 102) as *const u16) };
    let bytes = (limit + 1)
        .saturating_sub(u64::from(map_base))
        .saturating_sub(1);
    (
        base + u64::from(map_base),
        (bytes * 8).min(u64::from(u32::MAX)) as u32,
    )
}

/// Loads the SDK's TSS: a copy of the loaded one (RSP0 and the rest) with a bitmap for
/// [`SDK_TSS_PORTS`] ports (the old bitmap's bits kept, every other port denied),
/// described by the boot GDT's TSS slot and loaded with `ltr`.
///
/// # Safety
/// As for [`allow_user_ports`]; call once.
unsafe fn switch_tss() {
    use hv_abi::layout::{GDT_GPA, SEL_TSS};
    let (old, _) = current_tss();
    let (old_map, old_ports) = covered_ports();
    let t = SDK_TSS.0.get().cast::<u8>();
    // SAFETY: the SDK's TSS is not loaded yet (nothing reads it); the old TSS and its
    // bitmap are readable RAM within its limit.
    unsafe {
        core::ptr::copy_nonoverlapping(old as *const u8, t, TSS_BASE_BYTES);
        core::ptr::write_unaligned(t.add(102).cast::<u16>(), TSS_BASE_BYTES as u16);
        core::ptr::write_bytes(t.add(TSS_BASE_BYTES), 0xFF, SDK_TSS_BYTES - TSS_BASE_BYTES);
        core::ptr::copy_nonoverlapping(
            old_map as *const u8,
            t.add(TSS_BASE_BYTES),
            (old_ports / 8).min(SDK_TSS_PORTS / 8) as usize,
        );
    }
    let base = crate::virt_to_phys(t);
    let limit = (SDK_TSS_BYTES - 1) as u64;
    // Present, DPL 0, type 9 (available 64-bit TSS), byte granularity.
    let lo = (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56;
    let hi = base >> 32;
    let at = GDT_GPA + u64::from(SEL_TSS);
    // SAFETY: the boot GDT's TSS slot (two 8-byte entries) in writable RAM; `ltr` loads
    // the new descriptor (and marks it busy), the old TSS is no longer used.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, lo);
        core::ptr::write_volatile((at + 8) as *mut u64, hi);
        core::arch::asm!("ltr {0:x}", in(reg) SEL_TSS, options(nostack, preserves_flags));
    }
}

/// Ports that [`allow_user_ports`] could not open to ring 3: beyond the TSS's I/O
/// permission bitmap.
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
            "ports {:#x}..{:#x} are beyond the TSS's I/O bitmap (it covers ports below {:#x})",
            self.first,
            u32::from(self.first) + u32::from(self.count),
            self.covered
        )
    }
}

/// Lets CPL 3 use I/O ports `first..first + count` by clearing their bits in the
/// loaded TSS's I/O permission bitmap. If that bitmap does not reach them (the boot
/// TSS's may cover only the ports below the hypercall port's byte: SPEC.md §4), first
/// switches to the SDK's own TSS, a copy with a bitmap for ports `0..`[`SDK_TSS_PORTS`]
/// (the boot GDT's TSS slot is rewritten and `ltr` loads it). Fails, changing nothing,
/// for ports beyond [`SDK_TSS_PORTS`]. Ring 3 then reaches the device behind the ports
/// directly (on hv: each access is an exit the hypervisor handles).
///
/// # Safety
/// The kernel must run on the boot GDT (at `GDT_GPA`) with TR = `SEL_TSS`, both
/// mapped writable at their physical addresses, on one vCPU (other vCPUs keep the TSS
/// they loaded; their RSP0 is not carried over); and ring 3 must be trusted with the
/// devices behind the ports.
pub unsafe fn allow_user_ports(first: u16, count: u16) -> Result<(), PortsNotCovered> {
    let end = u32::from(first) + u32::from(count);
    if end > SDK_TSS_PORTS {
        return Err(PortsNotCovered {
            first,
            count,
            covered: SDK_TSS_PORTS,
        });
    }
    if end > covered_ports().1 {
        // SAFETY: forwarded from the caller.
        unsafe { switch_tss() };
    }
    let (bitmap, covered) = covered_ports();
    if end > covered {
        return Err(PortsNotCovered {
            first,
            count,
            covered,
        });
    }
    for p in u32::from(first)..end {
        let at = (bitmap + u64::from(p / 8)) as *mut u8;
        // SAFETY: the byte is inside the loaded TSS's limit (checked); the CPU reads it
        // on the next ring-3 port access.
        unsafe { core::ptr::write_volatile(at, core::ptr::read_volatile(at) & !(1 << (p % 8))) };
    }
    Ok(())
}
