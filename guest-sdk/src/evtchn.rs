//! Event channels (SPEC.md §8.6): typed wrappers around `event_channel_op`, the
//! pending and mask bitmaps of shared_info, a per-port handler table and the upcall
//! dispatcher (Xen's 2-level scan).
//!
//! A kernel registers a handler per port with [`set_handler`], installs the upcall
//! interrupt ([`crate::upcall::install`]) and enables interrupts; each upcall then runs
//! [`dispatch`], which calls the handler of every pending, unmasked port. Handlers run
//! in interrupt context (interrupts off, on whatever stack the kernel was using): they
//! must be short, must not block, and should only touch state through atomics.
//!
//! Every function here needs the `evtchn` feature ([`hv_abi::Features::EVTCHN`]):
//! without it the hypercalls fail with `ENOSYS`-like errors and shared_info stays zero.
//! shared_info is reached at [`SHARED_INFO_GPA`] through the boot identity map.

use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, Ordering};

use hv_abi::evtchn::{
    EvtchnAllocUnbound, EvtchnBindInterdomain, EvtchnBindVcpu, EvtchnStatus,
    EVTCHNOP_ALLOC_UNBOUND, EVTCHNOP_BIND_INTERDOMAIN, EVTCHNOP_BIND_IPI, EVTCHNOP_BIND_VCPU,
    EVTCHNOP_BIND_VIRQ, EVTCHNOP_CLOSE, EVTCHNOP_SEND, EVTCHNOP_STATUS, EVTCHNOP_UNMASK,
};
use hv_abi::layout::SHARED_INFO_GPA;
use hv_abi::shared_info::{SharedInfo, VcpuInfo, MAX_VCPUS, NR_EVENT_CHANNELS};
use hv_abi::{Errno, Op};

use crate::error::{check, Error};
use crate::hypercall::hypercall2;
use crate::virt_to_phys;

pub use hv_abi::evtchn::{
    EVTCHNSTAT_CLOSED, EVTCHNSTAT_INTERDOMAIN, EVTCHNSTAT_IPI, EVTCHNSTAT_UNBOUND, EVTCHNSTAT_VIRQ,
    VIRQ_TIMER,
};

/// An event-channel port number (1..4096; 0 is never a valid port).
pub type Port = u32;

/// A port's event handler: called with the port, in interrupt context.
pub type Handler = fn(Port);

/// Domain id meaning "the calling domain" in `remote_dom` fields.
pub const DOMID_SELF: u32 = hv_abi::grant::DOMID_SELF as u32;

/// `event_channel_op(cmd, &mut arg)`.
fn op_struct<T>(cmd: u64, arg: &mut T) -> Result<(), Error> {
    // SAFETY: `arg` is an exclusively borrowed, identity-mapped structure of the type
    // the command reads and writes back; the hypervisor touches nothing else.
    let ret = unsafe { hypercall2(Op::EventChannelOp, cmd, virt_to_phys(arg as *mut T)) };
    check(ret).map(|_| ())
}

/// `event_channel_op(cmd, port)` for the commands that take a port.
fn op_port(cmd: u64, port: Port) -> Result<(), Error> {
    // SAFETY: SEND, CLOSE and UNMASK take no pointer; they change event-channel state
    // only (pending and mask bits in shared_info are accessed atomically here).
    let ret = unsafe { hypercall2(Op::EventChannelOp, cmd, u64::from(port)) };
    check(ret).map(|_| ())
}

/// `EVTCHNOP_ALLOC_UNBOUND`: allocates a port that domain `remote_dom` (or
/// [`DOMID_SELF`]) may bind with [`bind_interdomain`]. Returns the new port.
pub fn alloc_unbound(remote_dom: u32) -> Result<Port, Error> {
    let mut a = EvtchnAllocUnbound {
        remote_dom,
        port: 0,
    };
    op_struct(EVTCHNOP_ALLOC_UNBOUND, &mut a)?;
    Ok(a.port)
}

/// `EVTCHNOP_BIND_INTERDOMAIN`: connects a new local port to `remote_port` of
/// `remote_dom`, which that domain allocated for us. Returns the local port, which
/// starts pending (SPEC §8.6).
pub fn bind_interdomain(remote_dom: u32, remote_port: Port) -> Result<Port, Error> {
    let mut b = EvtchnBindInterdomain {
        remote_dom,
        remote_port,
        ..Default::default()
    };
    op_struct(EVTCHNOP_BIND_INTERDOMAIN, &mut b)?;
    Ok(b.local_port)
}

/// `EVTCHNOP_BIND_VIRQ`: binds virtual IRQ `virq` (for example [`VIRQ_TIMER`]) of
/// vCPU `vcpu` to a new port and returns it.
pub fn bind_virq(virq: u32, vcpu: u32) -> Result<Port, Error> {
    let mut b = EvtchnBindVcpu {
        virq,
        vcpu,
        ..Default::default()
    };
    op_struct(EVTCHNOP_BIND_VIRQ, &mut b)?;
    Ok(b.port)
}

