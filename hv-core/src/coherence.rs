//! Page-table coherence: making every accepted page-table change visible to the guest,
//! in ring 0 and ring 3, on every kind of KVM host (SPEC 8.5.7).
//!
//! With EPT/NPT the CPU walks the guest's tables itself: the guest's own flush is
//! enough. Without (KVM shadow paging, as on PVM hosts), a host-side write to a guest
//! page table is not seen by ring-3 code: KVM keeps the old shadow entry. Measured
//! remedies (../shared/KVM-ON-THESE-MACHINES.md and this module's probe):
//! - a changed or removed L1 entry: drop the host mapping of the frame it used to map
//!   (`MADV_DONTNEED` on the shared memfd mapping keeps the data; KVM's MMU notifier
//!   zaps the stale shadow entry), ~11 us;
//! - a changed or removed L2-L4 entry: delete and re-add the pool memslot (KVM zaps
//!   every shadow page), with the domain's other vCPUs paused meanwhile.
//!
//! Which kind of host this is, is found once per process by a probe: a ring-3 guest
//! reads a page, the host remaps it, the guest reads again. The environment variable
//! `HV_HOST_PAGING` (read once) overrides the probe: `shadow` applies the remedies on
//! any host (correct everywhere, only slower: the way to exercise them on an EPT/NPT
//! host), `coherent` applies none (wrong on a shadow-paging host: ring 3 may see stale
//! mappings), `probe` (or unset) probes. A domain can also be given its strategy
//! ([`crate::DomainConfig::host_paging`]).

use std::sync::OnceLock;

use hv_abi::layout;
use hv_abi::mmu::{PTE_A, PTE_ADDR_MASK, PTE_D, PTE_P, PTE_U, PTE_W};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::boot;
use crate::memory::DomainMemory;

/// How the host translates guest page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPaging {
    /// Host-side page-table writes are seen by the guest after its own flush (EPT/NPT).
    Coherent,
    /// Shadow paging that keeps stale translations for ring 3: remedies needed.
    Shadow,
}

static HOST_PAGING: OnceLock<HostPaging> = OnceLock::new();

/// The environment variable that overrides the probe: `shadow`, `coherent` or `probe`.
pub const HOST_PAGING_ENV: &str = "HV_HOST_PAGING";

/// What `HV_HOST_PAGING` asks for: `Ok(Some(kind))` to force a kind, `Ok(None)` to
/// probe (`probe`, or unset), `Err(value)` for anything else.
pub fn host_paging_override(value: Option<&str>) -> Result<Option<HostPaging>, String> {
    match value {
        None | Some("probe") => Ok(None),
        Some("shadow") => Ok(Some(HostPaging::Shadow)),
        Some("coherent") => Ok(Some(HostPaging::Coherent)),
        Some(other) => Err(other.to_string()),
    }
}

/// The host's kind: as `HV_HOST_PAGING` forces it, else probed on first use (once per
/// process). A failed probe counts as [`HostPaging::Shadow`]: the remedies are correct
/// on any host, only slower. An unknown `HV_HOST_PAGING` value is ignored with a
/// warning (the probe decides).
pub fn host_paging(kvm: &Kvm) -> HostPaging {
    *HOST_PAGING.get_or_init(|| {
        let env = std::env::var(HOST_PAGING_ENV).ok();
        match host_paging_override(env.as_deref()) {
            Ok(Some(kind)) => {
                tracing::info!(
                    ?kind,
                    "page-table coherence strategy forced by {HOST_PAGING_ENV}"
                );
                return kind;
            }
            Ok(None) => {}
            Err(v) => tracing::warn!(
                value = %v,
                "{HOST_PAGING_ENV} must be shadow, coherent or probe; probing instead"
            ),
        }
        probe_kind(kvm)
    })
}

fn probe_kind(kvm: &Kvm) -> HostPaging {
    match probe(kvm) {
        Ok(true) => {
            tracing::info!("host keeps stale shadow translations: page-table remedies on");
            HostPaging::Shadow
        }
        Ok(false) => {
            tracing::info!("host page tables are coherent (EPT/NPT): no remedies needed");
            HostPaging::Coherent
        }
        Err(e) => {
            tracing::warn!(error = %e, "page-table coherence probe failed; assuming shadow paging");
            HostPaging::Shadow
        }
    }
}

const PROBE_MEM: u64 = 4 << 20;
const PROBE_VA: u64 = 0x20_0000;

