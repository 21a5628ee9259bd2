//! `memcpy_4k`: the host floor of a grant copy: copying 4 KiB between two distinct
//! memfd-backed mappings, as between two domains' RAM.
//!
//! Two [`DomainMemory`] instances (each its own memfd, mapped shared, as hv maps a
//! domain's RAM); one 4 KiB page of the first is copied to one page of the second,
//! [`COPIES`] times, with the pointers passed through [`std::hint::black_box`] so the
//! copies are neither merged nor elided. Both pages stay hot in the cache: this is the
//! fastest a 4 KiB copy between two domains can be in this process, the floor a grant
//! copy (same two pages, resubmitted) is measured against.

use std::hint::black_box;
use std::time::Instant;

use hv_abi::PAGE_SIZE;

use super::BenchError;
use crate::domain::DomainError;
use crate::memory::DomainMemory;

/// Copies timed per repetition.
pub const COPIES: u64 = 500_000;
/// RAM of each of the two mappings (the smallest hv accepts).
const RAM: u64 = 2 << 20;
/// The page copied from and to (an ordinary RAM page in both mappings).
const PAGE_GPA: u64 = 1 << 20;

/// GB/s (1e9 bytes per second) of `COPIES` 4 KiB copies between two memfd mappings.
pub fn memcpy_4k_once(_kvm: &kvm_ioctls::Kvm) -> Result<f64, BenchError> {
    let src = DomainMemory::new("memcpy_4k-src", RAM, 1).map_err(DomainError::from)?;
    let dst = DomainMemory::new("memcpy_4k-dst", RAM, 1).map_err(DomainError::from)?;
    let pattern: Vec<u8> = (0..PAGE_SIZE)
        .map(|i| (i * 7 + 3).to_le_bytes()[0])
        .collect();
    src.write_ram(PAGE_GPA, &pattern)
        .map_err(DomainError::from)?;
    let from = src.host_address(PAGE_GPA).map_err(DomainError::from)? as *const u8;
    let to = dst.host_address(PAGE_GPA).map_err(DomainError::from)? as *mut u8;
    let len = crate::conv::usize_from(PAGE_SIZE);
    let copy = || {
        // SAFETY: `from` and `to` point at page-aligned 4 KiB ranges inside the RAM of
        // `src` and `dst`, two distinct mappings that stay alive for this function.
        unsafe { std::ptr::copy_nonoverlapping(black_box(from), black_box(to), len) };
        black_box(to);
    };
    // Warm up: fault both pages in and bring them into the cache.
    for _ in 0..1_000 {
        copy();
    }
    let t0 = Instant::now();
    for _ in 0..COPIES {
        copy();
    }
    let t = t0.elapsed();
    let mut check = vec![0u8; len];
    dst.read_ram(PAGE_GPA, &mut check)
        .map_err(DomainError::from)?;
    if check != pattern {
        return Err(BenchError::Guest("memcpy_4k: the copy differs".into()));
    }
    Ok((COPIES * PAGE_SIZE) as f64 / t.as_secs_f64() / 1e9)
}
