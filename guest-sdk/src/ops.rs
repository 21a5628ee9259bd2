//! Safe typed wrappers around the hypercalls of ABI v1 that the SDK covers.
//!
//! Every wrapper passes pointers through [`crate::virt_to_phys`], i.e. relies on the
//! boot identity map (virtual == guest-physical).

use core::hint::spin_loop;

use hv_abi::hypercall::{
    VcpuContext, CONSOLEIO_WRITE, CONSOLE_WRITE_MAX, VCPUOP_INITIALISE, VCPUOP_IS_UP, VCPUOP_UP,
    VERSION_FEATURES, VERSION_GET,
};
use hv_abi::sched::{SCHEDOP_SHUTDOWN, SCHEDOP_YIELD, SHUTDOWN_CRASH, SHUTDOWN_POWEROFF};
use hv_abi::{Features, Op};

use crate::error::{check, Error};
use crate::hypercall::{hypercall1, hypercall3};
use crate::virt_to_phys;

/// `version(VERSION_GET)`: the hypervisor's ABI version as `(major, minor)`.
#[inline]
pub fn version() -> Result<(u16, u16), Error> {
    // SAFETY: VERSION_GET takes no pointer and changes no state.
    let ret = unsafe { hypercall1(Op::Version, VERSION_GET) };
    let v = check(ret)?;
    Ok(((v >> 16) as u16, v as u16))
}

/// `version(VERSION_FEATURES)`: the features the hypervisor implements.
#[inline]
pub fn features() -> Result<Features, Error> {
    // SAFETY: VERSION_FEATURES takes no pointer and changes no state.
    let ret = unsafe { hypercall1(Op::Version, VERSION_FEATURES) };
    Ok(Features(check(ret)?))
}

/// `console_io(CONSOLEIO_WRITE)`: writes `bytes` to the domain's console and returns
/// the number of bytes written.
///
/// Splits the write into hypercalls of at most [`CONSOLE_WRITE_MAX`] bytes. An empty
/// slice makes no hypercall. Stops early (returning the count so far) if the
/// hypervisor reports writing nothing.
pub fn console_write(bytes: &[u8]) -> Result<usize, Error> {
    let mut rest = bytes;
    let mut written = 0;
    while !rest.is_empty() {
        let len = rest.len().min(CONSOLE_WRITE_MAX as usize);
        // SAFETY: the hypervisor only reads `len` bytes at the physical address of
        // `rest`, which is borrowed for the duration of the call and identity-mapped.
        let ret = unsafe {
            hypercall3(
                Op::ConsoleIo,
                CONSOLEIO_WRITE,
                len as u64,
                virt_to_phys(rest.as_ptr()),
            )
        };
        let done = (check(ret)? as usize).min(len);
        if done == 0 {
            break;
        }
        written += done;
        rest = rest.get(done..).unwrap_or(&[]);
    }
    Ok(written)
}

/// `sched_op(SCHEDOP_YIELD)`: gives up the physical CPU for a while.
#[inline]
pub fn sched_yield() -> Result<(), Error> {
    // SAFETY: SCHEDOP_YIELD takes no pointer; the vCPU resumes after the `out`.
    let ret = unsafe { hypercall1(Op::SchedOp, SCHEDOP_YIELD) };
    check(ret).map(|_| ())
}

/// `sched_op(SCHEDOP_SHUTDOWN, reason, code)`: stops the whole domain.
///
/// `reason` is one of [`hv_abi::sched`]'s `SHUTDOWN_*` values; `code` is the exit
/// status for [`SHUTDOWN_POWEROFF`] (at most
/// [`SHUTDOWN_CODE_MAX`](hv_abi::sched::SHUTDOWN_CODE_MAX)). If the hypervisor refuses
/// the request (bad reason, or a code above the maximum for any reason), falls back
/// to a crash shutdown with code 0; if even that returns, spins forever.
pub fn shutdown(reason: u64, code: u64) -> ! {
    // SAFETY: SCHEDOP_SHUTDOWN takes no pointer; on success it does not return.
    unsafe { hypercall3(Op::SchedOp, SCHEDOP_SHUTDOWN, reason, code) };
    if (reason, code) != (SHUTDOWN_CRASH, 0) {
        // SAFETY: as above.
        unsafe { hypercall3(Op::SchedOp, SCHEDOP_SHUTDOWN, SHUTDOWN_CRASH, 0) };
    }
    loop {
        spin_loop();
    }
}

/// Powers the domain off with exit status `code` (0 to 99; a larger code makes the
/// hypervisor refuse, and the domain then shuts down as crashed).
#[inline]
pub fn poweroff(code: u8) -> ! {
    shutdown(SHUTDOWN_POWEROFF, code as u64)
}

/// Shuts the domain down with reason crash.
#[inline]
pub fn crash() -> ! {
    shutdown(SHUTDOWN_CRASH, 0)
}

/// `vcpu_op(VCPUOP_INITIALISE, vcpu, ctx)`: sets the state vCPU `vcpu` starts with
/// when brought up by [`vcpu_up`]. Fails if the vCPU is already up.
///
/// The context is only recorded here; nothing runs until [`vcpu_up`].
pub fn vcpu_initialise(vcpu: u32, ctx: &VcpuContext) -> Result<(), Error> {
    // SAFETY: the hypervisor reads the 64-byte context at its physical address while
    // `ctx` is borrowed; recording a context does not start the vCPU.
    let ret = unsafe {
        hypercall3(
            Op::VcpuOp,
            VCPUOP_INITIALISE,
            vcpu as u64,
            virt_to_phys(ctx as *const VcpuContext),
        )
    };
    check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_UP, vcpu)`: starts an initialised vCPU. Fails with `EEXIST` if it
/// is already up.
///
/// # Safety
///
/// The context last given to [`vcpu_initialise`] for `vcpu` must describe a valid
/// entry point: `rip` a function that never returns (for example
/// `extern "C" fn(arg: u64) -> !`) and can run concurrently with the rest of the
/// kernel, `rsp` 8 bytes below a 16-byte-aligned address at the top of a stack that
/// the new vCPU owns exclusively and that outlives it, and `cr3` the page tables the
/// domain runs on.
#[inline]
pub unsafe fn vcpu_up(vcpu: u32) -> Result<(), Error> {
    // SAFETY: the caller guarantees the recorded context is a valid entry point.
    let ret = unsafe { hypercall3(Op::VcpuOp, VCPUOP_UP, vcpu as u64, 0) };
    check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_IS_UP, vcpu)`: whether vCPU `vcpu` runs.
#[inline]
pub fn vcpu_is_up(vcpu: u32) -> Result<bool, Error> {
    // SAFETY: VCPUOP_IS_UP takes no pointer and changes no state.
    let ret = unsafe { hypercall3(Op::VcpuOp, VCPUOP_IS_UP, vcpu as u64, 0) };
    check(ret).map(|v| v != 0)
}