/// `EVTCHNOP_BIND_IPI`: allocates a port that notifies vCPU `vcpu` of this domain
/// when sent to, and returns it.
pub fn bind_ipi(vcpu: u32) -> Result<Port, Error> {
    let mut b = EvtchnBindVcpu {
        vcpu,
        ..Default::default()
    };
    op_struct(EVTCHNOP_BIND_IPI, &mut b)?;
    Ok(b.port)
}

/// `EVTCHNOP_BIND_VCPU`: delivers `port` (unbound or interdomain) to vCPU `vcpu`
/// from now on.
pub fn bind_vcpu(port: Port, vcpu: u32) -> Result<(), Error> {
    let mut b = EvtchnBindVcpu {
        port,
        vcpu,
        ..Default::default()
    };
    op_struct(EVTCHNOP_BIND_VCPU, &mut b)
}

/// `EVTCHNOP_SEND`: sends an event on `port` (to the peer of an interdomain port, to
/// the bound vCPU of an IPI port).
#[inline]
pub fn send(port: Port) -> Result<(), Error> {
    op_port(EVTCHNOP_SEND, port)
}

/// `EVTCHNOP_CLOSE`: closes `port` (an interdomain peer's port becomes unbound). The
/// port's handler stays registered; see [`clear_handler`].
pub fn close(port: Port) -> Result<(), Error> {
    op_port(EVTCHNOP_CLOSE, port)
}

/// `EVTCHNOP_UNMASK`: clears `port`'s mask bit and, if it is pending, delivers it
/// (which may raise an upcall at once).
pub fn unmask(port: Port) -> Result<(), Error> {
    op_port(EVTCHNOP_UNMASK, port)
}

/// `EVTCHNOP_STATUS`: the state of `port` (`status` is one of the `EVTCHNSTAT_*`
/// values re-exported here).
pub fn status(port: Port) -> Result<EvtchnStatus, Error> {
    let mut s = EvtchnStatus {
        port,
        ..Default::default()
    };
    op_struct(EVTCHNOP_STATUS, &mut s)?;
    Ok(s)
}

// ---- shared_info bitmaps and per-vCPU upcall state -------------------------------

/// The shared_info page (boot identity map).
fn shared() -> *mut SharedInfo {
    SHARED_INFO_GPA as *mut SharedInfo
}

/// Word `w` of `evtchn_pending` (`w` < 64).
fn pending_word(w: usize) -> &'static AtomicU64 {
    debug_assert!(w < NR_EVENT_CHANNELS / 64);
    // SAFETY: shared_info is identity-mapped RAM for the domain's life; the word is 8-aligned
    // and in bounds (`w` < 64); the hypervisor changes it concurrently, so it is only
    // accessed atomically.
    unsafe { &*(core::ptr::addr_of_mut!((*shared()).evtchn_pending[w]) as *const AtomicU64) }
}

/// Word `w` of `evtchn_mask` (`w` < 64).
fn mask_word(w: usize) -> &'static AtomicU64 {
    debug_assert!(w < NR_EVENT_CHANNELS / 64);
    // SAFETY: as `pending_word`.
    unsafe { &*(core::ptr::addr_of_mut!((*shared()).evtchn_mask[w]) as *const AtomicU64) }
}

/// vCPU `vcpu`'s `vcpu_info` record, `None` if `vcpu` >= [`MAX_VCPUS`].
pub(crate) fn vcpu_info(vcpu: u32) -> Option<*mut VcpuInfo> {
    let v = vcpu as usize;
    if v >= MAX_VCPUS {
        return None;
    }
    // SAFETY: only computes an address: `v` < MAX_VCPUS, so the record is inside the
    // shared_info page (nothing is read or written here).
    Some(unsafe { core::ptr::addr_of_mut!((*shared()).vcpu_info[v]) })
}

/// The atomic views of a vCPU's `upcall_pending`, `upcall_mask` and `pending_sel`.
struct UpcallState {
    pending: &'static AtomicU8,
    mask: &'static AtomicU8,
    sel: &'static AtomicU64,
}

fn upcall_state(vcpu: u32) -> Option<UpcallState> {
    let vi = vcpu_info(vcpu)?;
    // SAFETY: the record is in shared_info (identity-mapped for the domain's life);
    // the fields are naturally aligned and shared with the hypervisor, which changes
    // them atomically, so they are only accessed through atomics.
    unsafe {
        Some(UpcallState {
            pending: &*(core::ptr::addr_of_mut!((*vi).upcall_pending) as *const AtomicU8),
            mask: &*(core::ptr::addr_of_mut!((*vi).upcall_mask) as *const AtomicU8),
            sel: &*(core::ptr::addr_of_mut!((*vi).pending_sel) as *const AtomicU64),
        })
    }
}

/// Checks a port number: 1..4096.
fn check_port(port: Port) -> Result<(usize, u64), Error> {
    let p = port as usize;
    if p == 0 || p >= NR_EVENT_CHANNELS {
        return Err(Error::Errno(Errno::EINVAL));
    }
    Ok((p / 64, 1u64 << (p % 64)))
}

