//! CPUID leaves through which a guest can detect hv before making any hypercall.
//!
//! | leaf | EAX | EBX, ECX, EDX |
//! | --- | --- | --- |
//! | `0x4000_0000` | highest hv leaf (`0x4000_0001`) | signature `"hvParavirtHV"` |
//! | `0x4000_0001` | `major << 16 \| minor` | EBX: features bits 0-31, ECX: bits 32-63, EDX: hypercall port |
//!
//! CPUID leaf 1 also reports ECX bit 31 (hypervisor present).

/// Base leaf of the hypervisor range.
pub const LEAF_BASE: u32 = 0x4000_0000;
/// Version and features leaf.
pub const LEAF_VERSION: u32 = 0x4000_0001;
/// The 12-byte signature returned in EBX, ECX, EDX of [`LEAF_BASE`].
pub const SIGNATURE: [u8; 12] = *b"hvParavirtHV";

/// The signature as the three little-endian register values (EBX, ECX, EDX).
pub const fn signature_regs() -> [u32; 3] {
    let s = SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}
