//! The CPUID table a domain's vCPUs see: KVM's supported leaves, with the hypervisor
//! bit set and hv's own leaves at 0x40000000 (see [`hv_abi::cpuid`]).

use hv_abi::cpuid::{signature_regs, LEAF_BASE, LEAF_VERSION};
use hv_abi::hypercall::HYPERCALL_PORT;
use hv_abi::version::packed_version;
use hv_abi::{Features, ABI_MAJOR, ABI_MINOR};
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Builds the CPUID table for vCPU `vcpu_id` from KVM's supported table.
pub fn build(
    supported: &CpuId,
    vcpu_id: u32,
    features: Features,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !(0x4000_0000..0x4001_0000).contains(&e.function))
        .copied()
        .collect();
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.ecx |= 1 << 31; // hypervisor present
            e.ecx |= 1 << 21; // x2APIC: upcalls end with an x2APIC EOI
            e.ebx = (e.ebx & 0x00FF_FFFF) | (vcpu_id << 24); // initial APIC id
        }
        if e.function == 0xB || e.function == 0x1F {
            e.edx = vcpu_id; // x2APIC id
        }
    }
    let [b, c, d] = signature_regs();
    entries.push(kvm_cpuid_entry2 {
        function: LEAF_BASE,
        eax: LEAF_VERSION,
        ebx: b,
        ecx: c,
        edx: d,
        ..Default::default()
    });
    #[allow(
        clippy::cast_possible_truncation,
        reason = "EBX carries the low 32 feature bits, ECX the high 32"
    )]
    let (ebx, ecx) = (features.bits() as u32, (features.bits() >> 32) as u32);
    entries.push(kvm_cpuid_entry2 {
        function: LEAF_VERSION,
        eax: packed_version(ABI_MAJOR, ABI_MINOR),
        ebx,
        ecx,
        edx: HYPERCALL_PORT as u32,
        ..Default::default()
    });
    CpuId::from_entries(&entries)
}

/// KVM's supported CPUID table.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

static SUPPORTED: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();

/// Errors of the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM would not say which CPUID leaves it supports.
    #[error("KVM get supported CPUID failed: {0}")]
    Supported(#[source] kvm_ioctls::Error),
}

/// KVM's supported CPUID table, queried once per process.
pub fn supported_cached(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = supported(kvm).map_err(CpuidError::Supported)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

/// The guest-physical address width (CPUID 0x80000008 EAX[7:0]); 36 if not reported.
pub fn phys_bits(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax & 0xFF)
}
