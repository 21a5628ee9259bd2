//! The hv paravirtual ABI, version 1.
//!
//! This crate is the machine-readable half of the contract described byte by byte in
//! `SPEC.md` at the root of the repository. It is `no_std`, has no allocation and is
//! shared by the hypervisor (`hv-core`) and by guests (`guest-sdk`).
//!
//! Every structure is `#[repr(C)]`, uses only fixed-width integer fields with explicit
//! padding, derives the [`zerocopy`] traits so it can be read from and written to guest
//! memory without `unsafe`, and has its size and field offsets locked by tests.
//! Reserved fields must be zero: the hypervisor rejects non-zero reserved fields with
//! [`Errno::EINVAL`] so that later minor versions can give them a meaning.
#![no_std]
#![deny(missing_docs)]

pub mod blkif;
pub mod cpuid;
pub mod device;
pub mod errno;
pub mod evtchn;
pub mod grant;
pub mod hypercall;
pub mod layout;
pub mod mmu;
pub mod note;
pub mod ring;
pub mod sched;
pub mod shared_info;
pub mod start_info;
pub mod version;

pub use errno::Errno;
pub use hypercall::Op;
pub use version::{Features, ABI_MAJOR, ABI_MINOR};

/// Size of a guest page in bytes. Every frame the ABI talks about is this size.
pub const PAGE_SIZE: u64 = 4096;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
