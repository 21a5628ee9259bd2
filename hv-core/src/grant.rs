//! Grant tables v1 (SPEC.md 8.8). (Being implemented.)

use hv_abi::Errno;

use crate::domain::DomainShared;
use crate::mmu::hypercalls::VcpuEffects;

/// A domain's grant state: its own table's active entries and its grant window.
#[derive(Debug, Default)]
pub struct Grants {}

impl Grants {
    /// Grant state for a new domain.
    pub fn new() -> Grants {
        Grants {}
    }
}

/// `grant_table_op(cmd, gpa, count)` from vCPU `vcpu`, whose CR3 is `cr3`.
pub fn grant_table_op(
    _dom: &DomainShared,
    _vcpu: u32,
    _cr3: u64,
    _cmd: u64,
    _gpa: u64,
    _count: u64,
    _effects: &mut VcpuEffects,
) -> Result<u64, Errno> {
    Err(Errno::ENOSYS)
}

/// Releases everything a dying domain granted or mapped.
pub fn destroy(_dom: &DomainShared) {}
