//! Detecting hv through CPUID, without making a hypercall.
//!
//! Leaf `0x4000_0000` returns the signature `"hvParavirtHV"` in EBX, ECX, EDX; leaf
//! `0x4000_0001` the ABI version, the feature bitmap and the hypercall port
//! ([`hv_abi::cpuid`]).

use core::arch::asm;

use hv_abi::cpuid::{LEAF_BASE, LEAF_VERSION, SIGNATURE};
use hv_abi::Features;

/// The four registers a CPUID leaf returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Executes `cpuid` for `leaf` (sub-leaf 0).
#[inline]
pub fn cpuid(leaf: u32) -> CpuidResult {
    let eax: u32;
    let ebx: u64;
    let ecx: u32;
    let edx: u32;
    // SAFETY: `cpuid` only writes the four registers named here; RBX is reserved by
    // LLVM, so it is saved in a scratch register and swapped back.
    unsafe {
        asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inlateout("eax") leaf => eax,
            inlateout("ecx") 0u32 => ecx,
            lateout("edx") edx,
            options(nostack, nomem, preserves_flags),
        );
    }
    CpuidResult {
        eax,
        ebx: ebx as u32,
        ecx,
        edx,
    }
}

/// What leaf `0x4000_0001` reports about the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HvInfo {
    /// ABI major version.
    pub major: u16,
    /// ABI minor version.
    pub minor: u16,
    /// Implemented features (EBX | ECX << 32).
    pub features: Features,
    /// The hypercall I/O port (EDX).
    pub port: u16,
}

/// The 12 signature bytes of leaf `0x4000_0000` (EBX, ECX, EDX in little-endian order),
/// and the highest hypervisor leaf (EAX).
pub fn signature() -> ([u8; 12], u32) {
    let r = cpuid(LEAF_BASE);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
    (sig, r.eax)
}

/// Detects hv: `Some` with the version, features and port if leaf `0x4000_0000` carries
/// hv's signature and reports leaf `0x4000_0001`, `None` otherwise.
pub fn detect() -> Option<HvInfo> {
    let (sig, max_leaf) = signature();
    if sig != SIGNATURE || max_leaf < LEAF_VERSION {
        return None;
    }
    let r = cpuid(LEAF_VERSION);
    Some(HvInfo {
        major: (r.eax >> 16) as u16,
        minor: r.eax as u16,
        features: Features(r.ebx as u64 | (r.ecx as u64) << 32),
        port: r.edx as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_runs_on_the_host() {
        // Leaf 0 always exists; its vendor string is printable ASCII.
        let r = cpuid(0);
        for b in r.ebx.to_le_bytes() {
            assert!(b.is_ascii_graphic() || b == b' ');
        }
        // Not running on hv.
        assert_eq!(detect(), None);
    }
}
