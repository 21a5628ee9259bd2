//! Hypercall dispatch: decodes an operation and its arguments, checks them, runs it.
//!
//! Every argument comes from the guest and is checked here before use. The result is
//! a non-negative value or an [`Errno`]; a successful shutdown stops the vCPU.

use hv_abi::hypercall::{
    VcpuContext, CONSOLEIO_READ, CONSOLEIO_WRITE, CONSOLE_WRITE_MAX, UPCALL_VECTOR_MAX,
    UPCALL_VECTOR_MIN, VCPUOP_INITIALISE, VCPUOP_IS_UP, VCPUOP_SET_UPCALL_VECTOR, VCPUOP_UP,
    VERSION_FEATURES, VERSION_GET,
};
use hv_abi::sched::{SchedPoll, SCHED_POLL_MAX_PORTS};
use hv_abi::sched::{
    SCHEDOP_BLOCK, SCHEDOP_POLL, SCHEDOP_SHUTDOWN, SCHEDOP_YIELD, SHUTDOWN_CODE_MAX,
    SHUTDOWN_CRASH, SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT,
};
use hv_abi::version::packed_version;
use hv_abi::{Errno, Op, ABI_MAJOR, ABI_MINOR, PAGE_SIZE};

use crate::domain::{DomainShared, VcpuState};
use crate::mmu::hypercalls::{self as mmu, VcpuEffects, MAX_BATCH};
use crate::outcome::{CrashReason, CrashReport, Outcome};
use hv_abi::mmu::MulticallEntry;

/// What the vCPU does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Return this value in RAX and resume the guest.
    Return(i64),
    /// The domain is shutting down: stop this vCPU.
    Stop,
}

/// Registers of a hypercall.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// RAX.
    pub op: u64,
    /// RDI, RSI, RDX, R10, R8.
    pub args: [u64; 5],
    /// The caller's privilege level.
    pub cpl: u8,
    /// The caller's CR3.
    pub cr3: u64,
}

type HcResult = Result<u64, Errno>;

fn ret(r: HcResult) -> Disposition {
    Disposition::Return(match r {
        Ok(v) => v as i64,
        Err(e) => e.to_ret(),
    })
}

/// Runs one hypercall for vCPU `vcpu` of `dom`; what it asks of the vCPU afterwards
/// (a new CR3, a flush) is added to `effects`.
pub fn dispatch(
    dom: &DomainShared,
    vcpu: u32,
    call: Call,
    effects: &mut VcpuEffects,
) -> Disposition {
    if call.cpl != 0 && !dom.allow_user_hypercalls {
        return ret(Err(Errno::EPERM));
    }
    let [a1, a2, a3, _a4, _a5] = call.args;
    match Op::from_u64(call.op) {
        Some(Op::MmuUpdate) => coherent(dom, vcpu, mmu::mmu_update(dom, a1, a2, a3)),
        Some(Op::MmuextOp) => coherent(dom, vcpu, mmu::mmuext_op(dom, vcpu, a1, a2, a3, effects)),
        Some(Op::UpdateVaMapping) => {
            let r = mmu::update_va_mapping(dom, call.cr3, a1, a2, a3, effects);
            coherent(dom, vcpu, r)
        }
        Some(Op::Multicall) => multicall(dom, vcpu, call, a1, a2, effects),
        Some(Op::Version) => ret(version(dom, a1)),
        Some(Op::ConsoleIo) => ret(console_io(dom, a1, a2, a3)),
        Some(Op::SchedOp) => sched_op(dom, vcpu, a1, a2, a3),
        Some(Op::VcpuOp) => ret(vcpu_op(dom, a1, a2, a3)),
        Some(Op::EventChannelOp) => ret(crate::evtchn::event_channel_op(
            &dom.evtchn,
            &dom.mem,
            &*dom.registry,
            a1,
            a2,
        )),
        Some(Op::SetTimerOp) => ret(dom.time.set_timer_op(vcpu, a1)),
        Some(Op::GrantTableOp) => {
            let r = dom
                .grants
                .grant_table_op(&dom.mmu, &*dom.registry, call.cr3, a1, a2, a3);
            coherent(dom, vcpu, r)
        }
        Some(Op::DevOp) => ret(crate::devices::dev_op(dom, a1, a2)),
        // Specified in ABI v1, implemented by later features.
        None => ret(Err(Errno::ENOSYS)),
    }
}

/// Returns from a page-table hypercall once its changes are visible (even a failed
/// batch may have applied some requests).
fn coherent(dom: &DomainShared, vcpu: u32, r: HcResult) -> Disposition {
    dom.make_coherent(vcpu);
    ret(r)
}

fn version(dom: &DomainShared, cmd: u64) -> HcResult {
    match cmd {
        VERSION_GET => Ok(u64::from(packed_version(ABI_MAJOR, ABI_MINOR))),
        VERSION_FEATURES => Ok(dom.features.bits()),
        _ => Err(Errno::EINVAL),
    }
}

fn console_io(dom: &DomainShared, cmd: u64, len: u64, gpa: u64) -> HcResult {
    match cmd {
        CONSOLEIO_WRITE => {
            if len > CONSOLE_WRITE_MAX {
                return Err(Errno::E2BIG);
            }
            if len == 0 {
                return Ok(0);
            }
            let mut buf = [0u8; CONSOLE_WRITE_MAX as usize];
            let buf = &mut buf[..len as usize];
            dom.mem.read_ram(gpa, buf).map_err(|_| Errno::EFAULT)?;
            dom.console.write(buf);
            Ok(len)
        }
        CONSOLEIO_READ => Err(Errno::ENOSYS),
        _ => Err(Errno::EINVAL),
    }
}

