//! Hypercall dispatch: decodes an operation and its arguments, checks them, runs it.
//!
//! Every argument comes from the guest and is checked before use, by the operation's
//! own module (`evtchn`, `grant`, `mmu::hypercalls`, `sched`, `vcpu_op`, `time`,
//! `devices`); `version`, `console_io` and `multicall` are here. The result is a
//! non-negative value or an [`Errno`]; a successful shutdown stops the vCPU.

use hv_abi::hypercall::{
    CONSOLEIO_READ, CONSOLEIO_WRITE, CONSOLE_WRITE_MAX, VERSION_FEATURES, VERSION_GET,
};
use hv_abi::version::packed_version;
use hv_abi::{Errno, Op, ABI_MAJOR, ABI_MINOR};

use crate::domain::DomainShared;
use crate::guest_arg;
use crate::mmu::hypercalls::{self as mmu, VcpuEffects, MAX_BATCH};
use crate::sched::Sched;
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
        Some(Op::SchedOp) => match crate::sched::sched_op(dom, vcpu, a1, a2, a3) {
            Sched::Done(r) => ret(r),
            Sched::Shutdown => Disposition::Stop,
        },
        Some(Op::VcpuOp) => ret(crate::vcpu_op::vcpu_op(dom, a1, a2, a3)),
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
            let mut buf = [0u8; crate::conv::usize_from(CONSOLE_WRITE_MAX)];
            let buf = &mut buf[..crate::conv::usize_from(len)];
            guest_arg::copy_in_bytes(&dom.mem, gpa, buf)?;
            dom.console.write(buf);
            Ok(len)
        }
        CONSOLEIO_READ => Err(Errno::ENOSYS),
        _ => Err(Errno::EINVAL),
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
    if let Err(e) = guest_arg::check(&dom.mem, gpa, count * size) {
        return ret(Err(e));
    }
    for i in 0..count {
        let at = gpa + i * size;
        // Each entry is copied just before it runs (an earlier entry may rewrite the
        // later ones); the range was checked above.
        let e: MulticallEntry = match guest_arg::copy_in(&dom.mem, at) {
            Ok(e) => e,
            Err(e) => return ret(Err(e)),
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
        let mut done = e;
        done.result = result;
        // The range was checked; guest RAM does not shrink.
        let _ = guest_arg::copy_out_span(
            &dom.mem,
            at,
            &done,
            crate::field_span!(MulticallEntry, result),
        );
    }
    ret(Ok(0))
}
