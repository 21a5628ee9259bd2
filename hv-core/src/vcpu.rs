//! vCPUs: the run loop, exit handling and kicks.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread. Registers for hypercalls are
//! read from and written to KVM's sync_regs area (no extra ioctls on the hot path).
//! Every exit kind is handled; anything the guest is not allowed to do crashes the
//! domain with a report, never the hypervisor. A failure of the host instead (KVM_RUN
//! failing, or an access KVM could not complete because the host cannot back guest
//! memory: a passthrough file on a full file system or truncated) ends the domain
//! with a host fault ([`Outcome::HostFault`]) that names the memory and the errno.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Instant;

use hv_abi::mmu::PTE_ADDR_MASK;

use hv_abi::hypercall::VcpuContext;
use hv_abi::hypercall::HYPERCALL_PORT;
use kvm_bindings::CpuId;
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

use crate::boot;
use crate::domain::{DomainError, DomainShared, VcpuState};
use crate::exit::{self, Exit, GpaKind, KvmExit, MemoryMap};
use crate::hypercall::{self, Call, Disposition};
use crate::mmu::hypercalls::VcpuEffects;
use crate::outcome::{CrashReason, CrashReport, HostFault, HostMemory, Outcome};
use crate::stats::{ExitKind, ExitStats};

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run mapping,
        // which stays mapped while it is set (cleared before the vCPU is dropped).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

static KICK_INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the process-wide handler of the signal that kicks vCPUs out of KVM_RUN.
pub fn install_kick_handler() -> Result<(), DomainError> {
    KICK_INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| DomainError::Thread(std::io::Error::other(e)))
}

/// Kicks a thread running a vCPU: KVM_RUN returns (now or as soon as it is entered).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: the thread id is registered only while the thread runs its vCPU loop, and
    // unregistered under the same lock the caller holds, so the thread is alive.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// One vCPU.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    stats: ExitStats,
    /// The last CR3 found to be a pinned L4, and the unpin generation it was checked at.
    cr3_ok: Option<(u64, u64)>,
}

/// The domain's guest-physical map, for exit classification.
impl MemoryMap for DomainShared {
    fn gpa_kind(&self, gpa: u64) -> GpaKind {
        if gpa < self.mem.ram_bytes() {
            GpaKind::Ram
        } else if self.in_pool(gpa) {
            GpaKind::Pool
        } else if self.devices.regions().find(gpa).is_some() {
            GpaKind::Region
        } else {
            GpaKind::Nothing
        }
    }
}

/// The memory a host fault concerns, named for the report.
fn fault_memory(
    dom: &DomainShared,
    gpa: Option<u64>,
    errno: Option<i32>,
    kind: GpaKind,
) -> Option<HostMemory> {
    let regions = dom.devices.regions();
    match kind {
        GpaKind::Ram => Some(HostMemory::Ram),
        GpaKind::Pool => Some(HostMemory::PageTablePool),
        GpaKind::Region => Some(regions.diagnose(gpa).unwrap_or(HostMemory::Unknown)),
        // KVM_RUN failed with EFAULT/EHWPOISON: guest memory could not be faulted in,
        // and KVM did not say where: the first region whose file shows a cause.
        GpaKind::Nothing if matches!(errno, Some(libc::EFAULT | libc::EHWPOISON)) => {
            Some(regions.diagnose(None).unwrap_or(HostMemory::Unknown))
        }
        GpaKind::Nothing => None,
    }
}

