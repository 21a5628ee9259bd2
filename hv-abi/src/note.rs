//! The ELF note in which a guest kernel declares the ABI it was built for.
//!
//! The note lives in a `PT_NOTE` segment: name `"hv"` (with its NUL, `namesz` = 3,
//! padded to 4 bytes), type [`NOTE_TYPE_ABI`], descriptor [`AbiNote`] (16 bytes).
//! A kernel without this note is refused. A kernel whose note names another major
//! version, a newer minor version, or a feature the hypervisor lacks is refused
//! before any of its code runs.

/// The note's name, without the terminating NUL.
pub const NOTE_NAME: &[u8] = b"hv";
/// The note type of [`AbiNote`].
pub const NOTE_TYPE_ABI: u32 = 1;

/// Descriptor of the ABI note.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
)]
#[repr(C)]
pub struct AbiNote {
    /// ABI major version the kernel was built for.
    pub major: u16,
    /// Lowest ABI minor version the kernel needs.
    pub minor: u16,
    /// Must be zero.
    pub reserved: u32,
    /// Feature bits the kernel cannot run without ([`crate::Features`]).
    pub required_features: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout() {
        assert_eq!(size_of::<AbiNote>(), 16);
        assert_eq!(offset_of!(AbiNote, major), 0);
        assert_eq!(offset_of!(AbiNote, minor), 2);
        assert_eq!(offset_of!(AbiNote, reserved), 4);
        assert_eq!(offset_of!(AbiNote, required_features), 8);
    }
}
