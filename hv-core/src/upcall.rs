//! Upcalls: how an event reaches a vCPU.
//!
//! Every domain has KVM's in-kernel local APICs (split irqchip). Each vCPU's local APIC is put in x2APIC
//! mode and enabled at creation; each vCPU has an eventfd registered as an irqfd on
//! its own GSI, routed as an MSI to that vCPU with the vector the guest registered
//! (`VCPUOP_SET_UPCALL_VECTOR`). Raising an upcall is one eventfd write from any host
//! thread: KVM injects the vector, waking the vCPU if it halted. The guest ends its
//! handler with an x2APIC EOI (`wrmsr` 0x80B), which KVM handles in the kernel.
//!
//! vCPUs blocked in `SCHEDOP_BLOCK` or `SCHEDOP_POLL` sleep on the domain's event
//! condition variable; every delivery to the domain wakes them to re-check.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    Msrs, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI used for upcalls (GSIs below are the legacy PIC/IOAPIC pins).
const GSI_BASE: u32 = 24;
/// MSR_IA32_APICBASE.
const MSR_APIC_BASE: u32 = 0x1B;
/// The x2APIC spurious-interrupt vector register.
const MSR_X2APIC_SVR: u32 = 0x80F;
/// APIC base: global enable, x2APIC mode, the default xAPIC address.
const APIC_BASE_X2APIC: u64 = 0xFEE0_0000 | (1 << 11) | (1 << 10);
/// APIC base bit: the bootstrap processor.
const APIC_BASE_BSP: u64 = 1 << 8;
/// SVR: APIC software enable, spurious vector 0xFF.
const SVR_ENABLED: u64 = 0x1FF;