/// How a vCPU's run ends.
enum End {
    /// The guest is at fault.
    Crash(ExitKind, CrashReason),
    /// The host failed.
    Host(ExitKind, HostFault),
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID table and sync_regs enabled.
    pub fn new(vm: &VmFd, id: u32, cpuid: &CpuId) -> Result<Vcpu, DomainError> {
        let mut fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| DomainError::Kvm {
                what: "create vCPU",
                source,
            })?;
        fd.set_cpuid2(cpuid).map_err(|source| DomainError::Kvm {
            what: "set CPUID",
            source,
        })?;
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        Ok(Vcpu {
            id,
            fd,
            stats: ExitStats::default(),
            cr3_ok: None,
        })
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Exit statistics so far.
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }

    /// Puts the vCPU in the boot state at `rip` with `rsp`, RDI = `rdi`, CR3 = `cr3`.
    pub fn set_boot_state(
        &self,
        rip: u64,
        rsp: u64,
        rdi: u64,
        cr3: u64,
    ) -> Result<(), DomainError> {
        let sregs = self.fd.get_sregs().map_err(|source| DomainError::Kvm {
            what: "get sregs",
            source,
        })?;
        self.fd
            .set_sregs(&boot::boot_sregs(sregs, cr3))
            .map_err(|source| DomainError::Kvm {
                what: "set sregs",
                source,
            })?;
        self.fd
            .set_regs(&boot::boot_regs(rip, rsp, rdi))
            .map_err(|source| DomainError::Kvm {
                what: "set regs",
                source,
            })?;
        Ok(())
    }

    /// Waits until the guest brings this vCPU up (or the domain stops), then runs it.
    /// Returns the vCPU's statistics.
    pub fn run_secondary(mut self, dom: &DomainShared) -> ExitStats {
        let ctx: Option<VcpuContext> = {
            let Ok(mut states) = dom.vcpu_states.lock() else {
                return self.stats;
            };
            loop {
                if dom.is_stopping() {
                    break None;
                }
                if let Some(VcpuState::Up(ctx)) = states.get(self.id as usize) {
                    break Some(*ctx);
                }
                states = match dom.vcpu_cv.wait(states) {
                    Ok(s) => s,
                    Err(_) => return self.stats,
                };
            }
        };
        if let Some(ctx) = ctx {
            tracing::debug!(vcpu = self.id, rip = ctx.rip, "vCPU up");
            // With the in-kernel irqchip an application processor waits for INIT/SIPI;
            // vcpu_op starts it directly instead.
            let runnable = self
                .fd
                .set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                })
                .map_err(|source| DomainError::Kvm {
                    what: "set MP state",
                    source,
                });
            match runnable.and_then(|()| self.set_boot_state(ctx.rip, ctx.rsp, ctx.arg, ctx.cr3)) {
                Ok(()) => self.run(dom),
                Err(e) => dom.finish(Outcome::Crash(Box::new(CrashReport::without_regs(
                    self.id,
                    CrashReason::Kvm(e.to_string()),
                )))),
            }
        }
        self.stats
    }

    /// Runs the vCPU until the domain stops.
    pub fn run(&mut self, dom: &DomainShared) {
        let span = tracing::debug_span!("vcpu", id = self.id);
        let _e = span.enter();
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        dom.set_thread(self.id, Some(unsafe { libc::pthread_self() }));
        if let Err(e) = dom.time.publish_vcpu(&dom.mem, &self.fd, self.id) {
            tracing::warn!(vcpu = self.id, error = %e, "system time not published");
        }
        self.run_loop(dom);
        dom.set_thread(self.id, None);
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    fn run_loop(&mut self, dom: &DomainShared) {
        let id = self.id;
        loop {
            if dom.pause_requested() {
                dom.park(self.id);
            }
            if dom.is_stopping() {
                return;
            }
            // What to do is decided by `exit::classify` (pure, unit-tested); this
            // loop only carries it out.
            let exit = exit::classify(KvmExit::from_run(self.fd.run()), dom, HYPERCALL_PORT);
            let kind = exit.kind();
            let outcome = match exit {
                Exit::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.stats.exit(kind);
                    continue;
                }
                Exit::Hypercall => Ok(kind),
                Exit::PageTableWrite { gpa, data } => dom
                    .trapped_write(id, gpa, data)
                    .map(|()| kind)
                    .map_err(|r| End::Crash(kind, r)),
                // A port no device has crashes the domain.
                Exit::PortOut { port, data } => match dom.devices.pio_write(port, data) {
                    true => Ok(kind),
                    false => Err(End::Crash(kind, unknown_port(port, data.len(), "out"))),
                },
                Exit::PortIn { port, data } => match dom.devices.pio_read(port, data) {
                    true => Ok(kind),
                    false => Err(End::Crash(kind, unknown_port(port, data.len(), "in"))),
                },
                Exit::HostFault { gpa, errno, memory } => Err(End::Host(
                    kind,
                    HostFault {
                        vcpu: id,
                        kvm_errno: errno,
                        gpa,
                        memory: fault_memory(dom, gpa, errno, memory),
                    },
                )),
                Exit::Crash(kind, reason) => Err(End::Crash(kind, reason)),
            };
            // After every exit the guest resumes from: it must run on a pinned L4 of
            // this domain.
            let outcome = match outcome {
                Ok(kind) => match self.check_cr3(dom) {
                    Ok(()) => Ok(kind),
                    Err(reason) => Err(End::Crash(kind, reason)),
                },
                end => end,
            };
            match outcome {
                Ok(ExitKind::Hypercall) => {
                    self.stats.exit(ExitKind::Hypercall);
                    if self.hypercall(dom) == Disposition::Stop {
                        return;
                    }
                }
                Ok(kind) => self.stats.exit(kind),
                Err(End::Crash(kind, mut reason)) => {
                    self.stats.exit(kind);
                    if let CrashReason::EmulationFailure { suberror } = &mut reason {
                        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                        // `internal` member of the union is the one KVM filled in.
                        *suberror =
                            unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    }
                    self.crash(dom, reason);
                    return;
                }
                Err(End::Host(kind, fault)) => {
                    self.stats.exit(kind);
                    let rip = self.fd.get_regs().ok().map(|r| r.rip);
                    tracing::error!(vcpu = self.id, %fault, rip, "domain stopped by a host fault");
                    dom.finish(Outcome::HostFault(Box::new(fault)));
                    return;
                }
            }
        }
    }

    /// Checks the CR3 of the last exit (from sync_regs) against the pinned L4 tables,
    /// with a cache that an unpin anywhere in the domain invalidates.
    #[inline]
    fn check_cr3(&mut self, dom: &DomainShared) -> Result<(), CrashReason> {
        let cr3 = self.fd.sync_regs_mut().sregs.cr3 & PTE_ADDR_MASK;
        let gen = dom.unpin_gen.load(Ordering::Acquire);
        if self.cr3_ok == Some((cr3, gen)) {
            return Ok(());
        }
        let ok = dom.mmu.lock().map(|m| m.is_pinned_l4(cr3)).unwrap_or(false);
        if !ok {
            return Err(CrashReason::Cr3Bypass { cr3 });
        }
        self.cr3_ok = Some((cr3, gen));
        Ok(())
    }

    /// Handles a hypercall exit: registers from sync_regs, result into RAX.
    #[inline]
    fn hypercall(&mut self, dom: &DomainShared) -> Disposition {
        let t0 = Instant::now();
        let sync = self.fd.sync_regs_mut();
        let r = &sync.regs;
        let call = Call {
            op: r.rax,
            args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8],
            cpl: (sync.sregs.cs.selector & 3) as u8,
            cr3: sync.sregs.cr3,
        };
        let mut effects = VcpuEffects::default();
        let d = hypercall::dispatch(dom, self.id, call, &mut effects);
        let ok = match d {
            Disposition::Return(v) => {
                let sync = self.fd.sync_regs_mut();
                // A negative errno goes to RAX as its two's complement (SPEC §2).
                sync.regs.rax = u64::from_ne_bytes(v.to_ne_bytes());
                if let Some(cr3) = effects.new_cr3 {
                    sync.sregs.cr3 = cr3;
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                v >= 0
            }
            Disposition::Stop => true,
        };
        self.stats
            .hypercall(call.op, ok, crate::conv::duration_ns(t0.elapsed()));
        if let Disposition::Return(v) = d {
            if v < 0 {
                // Which call failed and why, by name (RUST_LOG=hv_core=debug).
                let op = hv_abi::Op::from_u64(call.op).map(|o| format!("{o:?}"));
                let errno = hv_abi::Errno::from_ret(v);
                tracing::debug!(
                    vcpu = self.id,
                    op = op.as_deref().unwrap_or("unknown"),
                    nr = call.op,
                    cmd = call.args[0],
                    errno = errno.map_or("?", |e| e.name()),
                    "hypercall failed"
                );
            }
        }
        tracing::trace!(op = call.op, ?d, "hypercall");
        d
    }

    fn crash(&mut self, dom: &DomainShared, reason: CrashReason) {
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        // The report itself is printed by whoever ran the domain (`hv run`'s summary).
        tracing::debug!(vcpu = self.id, %reason, rip = regs.map(|r| r.rip), "domain crashed");
        dom.finish(Outcome::Crash(Box::new(CrashReport {
            vcpu: self.id,
            reason,
            regs,
            sregs,
        })));
    }
}

fn unknown_port(port: u16, size: usize, dir: &'static str) -> CrashReason {
    CrashReason::UnknownPort {
        port,
        size: u32::try_from(size).unwrap_or(u32::MAX),
        dir,
    }
}