/// Sets `port`'s mask bit in shared_info: events on it stay pending and raise no
/// upcall until [`unmask`]. Fails with `EINVAL` for a port out of range.
pub fn mask(port: Port) -> Result<(), Error> {
    let (w, bit) = check_port(port)?;
    mask_word(w).fetch_or(bit, Ordering::AcqRel);
    Ok(())
}

/// True if `port`'s mask bit is set (false for a port out of range).
pub fn is_masked(port: Port) -> bool {
    check_port(port).is_ok_and(|(w, bit)| mask_word(w).load(Ordering::Acquire) & bit != 0)
}

/// True if `port`'s pending bit is set (false for a port out of range).
pub fn is_pending(port: Port) -> bool {
    check_port(port).is_ok_and(|(w, bit)| pending_word(w).load(Ordering::Acquire) & bit != 0)
}

/// Atomically clears `port`'s pending bit; returns whether it was set (false for a
/// port out of range).
pub fn clear_pending(port: Port) -> bool {
    check_port(port)
        .is_ok_and(|(w, bit)| pending_word(w).fetch_and(!bit, Ordering::AcqRel) & bit != 0)
}

/// Sets or clears vCPU `vcpu`'s `upcall_mask` (the software interrupt mask) and
/// returns its previous value. Clearing it does not deliver what arrived meanwhile:
/// use [`crate::upcall::unmask_upcalls`] for that. False, and nothing done, if `vcpu`
/// >= [`MAX_VCPUS`].
pub fn set_upcall_mask(vcpu: u32, masked: bool) -> bool {
    upcall_state(vcpu).is_some_and(|s| s.mask.swap(masked as u8, Ordering::AcqRel) != 0)
}

/// True if vCPU `vcpu`'s `upcall_pending` is set (events await [`dispatch`]).
pub fn upcall_pending(vcpu: u32) -> bool {
    upcall_state(vcpu).is_some_and(|s| s.pending.load(Ordering::Acquire) != 0)
}

// ---- handlers and dispatch -------------------------------------------------------

/// One handler slot per port: a `Handler` cast to a pointer, or null.
static HANDLERS: [AtomicPtr<()>; NR_EVENT_CHANNELS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; NR_EVENT_CHANNELS];
/// Events [`dispatch`] took off ports without a handler.
static UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Registers `handler` for `port`, replacing any previous one. Fails with `EINVAL`
/// for a port out of range. Safe to call while upcalls arrive: a concurrent dispatch
/// calls either the old or the new handler.
pub fn set_handler(port: Port, handler: Handler) -> Result<(), Error> {
    check_port(port)?;
    HANDLERS[port as usize].store(handler as *mut (), Ordering::Release);
    Ok(())
}

/// Removes `port`'s handler: its events are then counted in [`unhandled_events`] and
/// dropped.
pub fn clear_handler(port: Port) {
    if let Some(slot) = HANDLERS.get(port as usize) {
        slot.store(core::ptr::null_mut(), Ordering::Release);
    }
}

/// Number of events [`dispatch`] found on ports without a handler (and dropped).
pub fn unhandled_events() -> u64 {
    UNHANDLED.load(Ordering::Acquire)
}

/// Calls `port`'s handler, or counts the event as unhandled.
fn call_handler(port: usize) {
    let p = HANDLERS[port].load(Ordering::Acquire);
    if p.is_null() {
        UNHANDLED.fetch_add(1, Ordering::AcqRel);
        return;
    }
    // SAFETY: the only non-null values stored in HANDLERS are `Handler` function
    // pointers cast to `*mut ()` by `set_handler`; casting back gives the same
    // function pointer.
    let handler = unsafe { core::mem::transmute::<*mut (), Handler>(p) };
    handler(port as Port);
}

/// The upcall work for vCPU `vcpu` (SPEC §8.6): clears `upcall_pending`, takes the
/// selector with an atomic exchange, and for each selected word clears and handles
/// every pending, unmasked port; repeats while `upcall_pending` was set again.
/// Returns the number of events handled (including unhandled ones).
///
/// The upcall interrupt handler of [`crate::upcall`] calls it; a kernel calls it
/// directly (with interrupts disabled, so that it does not nest) after clearing
/// `upcall_mask` while `upcall_pending` is set. Ports of other vCPUs that happen to be
/// pending in a selected word are handled too.
pub fn dispatch(vcpu: u32) -> u32 {
    let Some(s) = upcall_state(vcpu) else {
        return 0;
    };
    let mut handled = 0u32;
    loop {
        s.pending.store(0, Ordering::Release);
        let mut sel = s.sel.swap(0, Ordering::AcqRel);
        while sel != 0 {
            let w = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            let mut ready =
                pending_word(w).load(Ordering::Acquire) & !mask_word(w).load(Ordering::Acquire);
            while ready != 0 {
                let b = ready.trailing_zeros() as usize;
                ready &= ready - 1;
                let bit = 1u64 << b;
                if pending_word(w).fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    call_handler(w * 64 + b);
                    handled = handled.wrapping_add(1);
                }
            }
        }
        if s.pending.load(Ordering::Acquire) == 0 {
            return handled;
        }
    }
}
