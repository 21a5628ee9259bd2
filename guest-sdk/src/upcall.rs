//! The upcall interrupt (SPEC.md §8.6.1): an IDT gate for the vector the kernel
//! registers with `vcpu_op(VCPUOP_SET_UPCALL_VECTOR)`, whose handler runs
//! [`evtchn::dispatch`] and ends with the x2APIC EOI.
//!
//! ```no_run
//! use guest_sdk::evtchn::{self, Port};
//! use guest_sdk::upcall;
//!
//! fn on_event(port: Port) {
//!     // runs in the upcall interrupt, with interrupts off
//!     let _ = port;
//! }
//!
//! fn take_events_on(port: Port) -> Result<(), guest_sdk::Error> {
//!     evtchn::set_handler(port, on_event)?;
//!     upcall::install(upcall::DEFAULT_VECTOR)?;
//!     upcall::enable_interrupts();
//!     Ok(())
//! }
//! ```
//!
//! The gate saves every caller-saved general-purpose register (guests are soft-float:
//! no SSE state to save), aligns the stack, clears RFLAGS.DF and calls the dispatcher
//! on the interrupted stack (no IST), so the kernel stack needs room for a handler on
//! top of whatever it is doing.
//!
//! Everything here runs at CPL 0 (`lidt`, `sti`, `rdmsr`/`wrmsr` of x2APIC MSRs).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use hv_abi::hypercall::{
    UPCALL_VECTOR_MAX, UPCALL_VECTOR_MIN, VCPUOP_SET_UPCALL_VECTOR, X2APIC_EOI_MSR,
};
use hv_abi::{Errno, Op};

use crate::arch::{IdtEntry, RFLAGS_IF};
use crate::error::{check, Error};
use crate::evtchn;
use crate::hypercall::hypercall3;
use crate::user::Idt;

/// The x2APIC ID register (read-only): the APIC id, which hv makes the vCPU index.
pub const X2APIC_ID_MSR: u32 = 0x802;

/// A vector for kernels without their own preference (high priority class).
pub const DEFAULT_VECTOR: u8 = 0xF3;

/// The SDK's own IDT, used by [`install`]: only the upcall gate is present.
static SDK_IDT: Idt = Idt::new();

/// Upcall interrupts taken (all vCPUs).
static UPCALLS: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// The interrupt gate's entry point (defined below in assembly).
    fn hv_sdk_upcall_entry();
}

core::arch::global_asm!(
    ".pushsection .text.hv_sdk_upcall, \"ax\"",
    ".global hv_sdk_upcall_entry",
    "hv_sdk_upcall_entry:",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push rbp",
    // The System V ABI wants RSP 16-byte aligned at the call and DF clear.
    "    mov rbp, rsp",
    "    and rsp, -16",
    "    cld",
    "    call {handler}",
    "    mov rsp, rbp",
    "    pop rbp",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    iretq",
    ".popsection",
    handler = sym upcall_handler,
);

/// What the gate calls: dispatch this vCPU's events, then EOI.
extern "C" fn upcall_handler() {
    UPCALLS.fetch_add(1, Ordering::Relaxed);
    evtchn::dispatch(current_vcpu());
    eoi();
}

/// The vCPU this code runs on: its x2APIC id (hv gives vCPU *n* APIC id *n*). One
/// `rdmsr`, handled inside KVM.
#[inline]
pub fn current_vcpu() -> u32 {
    let lo: u32;
    // SAFETY: reading the x2APIC ID MSR has no side effect; hv enables every vCPU's
    // local APIC in x2APIC mode at creation (SPEC §8.6.1).
    unsafe {
        asm!("rdmsr", in("ecx") X2APIC_ID_MSR, out("eax") lo, out("edx") _,
             options(nomem, nostack, preserves_flags));
    }
    lo
}

/// Signals end of interrupt to this vCPU's local APIC (`wrmsr` of 0 to
/// [`X2APIC_EOI_MSR`]). The upcall gate does it; a kernel with its own gate calls it
/// last.
#[inline]
pub fn eoi() {
    // SAFETY: an x2APIC EOI write only ends the in-service interrupt (none: no effect).
    unsafe {
        asm!("wrmsr", in("ecx") X2APIC_EOI_MSR, in("eax") 0u32, in("edx") 0u32,
             options(nomem, nostack, preserves_flags));
    }
}