/// Errors setting up upcalls.
#[derive(Debug, Error)]
pub enum UpcallError {
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The MSR or routing tables could not be built.
    #[error("cannot build a KVM table: {0:?}")]
    Table(vmm_sys_util::fam::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> UpcallError {
    move |source| UpcallError::Kvm { what, source }
}

/// GSIs KVM reserves for a userspace IOAPIC in split-irqchip mode (hv has none; the
/// upcall GSIs start above them).
const SPLIT_IRQCHIP_IOAPIC_PINS: u64 = GSI_BASE as u64;

/// Creates the in-kernel local APICs ("split irqchip": no in-kernel PIC or IOAPIC,
/// which hv does not use). Must run before any vCPU is created.
///
/// A full in-kernel irqchip works as well, but destroying a VM that has one costs about
/// 16 ms on the development machine (the PIC and IOAPIC leave KVM's I/O buses with an
/// RCU synchronisation each) against 0.2 ms without.
pub fn create_irqchip(vm: &VmFd) -> Result<(), UpcallError> {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = SPLIT_IRQCHIP_IOAPIC_PINS;
    vm.enable_cap(&cap).map_err(kvm("enable split irqchip"))
}

/// Enables vCPU `id`'s local APIC in x2APIC mode.
pub fn enable_x2apic(fd: &VcpuFd, id: u32) -> Result<(), UpcallError> {
    let bsp = if id == 0 { APIC_BASE_BSP } else { 0 };
    let msrs = Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: MSR_APIC_BASE,
            data: APIC_BASE_X2APIC | bsp,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_X2APIC_SVR,
            data: SVR_ENABLED,
            ..Default::default()
        },
    ])
    .map_err(UpcallError::Table)?;
    let n = fd.set_msrs(&msrs).map_err(kvm("set APIC MSRs"))?;
    if n != 2 {
        return Err(UpcallError::Kvm {
            what: "set APIC MSRs (x2APIC refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}

/// A domain's upcall state: one irqfd per vCPU, the registered vectors, and the
/// condition variable blocked vCPUs sleep on.
#[derive(Debug)]
pub struct Upcall {
    irqfds: Vec<EventFd>,
    vectors: Mutex<Vec<u8>>,
    /// Bumped on every delivery to the domain; guarded for the condition variable.
    events: Mutex<u64>,
    cv: Condvar,
}

impl Upcall {
    /// Creates and registers the irqfds of `nr_vcpus` vCPUs (no vector yet: an
    /// upcall raised before the guest registers one is dropped by KVM).
    pub fn new(vm: &VmFd, nr_vcpus: u32) -> Result<Upcall, UpcallError> {
        let mut irqfds = Vec::with_capacity(nr_vcpus as usize);
        for i in 0..nr_vcpus {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(UpcallError::EventFd)?;
            vm.register_irqfd(&fd, GSI_BASE + i)
                .map_err(kvm("register irqfd"))?;
            irqfds.push(fd);
        }
        Ok(Upcall {
            irqfds,
            vectors: Mutex::new(vec![0; nr_vcpus as usize]),
            events: Mutex::new(0),
            cv: Condvar::new(),
        })
    }

    /// Sets vCPU `vcpu`'s upcall vector (0: none) and reprograms the MSI routes.
    pub fn set_vector(&self, vm: &VmFd, vcpu: u32, vector: u8) -> Result<(), UpcallError> {
        let Ok(mut v) = self.vectors.lock() else {
            return Ok(());
        };
        if let Some(slot) = v.get_mut(vcpu as usize) {
            *slot = vector;
        }
        let entries: Vec<kvm_irq_routing_entry> = v
            .iter()
            .zip(0u32..)
            .filter(|(vec, _)| **vec != 0)
            .map(|(vec, i)| kvm_irq_routing_entry {
                gsi: GSI_BASE + i,
                type_: KVM_IRQ_ROUTING_MSI,
                flags: 0,
                pad: 0,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        // Physical destination: the x2APIC id, which is the vCPU index.
                        address_lo: 0xFEE0_0000 | (i << 12),
                        address_hi: 0,
                        data: u32::from(*vec),
                        ..Default::default()
                    },
                },
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(UpcallError::Table)?;
        vm.set_gsi_routing(&table).map_err(kvm("set GSI routing"))
    }

    /// vCPU `vcpu`'s upcall vector, 0 if none.
    pub fn vector(&self, vcpu: u32) -> u8 {
        self.vectors
            .lock()
            .ok()
            .and_then(|v| v.get(vcpu as usize).copied())
            .unwrap_or(0)
    }

    /// Raises the upcall interrupt on vCPU `vcpu` (dropped by KVM if no vector is set).
    pub fn raise(&self, vcpu: u32) {
        if let Some(fd) = self.irqfds.get(vcpu as usize) {
            if let Err(e) = fd.write(1) {
                tracing::warn!(vcpu, error = %e, "irqfd write failed");
            }
        }
    }

    /// Wakes every vCPU sleeping in `SCHEDOP_BLOCK` or `SCHEDOP_POLL` to re-check.
    pub fn wake_all(&self) {
        if let Ok(mut g) = self.events.lock() {
            *g = g.wrapping_add(1);
            self.cv.notify_all();
        }
    }

    /// Sleeps until `ready` holds (checked under the event lock, so no wake-up is
    /// lost), or until `deadline`. Returns true if `ready` held.
    pub fn wait_until(&self, deadline: Option<Instant>, mut ready: impl FnMut() -> bool) -> bool {
        let Ok(mut g) = self.events.lock() else {
            return false;
        };
        loop {
            if ready() {
                return true;
            }
            g = match deadline {
                None => match self.cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return false,
                },
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    match self.cv.wait_timeout(g, d - now) {
                        Ok((g, _)) => g,
                        Err(_) => return false,
                    }
                }
            };
        }
    }

    /// Holds the event lock (for tests of the wake-up protocol).
    #[doc(hidden)]
    pub fn lock_events(&self) -> Option<MutexGuard<'_, u64>> {
        self.events.lock().ok()
    }
}

impl crate::evtchn::UpcallSink for Upcall {
    fn raise(&self, vcpu: u32) {
        Upcall::raise(self, vcpu);
    }

    fn wake_all(&self) {
        Upcall::wake_all(self);
    }
}
