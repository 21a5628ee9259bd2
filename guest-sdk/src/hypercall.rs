//! The raw hypercall primitive.
//!
//! A hypercall is the single instruction `out 0xE8, al`
//! ([`hv_abi::hypercall::HYPERCALL_PORT`]) executed at CPL 0, with the operation number
//! in RAX and up to five arguments in RDI, RSI, RDX, R10 and R8. The result comes back
//! in RAX: non-negative on success, `-errno` on failure (see [`crate::check`]). The
//! hypervisor preserves every other register.
//!
//! These functions are `unsafe` because the hypervisor reads and writes guest memory at
//! the guest-physical addresses passed in arguments, and some operations (starting a
//! vCPU, changing page tables) change the machine state behind the compiler's back.
//! Prefer the typed wrappers of [`crate::ops`].

use core::arch::asm;

use hv_abi::hypercall::HYPERCALL_PORT;
use hv_abi::Op;

/// Anything that names a hypercall operation: an [`Op`] or a raw `u64` (for example to
/// exercise an operation number the ABI does not define).
pub trait OpNumber: Copy {
    /// The number placed in RAX.
    fn number(self) -> u64;
}

impl OpNumber for Op {
    #[inline(always)]
    fn number(self) -> u64 {
        self as u64
    }
}

impl OpNumber for u64 {
    #[inline(always)]
    fn number(self) -> u64 {
        self
    }
}

/// Issues hypercall `op` with five arguments and returns RAX.
///
/// # Safety
///
/// The caller must be running at CPL 0 (at CPL 3 the hypercall fails with `-EPERM`
/// unless the domain allows user hypercalls), and the arguments must be valid for the
/// operation: any guest-physical address passed must designate memory the hypervisor
/// may read or write for the duration of the call without breaking Rust's aliasing
/// rules, and operations that change execution state (vCPU start, page tables,
/// shutdown) must leave the kernel in a state it can continue from.
#[inline(always)]
pub unsafe fn hypercall5(op: impl OpNumber, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // `out` to the hypercall port traps to the hypervisor, which preserves every
    // register but RAX; without `nomem` the compiler assumes memory is read and written
    // (the hypervisor accesses guest memory); no stack is used.
    // SAFETY: the caller upholds the contract above; see the note just before.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            options(nostack),
        );
    }
    ret
}

/// Issues hypercall `op` with no argument. See [`hypercall5`].
///
/// # Safety
///
/// As for [`hypercall5`].
#[inline(always)]
pub unsafe fn hypercall0(op: impl OpNumber) -> i64 {
    let ret: i64;
    // SAFETY: as in `hypercall5`; the argument registers are unused by the operation.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            options(nostack),
        );
    }
    ret
}

/// Issues hypercall `op` with one argument. See [`hypercall5`].
///
/// # Safety
///
/// As for [`hypercall5`].
#[inline(always)]
pub unsafe fn hypercall1(op: impl OpNumber, a1: u64) -> i64 {
    let ret: i64;
    // SAFETY: as in `hypercall5`.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            in("rdi") a1,
            options(nostack),
        );
    }
    ret
}

/// Issues hypercall `op` with two arguments. See [`hypercall5`].
///
/// # Safety
///
/// As for [`hypercall5`].
#[inline(always)]
pub unsafe fn hypercall2(op: impl OpNumber, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: as in `hypercall5`.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            in("rdi") a1,
            in("rsi") a2,
            options(nostack),
        );
    }
    ret
}

/// Issues hypercall `op` with three arguments. See [`hypercall5`].
///
/// # Safety
///
/// As for [`hypercall5`].
#[inline(always)]
pub unsafe fn hypercall3(op: impl OpNumber, a1: u64, a2: u64, a3: u64) -> i64 {
    let ret: i64;
    // SAFETY: as in `hypercall5`.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            options(nostack),
        );
    }
    ret
}

/// Issues hypercall `op` with four arguments. See [`hypercall5`].
///
/// # Safety
///
/// As for [`hypercall5`].
#[inline(always)]
pub unsafe fn hypercall4(op: impl OpNumber, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let ret: i64;
    // SAFETY: as in `hypercall5`.
    unsafe {
        asm!(
            "out {port}, al",
            port = const HYPERCALL_PORT,
            inlateout("rax") op.number() => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            options(nostack),
        );
    }
    ret
}
