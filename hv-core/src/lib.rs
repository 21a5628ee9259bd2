//! hv-core: the userspace hypervisor of hv.
//!
//! Each domain is a KVM VM ([`domain`]) with memory from a memfd ([`memory`]), a
//! kernel loaded from a validated ELF image ([`loader`]), a 64-bit boot environment
//! ([`boot`]) and one thread per vCPU ([`vcpu`]) whose exits are dispatched as
//! hypercalls ([`hypercall`]) of the ABI in `hv-abi`.

pub mod bench;
pub mod boot;
pub mod cli;
pub mod coherence;
pub mod config;
pub mod console;
pub mod conv;
pub mod cpuid;
pub mod density;
pub mod devices;
pub mod domain;
pub mod evtchn;
pub mod exit;
pub mod fdlimit;
pub mod gpa;
// TEMPORARY: grant.rs is being rewritten on another branch; its narrowing casts are
// fixed there. Remove this allow when that rewrite lands.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub mod grant;
pub mod guest_arg;
pub mod hypercall;
pub mod hypervisor;
pub mod loader;
pub mod memory;
pub mod mmu;
pub mod outcome;
pub mod params;
pub mod registry;
pub mod sched;
pub mod signals;
pub mod stats;
pub mod time;
pub mod upcall;
pub mod vcpu;
pub mod vcpu_op;

pub use console::ConsoleSink;
pub use domain::{Domain, DomainConfig, DomainError, DomainReport, FEATURES};
pub use loader::{KernelImage, LoadError};
pub use outcome::{CrashReason, CrashReport, Outcome};

/// The demo kernel, built for x86_64-unknown-none and embedded at build time.
#[cfg(feature = "demo-kernel")]
pub static DEMO_KERNEL: &[u8] = include_bytes!(env!("HV_DEMO_KERNEL"));
/// Empty: this build of hv-core was made without the `demo-kernel` feature.
#[cfg(not(feature = "demo-kernel"))]
pub static DEMO_KERNEL: &[u8] = &[];