/// The address of the upcall interrupt gate's entry point, for a kernel that puts the
/// gate in its own IDT: `IdtEntry::interrupt_gate(upcall::entry_point(), 0)`.
pub fn entry_point() -> u64 {
    hv_sdk_upcall_entry as *const () as u64
}

/// `vcpu_op(VCPUOP_SET_UPCALL_VECTOR, vcpu, vector)`: upcalls for `vcpu` arrive as
/// interrupt `vector` (`0x20..=0xFE`), or not at all with 0.
pub fn set_upcall_vector(vcpu: u32, vector: u8) -> Result<(), Error> {
    // SAFETY: no pointer; the interrupt only arrives through a gate the caller set up
    // (or is dropped by the APIC while RFLAGS.IF = 0).
    let ret = unsafe {
        hypercall3(
            Op::VcpuOp,
            VCPUOP_SET_UPCALL_VECTOR,
            u64::from(vcpu),
            u64::from(vector),
        )
    };
    check(ret).map(|_| ())
}

fn check_vector(vector: u8) -> Result<(), Error> {
    let v = u64::from(vector);
    if !(UPCALL_VECTOR_MIN..=UPCALL_VECTOR_MAX).contains(&v) {
        return Err(Error::Errno(Errno::EINVAL));
    }
    Ok(())
}

/// Puts the upcall gate at `vector` of `idt`, loads `idt` on this vCPU and registers
/// `vector` for it. Interrupts stay as they are (see [`enable_interrupts`]).
///
/// # Safety
///
/// As for [`Idt::set`] and [`Idt::load`]: nothing else may be changing `idt`, and
/// every other gate of it that can be delivered must be valid.
pub unsafe fn install_in(idt: &'static Idt, vector: u8) -> Result<(), Error> {
    check_vector(vector)?;
    // SAFETY: the caller guarantees exclusive use of the table; the gate is the SDK's
    // entry point, a valid CPL-0 interrupt handler.
    unsafe {
        idt.set(vector, IdtEntry::interrupt_gate(entry_point(), 0));
        idt.load();
    }
    set_upcall_vector(current_vcpu(), vector)
}

/// Loads the SDK's own IDT, holding only the upcall gate at `vector`, on this vCPU and
/// registers `vector` for it. Call it on each vCPU that takes upcalls (same vector);
/// a kernel with its own IDT uses [`install_in`] instead (this replaces any IDT the
/// kernel loaded: exceptions then have no handler and shut the domain down).
pub fn install(vector: u8) -> Result<(), Error> {
    // SAFETY: the SDK's IDT is only written here, always with the same gate at a given
    // vector (a concurrent install on another vCPU writes identical bytes); its other
    // gates are missing, and only the registered upcall vector is delivered to them.
    unsafe { install_in(&SDK_IDT, vector) }
}

/// Number of upcall interrupts taken so far (all vCPUs).
pub fn upcalls_taken() -> u64 {
    UPCALLS.load(Ordering::Relaxed)
}

/// Sets RFLAGS.IF: upcalls (and nothing else, unless the kernel programmed other
/// interrupt sources) can arrive from the next instruction on.
#[inline]
pub fn enable_interrupts() {
    // SAFETY: only vectors the kernel routed reach the CPU (hv raises only the
    // registered upcall vector); the instruction itself touches no memory. Not
    // `nomem`: handlers change memory once interrupts are on.
    unsafe { asm!("sti", options(nostack)) };
}

/// Clears RFLAGS.IF.
#[inline]
pub fn disable_interrupts() {
    // SAFETY: masking interrupts at CPL 0 is always allowed.
    unsafe { asm!("cli", options(nostack)) };
}

/// True if RFLAGS.IF is set.
#[inline]
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & RFLAGS_IF != 0
}

/// Runs `f` with interrupts disabled, restoring RFLAGS.IF afterwards.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    let was = interrupts_enabled();
    if was {
        disable_interrupts();
    }
    let r = f();
    if was {
        enable_interrupts();
    }
    r
}

/// Clears vCPU `vcpu`'s `upcall_mask` and, if events arrived while it was set
/// (`upcall_pending`: no interrupt was raised for them), dispatches them now with
/// interrupts disabled. Returns the number of events handled.
pub fn unmask_upcalls(vcpu: u32) -> u32 {
    evtchn::set_upcall_mask(vcpu, false);
    if evtchn::upcall_pending(vcpu) {
        without_interrupts(|| evtchn::dispatch(vcpu))
    } else {
        0
    }
}
