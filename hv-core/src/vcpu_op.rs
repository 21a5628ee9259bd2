//! `vcpu_op` (SPEC §8.4): bringing up secondary vCPUs (initialise with a context
//! whose root is a pinned L4, then up), asking whether one is up, and setting a
//! vCPU's upcall vector.
//!
//! Uses the domain's vCPU states, MMU and upcalls; owns nothing.

use hv_abi::hypercall::{
    VcpuContext, UPCALL_VECTOR_MAX, UPCALL_VECTOR_MIN, VCPUOP_INITIALISE, VCPUOP_IS_UP,
    VCPUOP_SET_UPCALL_VECTOR, VCPUOP_UP,
};
use hv_abi::Errno;

use crate::domain::{DomainShared, VcpuState};
use crate::guest_arg;

/// `vcpu_op(cmd, target, arg)`.
pub fn vcpu_op(dom: &DomainShared, cmd: u64, target: u64, gpa: u64) -> Result<u64, Errno> {
    if !matches!(
        cmd,
        VCPUOP_INITIALISE | VCPUOP_UP | VCPUOP_IS_UP | VCPUOP_SET_UPCALL_VECTOR
    ) {
        return Err(Errno::EINVAL);
    }
    if target >= u64::from(dom.nr_vcpus) {
        return Err(Errno::EINVAL);
    }
    if cmd == VCPUOP_SET_UPCALL_VECTOR {
        let vector = gpa;
        if vector != 0 && !(UPCALL_VECTOR_MIN..=UPCALL_VECTOR_MAX).contains(&vector) {
            return Err(Errno::EINVAL);
        }
        dom.upcall
            .set_vector(
                &dom.vm,
                u32::try_from(target).map_err(|_| Errno::EINVAL)?,
                u8::try_from(vector).map_err(|_| Errno::EINVAL)?,
            )
            .map_err(|e| {
                tracing::error!(error = %e, "setting the upcall vector failed");
                Errno::EIO
            })?;
        return Ok(0);
    }
    let idx = crate::conv::usize_from(target);
    let mut slots = dom.vcpu_states.lock().map_err(|_| Errno::EIO)?;
    match cmd {
        VCPUOP_IS_UP => Ok(u64::from(matches!(slots[idx], VcpuState::Up(_)))),
        VCPUOP_INITIALISE => {
            if matches!(slots[idx], VcpuState::Up(_)) {
                return Err(Errno::EEXIST);
            }
            let ctx: VcpuContext = guest_arg::copy_in(&dom.mem, gpa)?;
            if ctx.reserved.iter().any(|r| *r != 0) {
                return Err(Errno::EINVAL);
            }
            // The context's root must be a pinned L4, and from here on it is this
            // vCPU's CR3, which MMUEXT_UNPIN_TABLE refuses to unpin (SPEC 8.4). Checked
            // and recorded under the MMU lock, so that no unpin slips in between.
            let mmu = dom.mmu.lock().map_err(|_| Errno::EIO)?;
            if !mmu.is_pinned_l4(ctx.cr3) {
                return Err(Errno::EINVAL);
            }
            dom.vcpu_cr3[idx].store(ctx.cr3, std::sync::atomic::Ordering::Release);
            drop(mmu);
            slots[idx] = VcpuState::Initialised(ctx);
            Ok(0)
        }
        _ => match slots[idx] {
            VcpuState::Up(_) => Err(Errno::EEXIST),
            VcpuState::Down => Err(Errno::EINVAL),
            VcpuState::Initialised(ctx) => {
                slots[idx] = VcpuState::Up(ctx);
                drop(slots);
                dom.vcpu_cv.notify_all();
                Ok(0)
            }
        },
    }
}