fn sched_op(dom: &DomainShared, vcpu: u32, cmd: u64, reason: u64, code: u64) -> Disposition {
    match cmd {
        SCHEDOP_YIELD => {
            std::thread::yield_now();
            ret(Ok(0))
        }
        SCHEDOP_SHUTDOWN => {
            let outcome = match reason {
                SHUTDOWN_POWEROFF if code <= SHUTDOWN_CODE_MAX => {
                    Outcome::Poweroff { code: code as u8 }
                }
                SHUTDOWN_REBOOT => Outcome::Reboot,
                SHUTDOWN_CRASH => Outcome::Crash(Box::new(CrashReport::without_regs(
                    vcpu,
                    CrashReason::GuestCrash,
                ))),
                _ => return ret(Err(Errno::EINVAL)),
            };
            tracing::debug!(vcpu, %outcome, "guest shutdown");
            dom.finish(outcome);
            Disposition::Stop
        }
        SCHEDOP_BLOCK => {
            dom.evtchn.clear_upcall_mask(vcpu);
            dom.out_of_guest(vcpu, || {
                dom.upcall.wait_until(None, || {
                    dom.evtchn.upcall_pending(vcpu) || dom.is_stopping()
                })
            });
            // Events that arrived while upcalls were masked raised no interrupt: raise
            // it now, so it is taken as soon as the guest runs with RFLAGS.IF set.
            if dom.evtchn.upcall_pending(vcpu) {
                dom.upcall.raise(vcpu);
            }
            ret(Ok(0))
        }
        SCHEDOP_POLL => ret(poll(dom, vcpu, reason)),
        _ => ret(Err(Errno::EINVAL)),
    }
}

/// `SCHEDOP_POLL`: sleeps until one of the ports is pending or the timeout passes.
fn poll(dom: &DomainShared, vcpu: u32, gpa: u64) -> HcResult {
    let p: SchedPoll = dom.mem.read_obj(gpa).map_err(|_| Errno::EFAULT)?;
    if p.reserved != 0 || p.nr_ports == 0 || p.nr_ports > SCHED_POLL_MAX_PORTS {
        return Err(Errno::EINVAL);
    }
    let mut ports = [0u32; SCHED_POLL_MAX_PORTS as usize];
    let ports = &mut ports[..p.nr_ports as usize];
    dom.mem
        .read_ram(p.ports_gpa, zerocopy::IntoBytes::as_mut_bytes(ports))
        .map_err(|_| Errno::EFAULT)?;
    let nr = hv_abi::shared_info::NR_EVENT_CHANNELS as u32;
    if ports.iter().any(|p| *p == 0 || *p >= nr) {
        return Err(Errno::EINVAL);
    }
    let deadline = (p.timeout != 0).then(|| dom.time.instant_of(p.timeout));
    dom.out_of_guest(vcpu, || {
        dom.upcall.wait_until(deadline, || {
            dom.is_stopping() || ports.iter().any(|p| dom.evtchn.is_pending(*p))
        })
    });
    Ok(0)
}

fn vcpu_op(dom: &DomainShared, cmd: u64, target: u64, gpa: u64) -> HcResult {
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
            .set_vector(&dom.vm, target as u32, vector as u8)
            .map_err(|e| {
                tracing::error!(error = %e, "setting the upcall vector failed");
                Errno::EIO
            })?;
        return Ok(0);
    }
    let idx = target as usize;
    let mut slots = dom.vcpu_states.lock().map_err(|_| Errno::EIO)?;
    match cmd {
        VCPUOP_IS_UP => Ok(u64::from(matches!(slots[idx], VcpuState::Up(_)))),
        VCPUOP_INITIALISE => {
            if matches!(slots[idx], VcpuState::Up(_)) {
                return Err(Errno::EEXIST);
            }
            let ctx: VcpuContext = dom.mem.read_obj(gpa).map_err(|_| Errno::EFAULT)?;
            if ctx.reserved.iter().any(|r| *r != 0) {
                return Err(Errno::EINVAL);
            }
            let cr3_ok = ctx.cr3 % PAGE_SIZE == 0
                && ctx.cr3 >= dom.mem.pool_gpa()
                && ctx.cr3 < dom.mem.pool_end();
            if !cr3_ok {
                return Err(Errno::EINVAL);
            }
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

/// `multicall(entries, count)`: every entry runs, in order, with its own result; a
/// successful shutdown stops the rest.
fn multicall(
    dom: &DomainShared,
    vcpu: u32,
    call: Call,
    gpa: u64,
    count: u64,
    effects: &mut VcpuEffects,
) -> Disposition {
    if count > MAX_BATCH {
        return ret(Err(Errno::E2BIG));
    }
    let size = core::mem::size_of::<MulticallEntry>() as u64;
    if dom.mem.check_ram(gpa, count * size).is_err() {
        return ret(Err(Errno::EFAULT));
    }
    for i in 0..count {
        let at = gpa + i * size;
        // Each entry is copied before use; the range was checked above.
        let Ok(e) = dom.mem.read_obj::<MulticallEntry>(at) else {
            return ret(Err(Errno::EFAULT));
        };
        let result = if e.args[5] != 0 || e.op == Op::Multicall as u64 {
            Errno::EINVAL.to_ret()
        } else {
            let sub = Call {
                op: e.op,
                args: [e.args[0], e.args[1], e.args[2], e.args[3], e.args[4]],
                ..call
            };
            match dispatch(dom, vcpu, sub, effects) {
                Disposition::Return(v) => v,
                Disposition::Stop => return Disposition::Stop,
            }
        };
        let _ = dom.mem.write_obj(at + 8, &result);
    }
    ret(Ok(0))
}
