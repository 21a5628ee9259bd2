//! Panic reporting.
//!
//! A kernel defines its `#[panic_handler]` with [`panic_handler!`](crate::panic_handler),
//! which calls [`report_panic`]: it prints `panic: <message> at <file>:<line>` and shuts
//! the domain down with reason crash.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Set by the first panic; a panic while reporting one crashes without printing.
static PANICKING: AtomicBool = AtomicBool::new(false);

/// Prints `panic: <message> at <file>:<line>` (without the location if the panic has
/// none) and shuts the domain down with reason crash. A nested panic (for example
/// while formatting the message), or a panic on another vCPU while the first is being
/// reported, crashes at once.
pub fn report_panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::SeqCst) {
        crate::crash();
    }
    match info.location() {
        Some(loc) => crate::println!("panic: {} at {}:{}", info.message(), loc.file(), loc.line()),
        None => crate::println!("panic: {}", info.message()),
    }
    crate::crash()
}

/// Defines the kernel's `#[panic_handler]` as [`report_panic`]. Invoke it once, at
/// the root of a `no_std` kernel binary:
///
/// ```text
/// guest_sdk::panic_handler!();
/// ```
///
/// (A `#[panic_handler]` cannot be defined in a host doctest; the guest template,
/// `examples/guest-template`, uses this macro and is built and run by the test suite.)
#[macro_export]
macro_rules! panic_handler {
    () => {
        #[panic_handler]
        fn __hv_guest_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::panic::report_panic(info)
        }
    };
}
