//! SDK for guest kernels running on the hv paravirtual hypervisor.
//!
//! A guest kernel is a `no_std`, `no_main` binary built for `x86_64-unknown-none` and
//! linked with the SDK's linker script (`link.ld`, whose absolute path dependent build
//! scripts find in the `DEP_HV_GUEST_SDK_LINKER_SCRIPT` environment variable). A
//! minimal kernel:
//!
//! ```text
//! #![no_std]
//! #![no_main]
//!
//! use guest_sdk::{println, Features, StartInfo};
//!
//! guest_sdk::entry!(main, Features::CONSOLE_IO | Features::SCHED);
//! guest_sdk::panic_handler!();
//!
//! fn main(start_info: &'static StartInfo) -> ! {
//!     println!("hello from domain {}", start_info.domid);
//!     guest_sdk::poweroff(0)
//! }
//! ```
//!
//! (Shown as text because a kernel binary cannot be a host doctest: it is
//! `examples/guest-template/src/main.rs`, which the test suite builds outside the
//! workspace and runs on hv.)
//!
//! # Layers
//!
//! * [`hypercall`]: the raw transport (`out 0xE8, al`, arguments in registers);
//! * the safe typed wrappers re-exported at the crate root ([`version`],
//!   [`console_write`], [`poweroff`], ...), returning [`Error`] on failure;
//! * [`boot`]: start_info validation and the version/feature handshake that
//!   [`entry!`] runs before the kernel's `main`;
//! * [`console`]: a buffered [`core::fmt::Write`] console and [`print!`] / [`println!`];
//! * [`mod@panic`]: panic reporting ([`panic_handler!`]);
//! * [`cpuid`]: detecting hv without a hypercall;
//! * [`arch`]: the few x86-64 privileged operations small kernels need;
//! * [`evtchn`], [`upcall`], [`sched`]: event channels, the upcall interrupt and its
//!   dispatcher, sleeping until events arrive;
//! * [`time`]: system time, wall clock, the one-shot and periodic timer;
//! * [`grant`]: grant tables (sharing frames with other domains);
//! * [`devices`]: the device table and the `dev_op` handshake; drivers for the PV
//!   block device ([`blkfront`]), the PV console ([`pvconsole`]), the emulated block
//!   device ([`emublk`]), passthrough regions ([`passthrough`], over
//!   [`volatile::VolatileSlice`]) and the 16550 UART ([`uart`]).
//!
//! # Addresses
//!
//! Every pointer the hypervisor receives is a guest-*physical* address. The boot
//! address space the hypervisor builds is an identity map (virtual == physical), and
//! the safe wrappers rely on it: they translate pointers with [`virt_to_phys`], the
//! single place to change for a kernel that moves to another address space.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod arch;
pub mod blkfront;
pub mod boot;
pub mod cmdline;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod emublk;
pub mod error;
pub mod evtchn;
pub mod grant;
pub mod hypercall;
mod macros;
pub mod mmu;
pub mod ops;
pub mod panic;
pub mod passthrough;
pub mod pvconsole;
pub mod sched;
pub mod time;
pub mod uart;
pub mod upcall;
pub mod user;
pub mod volatile;

#[doc(hidden)]
pub use macros::__features_bits;

/// The ABI crate the SDK is built on, re-exported so kernels (and the SDK's macros)
/// name exactly the same version.
pub use hv_abi;

pub use boot::{InitError, StartInfo};
pub use error::{check, Error};
pub use hv_abi::{Features, ABI_MAJOR, ABI_MINOR};
pub use ops::{
    console_write, crash, features, poweroff, sched_yield, shutdown, vcpu_initialise, vcpu_is_up,
    vcpu_up, version,
};

/// Translates a pointer of the running kernel to the guest-physical address the
/// hypervisor expects.
///
/// The boot address space is an identity map, so this is the identity. It is the one
/// place the safe wrappers translate addresses: a kernel that switches to page tables
/// in which virtual != physical must not use the wrappers with such pointers (or must
/// change this function).
#[inline(always)]
pub fn virt_to_phys<T: ?Sized>(ptr: *const T) -> u64 {
    ptr.cast::<u8>().addr() as u64
}
