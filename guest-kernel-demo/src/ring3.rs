//! Running a closure in ring 3 on the boot address space, and handing out free RAM.
//!
//! The boot page tables map all RAM user-accessible, so ring 3 can run the kernel's own
//! code and touch its data: [`run`] enters ring 3 at a trampoline that calls the
//! closure and ends with `ud2`, which brings the CPU back to ring 0 (through
//! `guest_sdk::user`'s exception gates) and out of [`run`]. Ring 3 runs at native speed
//! where ring 0 is emulated (KVM PVM): long data loops belong there. Ring 3 may make
//! hypercalls only if the domain allows user hypercalls; it must not execute
//! privileged instructions (`rdmsr`, `cli`, ...), which fault and end the run.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::user::{self, Idt, UserExit};

struct Global<T>(UnsafeCell<T>);
// SAFETY: the demo runs on vCPU 0 only; ring 3 and ring 0 never run at once.
unsafe impl<T> Sync for Global<T> {}

const STACK_BYTES: usize = 64 << 10;
#[repr(C, align(16))]
struct Stack([u8; STACK_BYTES]);

static IDT: Idt = Idt::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
static EXCEPTION_STACK: Global<Stack> = Global(UnsafeCell::new(Stack([0; STACK_BYTES])));
static USER_STACK: Global<Stack> = Global(UnsafeCell::new(Stack([0; STACK_BYTES])));
/// The closure the trampoline calls: a `*mut &mut dyn FnMut()` set by [`run`].
static JOB: Global<usize> = Global(UnsafeCell::new(0));
/// Set by the trampoline when the closure returned.
static RETURNED: AtomicBool = AtomicBool::new(false);

/// Ring 3's entry point: calls the job, then traps back with `ud2`.
extern "C" fn trampoline() -> ! {
    // SAFETY: `run` stored a pointer to a live `&mut dyn FnMut()` (on its own stack
    // frame, suspended until ring 3 traps) before entering ring 3.
    unsafe {
        let job = *JOB.0.get() as *mut &mut dyn FnMut();
        (*job)();
        RETURNED.store(true, Ordering::Release);
        core::arch::asm!("ud2", options(noreturn));
    }
}

/// Runs `f` in ring 3. `Ok` if it returned; `Err` with the exception that stopped it
/// otherwise (a fault inside `f`).
pub fn run(mut f: impl FnMut()) -> Result<(), UserExit> {
    if !INSTALLED.swap(true, Ordering::AcqRel) {
        let top = EXCEPTION_STACK.0.get() as u64 + STACK_BYTES as u64;
        // SAFETY: the IDT and the exception stack are reserved for ring-3 runs; the boot
        // TSS is loaded and mapped writable.
        unsafe { user::install(&IDT, top) };
    }
    let mut job: &mut dyn FnMut() = &mut f;
    // SAFETY: single vCPU; the pointer stays valid while ring 3 runs (this frame is
    // suspended inside `run_user` until ring 3 traps).
    unsafe { *JOB.0.get() = &mut job as *mut &mut dyn FnMut() as usize };
    RETURNED.store(false, Ordering::Release);
    let stack_top = USER_STACK.0.get() as u64 + STACK_BYTES as u64;
    // SAFETY: the trampoline and everything it reaches are user-accessible on the boot
    // page tables (all RAM is U/S); the user stack is reserved for ring 3.
    let exit = unsafe { user::run_user(trampoline as *const () as u64, stack_top - 8) };
    // SAFETY: as above; ring 3 has stopped.
    unsafe { *JOB.0.get() = 0 };
    if RETURNED.load(Ordering::Acquire) && exit.vector == 6 {
        Ok(())
    } else {
        Err(exit)
    }
}

/// Free RAM pages from `start_info.first_free_gpa` on, handed out once each.
pub struct Frames {
    next: u64,
    end: u64,
}

impl Frames {
    /// The free RAM start_info describes.
    pub fn new(si: &StartInfo) -> Frames {
        Frames {
            next: si.first_free_gpa.div_ceil(PAGE_SIZE) * PAGE_SIZE,
            end: si.nr_pages * PAGE_SIZE,
        }
    }

    /// `pages` consecutive zeroed pages (RAM starts zeroed and is handed out once),
    /// or `None` if RAM runs out.
    pub fn alloc(&mut self, pages: u64) -> Option<u64> {
        let at = self.next;
        let end = at.checked_add(pages.checked_mul(PAGE_SIZE)?)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }
}
