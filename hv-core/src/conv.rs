//! Lossless integer conversions that the standard library leaves to `as`.
//!
//! hv runs on x86_64 Linux KVM only, where `usize` is 64 bits wide, so every `u64` (a
//! guest-physical offset, a length, a count) fits a `usize`. The standard library has no
//! `From<u64> for usize` because that would not hold on 32-bit targets; [`usize_from`] is
//! that conversion for this crate, and the build fails on a target where it would lose
//! bits. It is the one place where hv-core narrows `u64` to `usize` with `as`.

#[cfg(not(target_pointer_width = "64"))]
compile_error!("hv-core runs on x86_64 Linux KVM only: it needs a 64-bit usize");

/// `x` as a `usize`, losslessly (hv-core builds only where `usize` is 64 bits wide).
#[inline]
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide on every target hv-core builds for (compile_error above)"
)]
pub const fn usize_from(x: u64) -> usize {
    x as usize
}

/// `d` in whole nanoseconds, saturating at `u64::MAX` (about 584 years).
#[inline]
#[must_use]
pub fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `x` as an 8-bit immediate of hand-assembled guest code or a descriptor field.
///
/// For constants: call it in a `const { }` block, where a value that does not fit fails
/// the build instead of being truncated.
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    reason = "checked by the assert just above"
)]
pub const fn imm8(x: u64) -> u8 {
    assert!(x <= u8::MAX as u64, "immediate does not fit 8 bits");
    x as u8
}

/// `x` as a 16-bit immediate; see [`imm8`].
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    reason = "checked by the assert just above"
)]
pub const fn imm16(x: u64) -> u16 {
    assert!(x <= u16::MAX as u64, "immediate does not fit 16 bits");
    x as u16
}

/// `x` as a 32-bit immediate; see [`imm8`].
#[must_use]
#[allow(
    clippy::cast_possible_truncation,
    reason = "checked by the assert just above"
)]
pub const fn imm32(x: u64) -> u32 {
    assert!(x <= u32::MAX as u64, "immediate does not fit 32 bits");
    x as u32
}