/// Runs a ring-3 guest that reads `PROBE_VA` twice; between the reads the host remaps
/// it to another frame. Returns true if the second read still saw the old frame.
fn probe(kvm: &Kvm) -> Result<bool, String> {
    let (pool, _) = boot::pool_frames_for(PROBE_MEM, 0);
    let mem = DomainMemory::new("probe", PROBE_MEM, pool).map_err(|e| e.to_string())?;
    let load = [0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00]; // mov rax, [0x200000]
    let out = [
        0xE6,
        const { crate::conv::imm8(hv_abi::hypercall::HYPERCALL_PORT as u64) },
    ]; // out 0xE8, al
    let code: Vec<u8> = [&load[..], &out, &load, &out].concat();
    let w = |gpa, bytes: &[u8]| mem.write_ram(gpa, bytes).map_err(|e| e.to_string());
    w(layout::KERNEL_MIN_GPA, &code)?;
    w(PROBE_VA, &0xAAAA_u64.to_le_bytes())?;
    w(PROBE_VA + 0x1000, &0xBBBB_u64.to_le_bytes())?;
    let bi = boot::build_page_tables(&mem).map_err(|e| e.to_string())?;
    boot::write_gdt_tss(&mem).map_err(|e| e.to_string())?;

    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    for (slot, flags, gpa, size) in [
        (0, 0, 0, mem.ram_bytes()),
        (
            1,
            KVM_MEM_READONLY,
            mem.pool_gpa(),
            mem.pool_end() - mem.pool_gpa(),
        ),
    ] {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: mem.host_address(gpa).map_err(|e| e.to_string())?,
        };
        // SAFETY: `mem` maps the region and outlives the VM (dropped after it below).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())?;
    }
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = crate::cpuid::supported(kvm).map_err(|e| e.to_string())?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;
    let sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    vcpu.set_sregs(&boot::user_mode_sregs(boot::boot_sregs(sregs, bi.pt_base)))
        .map_err(|e| e.to_string())?;
    vcpu.set_regs(&boot::boot_regs(
        layout::KERNEL_MIN_GPA,
        layout::BOOT_STACK_TOP - 8,
        0,
    ))
    .map_err(|e| e.to_string())?;

    let mut read = || -> Result<u64, String> {
        match vcpu.run().map_err(|e| e.to_string())? {
            VcpuExit::IoOut(..) => {}
            other => return Err(format!("unexpected exit {other:?}")),
        }
        Ok(vcpu.get_regs().map_err(|e| e.to_string())?.rax)
    };
    if read()? != 0xAAAA {
        return Err("the first read did not see the first frame".into());
    }
    // Remap PROBE_VA from the host, as the PV MMU does.
    let mut table = bi.pt_base;
    for shift in [39u32, 30, 21] {
        let mut e = [0u8; 8];
        mem.guest_memory_read(table + ((PROBE_VA >> shift) & 511) * 8, &mut e)?;
        table = u64::from_le_bytes(e) & PTE_ADDR_MASK;
    }
    let leaf = table + ((PROBE_VA >> 12) & 511) * 8;
    let val = (PROBE_VA + 0x1000) | PTE_P | PTE_W | PTE_U | PTE_A | PTE_D;
    mem.write_any(leaf, &val.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let second = read()?;
    drop(vcpu);
    drop(vm);
    match second {
        0xBBBB => Ok(false),
        0xAAAA => Ok(true),
        v => Err(format!("the second read returned {v:#x}")),
    }
}

/// Drops the host mapping of guest frame `gpa` so that KVM drops every shadow entry
/// that maps it (the frame's data stays in the memfd).
pub fn forget_frame(mem: &DomainMemory, gpa: u64) {
    let Ok(host) = mem.host_address(gpa & !(hv_abi::PAGE_SIZE - 1)) else {
        return;
    };
    // SAFETY: `host` is the page-aligned start of one page of the domain's MAP_SHARED
    // memfd mapping; MADV_DONTNEED only drops page-table entries, the data stays in the
    // memfd and is faulted back in on the next access.
    unsafe {
        libc::madvise(
            host as *mut libc::c_void,
            crate::conv::usize_from(hv_abi::PAGE_SIZE),
            libc::MADV_DONTNEED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_override_takes_three_words() {
        assert_eq!(host_paging_override(None), Ok(None));
        assert_eq!(host_paging_override(Some("probe")), Ok(None));
        assert_eq!(
            host_paging_override(Some("shadow")),
            Ok(Some(HostPaging::Shadow))
        );
        assert_eq!(
            host_paging_override(Some("coherent")),
            Ok(Some(HostPaging::Coherent))
        );
        assert_eq!(host_paging_override(Some("EPT")), Err("EPT".to_string()));
    }
}
