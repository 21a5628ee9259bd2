//! Domains: one KVM VM each, with its memory, vCPUs and shared state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hv_abi::hypercall::VcpuContext;
use hv_abi::start_info::SIF_USER_HYPERCALLS;
use hv_abi::{layout, Features};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::boot::{self, BootError, BootInfo, StartInfoParams};
use crate::coherence::HostPaging;
use crate::console::{Console, ConsoleSink};
use crate::devices::passthrough::{DomainRegions, PassthroughError};
use crate::devices::{ConsoleSpec, DeviceError, DeviceSpec, Devices};
use crate::evtchn::EventChannels;
use crate::grant::{GrantError, Grants};
use crate::loader::{KernelImage, LoadError};
use crate::memory::{DomainMemory, MemoryError};
use crate::mmu::PoolAccess;
use crate::mmu::{Layout, Mmu};
use crate::outcome::{CrashReason, CrashReport, Outcome};
use crate::registry::Registry;
use crate::stats::ExitStats;
use crate::time::DomainTime;
use crate::upcall::{Upcall, UpcallError};
use crate::vcpu::{self, Vcpu};

/// The ABI features this build of hv implements.
pub const FEATURES: Features = Features(
    Features::CONSOLE_IO.bits()
        | Features::SCHED.bits()
        | Features::VCPU_OP.bits()
        | Features::PV_MMU.bits()
        | Features::EVTCHN.bits()
        | Features::TIMER.bits()
        | Features::GNTTAB.bits()
        | Features::PV_CONSOLE.bits()
        | Features::PV_BLOCK.bits()
        | Features::DEV_OP.bits(),
);

/// Default RAM size.
pub const DEFAULT_MEM_BYTES: u64 = 64 << 20;
/// Default number of page-table pool frames beyond the boot tables.
pub const DEFAULT_POOL_EXTRA_FRAMES: u64 = 256;

/// Memory slot numbers.
const SLOT_RAM: u32 = 0;
const SLOT_POOL: u32 = 1;
const SLOT_GRANT_WINDOW: u32 = 2;

/// How to build a domain.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    /// Name, for logs and reports.
    pub name: String,
    /// Domain id.
    pub domid: u32,
    /// RAM in bytes (a multiple of 4 KiB, 2 MiB to 256 GiB).
    pub mem_bytes: u64,
    /// vCPUs (1 to 32).
    pub vcpus: u32,
    /// Kernel command line (at most 1023 bytes, no NUL).
    pub cmdline: String,
    /// Allow hypercalls from guest CPL 3.
    pub allow_user_hypercalls: bool,
    /// Page-table pool frames beyond the boot tables.
    pub pt_pool_extra_frames: u64,
    /// Where console output goes.
    pub console: ConsoleSink,
    /// Devices besides the PV console and the UART every domain has (SPEC §8.9).
    pub devices: Vec<DeviceSpec>,
    /// PV console options: an output file (replacing `console`), an input.
    pub console_spec: ConsoleSpec,
    /// The page-table coherence strategy for this domain ([`crate::coherence`]); `None`
    /// (the default): the process-wide one (`HV_HOST_PAGING`, else the probe). Tests
    /// force [`HostPaging::Shadow`] to exercise the remedies on any host.
    pub host_paging: Option<HostPaging>,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            name: "domain0".into(),
            domid: 0,
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: 1,
            cmdline: String::new(),
            allow_user_hypercalls: false,
            pt_pool_extra_frames: DEFAULT_POOL_EXTRA_FRAMES,
            console: ConsoleSink::Stdout,
            devices: Vec::new(),
            console_spec: ConsoleSpec::default(),
            host_paging: None,
        }
    }
}

/// Errors creating or running a domain.
#[derive(Debug, Error)]
pub enum DomainError {
    /// The kernel image was refused.
    #[error("kernel refused: {0}")]
    Load(#[from] LoadError),
    /// The boot environment could not be built (for example a bad command line).
    #[error("{0}")]
    Boot(#[from] BootError),
    /// Memory could not be set up.
    #[error("{0}")]
    Memory(#[from] MemoryError),
    /// A parameter (RAM size, vCPU count, command line) breaks its rule.
    #[error("{0}")]
    Param(#[from] crate::params::ParamError),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be built.
    #[error("cannot build the CPUID table: {0}")]
    Cpuid(String),
    /// KVM's CPUID support could not be read.
    #[error("{0}")]
    CpuidSupport(#[from] crate::cpuid::CpuidError),
    /// The boot page tables failed the PV MMU's validation (a hypervisor bug).
    #[error("the boot page tables failed validation: {0}")]
    BootTables(hv_abi::Errno),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Upcall delivery (irqchip, irqfds) could not be set up.
    #[error("{0}")]
    Upcall(#[from] UpcallError),
    /// Event channels could not be set up.
    #[error("{0}")]
    Evtchn(#[from] crate::evtchn::EvtchnError),
    /// Grant tables could not be set up.
    #[error("{0}")]
    Grant(#[from] GrantError),
    /// Two domains could not be connected.
    #[error("cannot connect the domains: {0}")]
    Connect(hv_abi::Errno),
    /// Another live domain has this id.
    #[error("domain id {0} is already in use")]
    DomainIdTaken(u32),
    /// The domain id is out of range.
    #[error("domain id {0} is out of range (0..{max})", max = MAX_DOMID)]
    BadDomainId(u32),
    /// A device could not be set up.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// A passthrough region could not be assigned or mapped.
    #[error("{0}")]
    Passthrough(#[from] PassthroughError),
    /// The process ran out of file descriptors (`RLIMIT_NOFILE`).
    #[error("{0}")]
    FdLimit(#[from] crate::fdlimit::FdLimitError),
}

/// Domain ids are below this (0x7FF0 and up are special ids such as `DOMID_SELF`).
pub const MAX_DOMID: u32 = 0x7FF0;

impl DomainError {
    /// True when the error comes from what the user asked for (a bad kernel or bad
    /// parameters) rather than from the host.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            DomainError::Load(_)
                | DomainError::Param(_)
                | DomainError::DomainIdTaken(_)
                | DomainError::BadDomainId(_)
                | DomainError::Boot(BootError::Cmdline(_))
                | DomainError::Memory(MemoryError::BadSize(_))
        ) || matches!(self, DomainError::Device(e) if e.is_user_error())
            || matches!(self, DomainError::Passthrough(e) if e.is_user_error())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DomainError {
    move |source| DomainError::Kvm { what, source }
}

/// The run state of a vCPU, as `vcpu_op` sees it.
#[derive(Clone, Copy, Debug)]
pub enum VcpuState {
    /// Not initialised.
    Down,
    /// Initialised, waiting for `VCPUOP_UP`.
    Initialised(VcpuContext),
    /// Running.
    Up(VcpuContext),
}

/// State shared by all vCPU threads of a domain.
#[derive(Debug)]
pub struct DomainShared {
    /// The KVM VM (declared first: dropped before the memory it maps).
    pub vm: VmFd,
    /// The pool's memory region, for re-registering it after a zap.
    pool_region: kvm_userspace_memory_region,
    /// How this host translates guest page tables.
    pub host_paging: HostPaging,
    /// Set while one vCPU needs the others out of the guest (memslot zap).
    pause_flag: AtomicBool,
    /// How many times running vCPUs were paused for another one.
    pauses: AtomicU64,
    pause: Mutex<PauseState>,
    pause_cv: Condvar,
    /// Name.
    pub name: String,
    /// Domain id.
    pub domid: u32,
    /// Memory.
    pub mem: DomainMemory,
    /// Features offered to the guest.
    pub features: Features,
    /// Hypercalls from CPL 3 allowed.
    pub allow_user_hypercalls: bool,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Console.
    pub console: Console,
    /// Set when the domain is stopping.
    pub stopping: AtomicBool,
    /// vCPU run states (for `vcpu_op`).
    pub vcpu_states: Mutex<Vec<VcpuState>>,
    /// Signalled when a vCPU state changes or the domain stops.
    pub vcpu_cv: Condvar,
    /// The PV MMU: frame table of the page-table pool.
    pub mmu: Mutex<Mmu>,
    /// The page-table root each vCPU holds (SPEC 8.4, 8.5.4): the boot root for vCPU 0,
    /// the context's `cr3` from `VCPUOP_INITIALISE` on for the others, then whatever
    /// `MMUEXT_NEW_BASEPTR` loads. 0 (never a pool frame) for a vCPU that is down and
    /// was never initialised: it holds no page table, so it keeps no table pinned.
    pub vcpu_cr3: Vec<AtomicU64>,
    /// Bumped whenever a table is unpinned, so vCPUs re-check their cached CR3.
    pub unpin_gen: AtomicU64,
    outcome: Mutex<Option<Outcome>>,
    /// The hypervisor's live domains (for event channels and grants).
    pub registry: Arc<Registry>,
    /// Event channels.
    pub evtchn: Arc<EventChannels>,
    /// Upcall delivery: irqfds, vectors, and where blocked vCPUs sleep.
    pub upcall: Arc<Upcall>,
    /// System time and timers.
    pub time: Arc<DomainTime>,
    /// Grant tables (other domains reach them through the registry).
    pub grants: Arc<Grants>,
    /// Devices: the device table and the back-ends.
    pub devices: Devices,
    /// vCPUs sleeping in `SCHEDOP_BLOCK` or `SCHEDOP_POLL` right now.
    pub sleeping: AtomicU64,
    /// Threads currently running vCPUs, by index (for kicks).
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
}

impl DomainShared {
    /// Records the domain's outcome (the first one wins) and stops every vCPU.
    pub fn finish(&self, outcome: Outcome) {
        if let Ok(mut o) = self.outcome.lock() {
            if o.is_none() {
                *o = Some(outcome);
            }
        }
        self.request_stop();
    }

    /// Stops every vCPU: sets the flag, wakes waiting vCPUs, kicks running ones.
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.time.stop();
        if let Ok(_g) = self.vcpu_states.lock() {
            self.vcpu_cv.notify_all();
        }
        if let Ok(_g) = self.pause.lock() {
            self.pause_cv.notify_all();
        }
        self.upcall.wake_all();
        self.kick_others();
    }

    /// Runs `f` (a sleep in `SCHEDOP_BLOCK` or `SCHEDOP_POLL`) with vCPU `id` counted
    /// as parked, so another vCPU's pause does not wait for it.
    pub fn out_of_guest<T>(&self, id: u32, f: impl FnOnce() -> T) -> T {
        let set = |v: bool| {
            if let Ok(mut st) = self.pause.lock() {
                if let Some(p) = st.parked.get_mut(id as usize) {
                    *p = v;
                }
                self.pause_cv.notify_all();
            }
        };
        set(true);
        self.sleeping.fetch_add(1, Ordering::AcqRel);
        let r = f();
        self.sleeping.fetch_sub(1, Ordering::AcqRel);
        set(false);
        r
    }

    /// Appends `extra` to the domain's command line (before it runs), separated by a
    /// space.
    pub fn append_cmdline(&self, extra: &str) -> Result<(), DomainError> {
        use hv_abi::start_info::StartInfo;
        let mut si: StartInfo = self.mem.read_obj(layout::START_INFO_GPA)?;
        let old = String::from_utf8_lossy(si.cmdline_bytes()).into_owned();
        let new = if old.is_empty() {
            extra.to_string()
        } else {
            format!("{old} {extra}")
        };
        crate::params::check_cmdline(&new)?;
        si.cmdline = [0; hv_abi::start_info::CMDLINE_MAX];
        si.cmdline[..new.len()].copy_from_slice(new.as_bytes());
        si.cmdline_len = u32::try_from(new.len())
            .map_err(|_| crate::params::ParamError::CmdlineTooLong(new.len()))?;
        self.mem.write_obj(layout::START_INFO_GPA, &si)?;
        Ok(())
    }

    /// Kicks every running vCPU thread but the caller's out of KVM_RUN.
    fn kick_others(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Ok(threads) = self.threads.lock() {
            for t in threads.iter().flatten() {
                if *t != me {
                    vcpu::kick(*t);
                }
            }
        }
    }

    /// True while a vCPU asked the others to pause (checked before every KVM_RUN).
    #[inline]
    pub fn pause_requested(&self) -> bool {
        self.pause_flag.load(Ordering::Acquire)
    }

    /// Parks vCPU `id` until the pause is over (or the domain stops).
    pub fn park(&self, id: u32) {
        let Ok(mut st) = self.pause.lock() else {
            return;
        };
        if let Some(p) = st.parked.get_mut(id as usize) {
            *p = true;
        }
        self.pause_cv.notify_all();
        while st.requested && !self.is_stopping() {
            st = match self.pause_cv.wait(st) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
        if let Some(p) = st.parked.get_mut(id as usize) {
            *p = false;
        }
    }

    /// Runs `f` with every other running vCPU of the domain out of the guest.
    fn with_others_paused(&self, me: u32, f: impl FnOnce()) {
        // Take the pause, or wait (parked) for another vCPU's pause to end first.
        loop {
            let Ok(mut st) = self.pause.lock() else {
                return;
            };
            if !st.requested {
                st.requested = true;
                self.pause_flag.store(true, Ordering::Release);
                break;
            }
            drop(st);
            self.park(me);
            if self.is_stopping() {
                return;
            }
        }
        let mut waited = false;
        loop {
            self.kick_others();
            let all_parked = {
                let threads = self.threads.lock().map(|t| t.clone()).unwrap_or_default();
                let Ok(st) = self.pause.lock() else { break };
                threads.iter().enumerate().all(|(i, t)| {
                    u32::try_from(i) == Ok(me)
                        || t.is_none()
                        || st.parked.get(i).copied().unwrap_or(true)
                })
            };
            if all_parked || self.is_stopping() {
                break;
            }
            waited = true;
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        if waited {
            self.pauses.fetch_add(1, Ordering::Relaxed);
        }
        f();
        if let Ok(mut st) = self.pause.lock() {
            st.requested = false;
            self.pause_flag.store(false, Ordering::Release);
            self.pause_cv.notify_all();
        }
    }

    /// Makes the page-table changes recorded by the MMU visible to the guest on this
    /// host (see [`crate::coherence`]). `me` is the calling vCPU.
    pub fn make_coherent(&self, me: u32) {
        if self.host_paging == HostPaging::Coherent {
            if let Ok(mut m) = self.mmu.lock() {
                m.take_changes();
            }
            return;
        }
        let mut changes = match self.mmu.lock() {
            Ok(mut m) => m.take_changes(),
            Err(_) => return,
        };
        changes.old_l1_targets.sort_unstable();
        changes.old_l1_targets.dedup();
        for gpa in &changes.old_l1_targets {
            crate::coherence::forget_frame(&self.mem, *gpa);
            self.grants.forget_frame(*gpa);
            self.devices.regions().forget_frame(*gpa);
        }
        if changes.upper {
            self.with_others_paused(me, || {
                let mut gone = self.pool_region;
                gone.memory_size = 0;
                // SAFETY: deleting the pool slot and adding it back with the same,
                // still mapped, memory; the other vCPUs are out of the guest meanwhile.
                let r = unsafe {
                    self.vm
                        .set_user_memory_region(gone)
                        .and_then(|()| self.vm.set_user_memory_region(self.pool_region))
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "re-registering the page-table pool failed");
                }
            });
        }
    }

    /// A guest write that reached the page-table pool (the pool is a read-only memslot):
    /// validated like one `mmu_update` if the frame is a page table, stored as is if
    /// not. Partial writes are allowed only into frames that are not page tables.
    pub fn trapped_write(&self, vcpu: u32, gpa: u64, bytes: &[u8]) -> Result<(), CrashReason> {
        let refuse = |errno| CrashReason::PageTableWrite {
            gpa,
            size: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            errno,
        };
        let mut mmu = self.mmu.lock().map_err(|_| refuse(hv_abi::Errno::EIO))?;
        if let Ok(b) = <[u8; 8]>::try_from(bytes) {
            if gpa % 8 == 0 {
                let r = mmu.write_entry(&mut PoolAccess(&self.mem), gpa, u64::from_le_bytes(b));
                drop(mmu);
                r.map_err(refuse)?;
                // A trapped write is its own flush point: there is no hypercall after it.
                self.make_coherent(vcpu);
                return Ok(());
            }
        }
        let within_entry = (gpa % 8) as usize + bytes.len() <= 8;
        match mmu.frame(gpa) {
            Some(f) if f.type_count == 0 && within_entry => self
                .mem
                .write_any(gpa, bytes)
                .map_err(|_| refuse(hv_abi::Errno::EFAULT)),
            _ => Err(refuse(hv_abi::Errno::EINVAL)),
        }
    }

    /// Takes a dead domain out of the registry and releases what it shares with
    /// others: its event channels (peers' ports become unbound) and its grants (both
    /// what it granted and what it mapped). Idempotent.
    pub fn destroy(&self) {
        self.request_stop();
        // Back-ends first: they hold grants and ports of this domain.
        self.devices.stop(self);
        if let Some(me) = self.registry.get(self.domid) {
            if std::ptr::eq(Arc::as_ptr(&me), self) {
                self.registry.remove(self.domid);
            }
        }
        self.evtchn.destroy(&*self.registry);
        self.grants.destroy(&*self.registry);
    }

    /// True if `gpa` is in the domain's page-table pool.
    pub fn in_pool(&self, gpa: u64) -> bool {
        gpa >= self.mem.pool_gpa() && gpa < self.mem.pool_end()
    }

    /// True once the domain is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Registers (or, with `None`, unregisters) the thread running vCPU `id`.
    pub(crate) fn set_thread(&self, id: u32, t: Option<libc::pthread_t>) {
        if let Ok(mut threads) = self.threads.lock() {
            if let Some(slot) = threads.get_mut(id as usize) {
                *slot = t;
            }
        }
    }
}

/// Who asked the vCPUs to pause, and which vCPUs are parked.
#[derive(Debug, Default)]
struct PauseState {
    requested: bool,
    parked: Vec<bool>,
}

/// A domain that has been created and not run yet.
pub struct Domain {
    vcpus: Vec<Vcpu>,
    shared: Arc<DomainShared>,
    created_in: Duration,
}

/// The result of running a domain.
#[derive(Debug)]
pub struct DomainReport {
    /// Domain name.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Exit statistics of all vCPUs.
    pub stats: ExitStats,
    /// Time to create the domain.
    pub created_in: Duration,
    /// Time from the first vCPU entry to the end.
    pub ran_for: Duration,
    /// How many times running vCPUs had to be paused for another one (memslot zaps).
    pub vcpu_pauses: u64,
}

impl Domain {
    /// Creates a domain on its own (a registry of one) and loads `image` into it.
    /// Nothing runs yet.
    pub fn create(
        kvm: &Kvm,
        config: DomainConfig,
        image: &KernelImage,
    ) -> Result<Domain, DomainError> {
        Domain::create_in(kvm, &Registry::new(), config, image)
    }

    /// Creates a domain in `registry` (where other domains can reach it) and loads
    /// `image` into it. Nothing runs yet.
    pub fn create_in(
        kvm: &Kvm,
        registry: &Arc<Registry>,
        config: DomainConfig,
        image: &KernelImage,
    ) -> Result<Domain, DomainError> {
        let t0 = Instant::now();
        let span = tracing::info_span!("domain", name = %config.name, domid = config.domid);
        let _e = span.enter();
        // RAM first: the kernel-fit rule below depends on it.
        crate::params::check_memory(config.mem_bytes)?;
        crate::params::check_vcpus(config.vcpus)?;
        if config.domid >= MAX_DOMID {
            return Err(DomainError::BadDomainId(config.domid));
        }
        if registry.contains(config.domid) {
            return Err(DomainError::DomainIdTaken(config.domid));
        }
        crate::params::check_cmdline(&config.cmdline)?;
        image.check_abi(FEATURES)?;
        image.check_fits(config.mem_bytes)?;

        let console_sink = crate::devices::console_sink(&config.console_spec, config.console)?;
        let region_specs = DeviceSpec::regions(&config.devices);
        let region_sizes: Vec<u64> = region_specs.iter().map(|r| r.size).collect();

        let ram_mapping = boot::RamMapping::for_kernel_minor(image.note.minor);
        let (pool_frames, _) = boot::pool_frames_for_regions(
            config.mem_bytes,
            config.pt_pool_extra_frames,
            &region_sizes,
            ram_mapping,
        );
        let mem = DomainMemory::new(&config.name, config.mem_bytes, pool_frames)?;
        let first_free = image.load_into(&mem)?;
        let regions = DomainRegions::assign(
            &registry.regions,
            config.domid,
            &region_specs,
            mem.pool_end(),
        )?;
        let region_ranges = regions.ranges();
        let devices = Devices::new(
            &config.devices,
            &config.console_spec,
            &console_sink,
            regions,
        )?;
        let phys_bits = crate::cpuid::phys_bits(&crate::cpuid::supported_cached(kvm)?);
        let (bi, mmu) = boot_page_tables(&mem, &region_ranges, ram_mapping, phys_bits)?;
        boot::write_gdt_tss(&mem)?;
        let flags = if config.allow_user_hypercalls {
            SIF_USER_HYPERCALLS
        } else {
            0
        };
        boot::write_start_info(
            &mem,
            &bi,
            &StartInfoParams {
                domid: config.domid,
                nr_vcpus: config.vcpus,
                flags,
                features: FEATURES,
                kernel: (image.start(), image.end()),
                first_free,
                cmdline: &config.cmdline,
            },
        )?;

        let grants = Arc::new(Grants::new(config.domid, &mem)?);
        let host_paging = config
            .host_paging
            .unwrap_or_else(|| crate::coherence::host_paging(kvm));
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        let mut pool_region = kvm_userspace_memory_region::default();
        let regions = [
            (SLOT_RAM, 0u32, 0u64, mem.ram_bytes()),
            (
                SLOT_POOL,
                KVM_MEM_READONLY,
                mem.pool_gpa(),
                mem.pool_end() - mem.pool_gpa(),
            ),
        ];
        for (slot, flags, gpa, size) in regions {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: mem.host_address(gpa)?,
            };
            if slot == SLOT_POOL {
                pool_region = region;
            }
            // SAFETY: the region is mapped by `mem` for its whole size and stays mapped
            // until after the VM is destroyed (DomainShared drops the VM before the
            // memory).
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))?;
        }
        let (window_host, window_bytes) = grants.window_host();
        let window_region = kvm_userspace_memory_region {
            slot: SLOT_GRANT_WINDOW,
            flags: 0,
            guest_phys_addr: grants.window_gpa(),
            memory_size: window_bytes,
            userspace_addr: window_host,
        };
        // SAFETY: the grant window's reservation is mapped for its whole size by
        // `grants` and stays mapped until after the VM is destroyed (DomainShared drops
        // the VM before its grant state).
        unsafe { vm.set_user_memory_region(window_region) }
            .map_err(kvm_err("set memory region"))?;
        devices.regions().add_memslots(&vm)?;

        // The in-kernel irqchip must exist before the vCPUs.
        crate::upcall::create_irqchip(&vm)?;
        let upcall = Upcall::new(&vm, config.vcpus)?;
        let supported = crate::cpuid::supported_cached(kvm)?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let cpuid = crate::cpuid::build(&supported, id, FEATURES)
                .map_err(|e| DomainError::Cpuid(format!("{e:?}")))?;
            let v = Vcpu::new(&vm, id, &cpuid)?;
            crate::upcall::enable_x2apic(v.fd(), id)?;
            if id == 0 {
                v.set_boot_state(
                    image.entry,
                    layout::BOOT_STACK_TOP - 8,
                    layout::START_INFO_GPA,
                    bi.pt_base,
                )?;
            }
            vcpus.push(v);
        }
        let upcall = Arc::new(upcall);
        let evtchn = Arc::new(EventChannels::new(
            config.domid,
            config.vcpus,
            &mem,
            upcall.clone(),
        )?);
        let time = Arc::new(DomainTime::new(config.vcpus, evtchn.clone()));
        time.publish_wallclock(&mem);
        let mut states = vec![VcpuState::Down; config.vcpus as usize];
        states[0] = VcpuState::Up(VcpuContext::default());
        let shared = Arc::new(DomainShared {
            vm,
            pool_region,
            host_paging,
            pause_flag: AtomicBool::new(false),
            pauses: AtomicU64::new(0),
            pause: Mutex::new(PauseState {
                requested: false,
                parked: vec![false; config.vcpus as usize],
            }),
            pause_cv: Condvar::new(),
            name: config.name,
            domid: config.domid,
            mem,
            features: FEATURES,
            allow_user_hypercalls: config.allow_user_hypercalls,
            nr_vcpus: config.vcpus,
            console: Console::new(console_sink),
            stopping: AtomicBool::new(false),
            vcpu_states: Mutex::new(states),
            vcpu_cv: Condvar::new(),
            mmu: Mutex::new(mmu),
            vcpu_cr3: (0..config.vcpus)
                .map(|id| AtomicU64::new(if id == 0 { bi.pt_base } else { 0 }))
                .collect(),
            unpin_gen: AtomicU64::new(0),
            outcome: Mutex::new(None),
            registry: registry.clone(),
            evtchn,
            upcall,
            time,
            grants,
            devices,
            sleeping: AtomicU64::new(0),
            threads: Mutex::new(vec![None; config.vcpus as usize]),
        });
        Devices::attach(&shared)?;
        if !registry.insert(shared.clone()) {
            return Err(DomainError::DomainIdTaken(shared.domid));
        }
        tracing::debug!(vcpus = shared.nr_vcpus, pool_frames, "domain created");
        Ok(Domain {
            vcpus,
            shared,
            created_in: t0.elapsed(),
        })
    }

    /// The state shared with the vCPUs (memory, console, ...).
    pub fn shared(&self) -> &Arc<DomainShared> {
        &self.shared
    }

    /// Runs the domain until it shuts down or crashes. vCPU 0 runs on the calling
    /// thread; the others on their own threads, once the guest brings them up.
    pub fn run(mut self) -> Result<DomainReport, DomainError> {
        let span =
            tracing::info_span!("domain", name = %self.shared.name, domid = self.shared.domid);
        let _e = span.enter();
        vcpu::install_kick_handler()?;
        self.shared.devices.start()?;
        let t0 = Instant::now();
        let mut rest = self.vcpus.split_off(1);
        let mut handles = Vec::new();
        for v in rest.drain(..) {
            let shared = self.shared.clone();
            let parent = span.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id()))
                .spawn(move || {
                    let _e = parent.enter();
                    v.run_secondary(&shared)
                })
                .map_err(|e| {
                    self.shared.request_stop();
                    DomainError::Thread(e)
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        let mut stats = ExitStats::default();
        if let Some(mut v0) = self.vcpus.pop() {
            v0.run(&self.shared);
            stats.merge(v0.stats());
        }
        self.shared.request_stop();
        for h in handles {
            match h.join() {
                Ok(s) => stats.merge(&s),
                Err(_) => self
                    .shared
                    .finish(Outcome::Crash(Box::new(CrashReport::without_regs(
                        u32::MAX,
                        CrashReason::Kvm("a vCPU thread panicked".into()),
                    )))),
            }
        }
        let outcome = self
            .shared
            .outcome
            .lock()
            .ok()
            .and_then(|mut o| o.take())
            .unwrap_or_else(|| {
                Outcome::Crash(Box::new(CrashReport {
                    vcpu: 0,
                    reason: CrashReason::UnexpectedExit(
                        "all vCPUs stopped without a shutdown".into(),
                    ),
                    regs: None,
                    sregs: None,
                }))
            });
        self.shared.destroy();
        tracing::info!(%outcome, "domain ended");
        Ok(DomainReport {
            name: self.shared.name.clone(),
            outcome,
            stats,
            created_in: self.created_in,
            ran_for: t0.elapsed(),
            vcpu_pauses: self.shared.pauses.load(Ordering::Relaxed),
        })
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // A domain that never ran (or has run) leaves the registry.
        self.shared.destroy();
    }
}

/// Writes the boot page tables into the pool of `mem` (see
/// [`boot::build_page_tables_with`]; `regions` are the passthrough regions to map) and
/// returns them with the PV MMU of a domain with that memory, which has validated them
/// (the root pinned as L4, as at entry: SPEC 8.5.1) and lets L1 entries map the
/// regions. `phys_bits` is the guest's physical address width (CPUID 0x80000008). The
/// part of [`Domain::create_in`]'s set-up that needs no KVM.
pub fn boot_page_tables(
    mem: &DomainMemory,
    regions: &[(u64, u64)],
    ram_mapping: boot::RamMapping,
    phys_bits: u32,
) -> Result<(BootInfo, Mmu), DomainError> {
    let bi = boot::build_page_tables_with(mem, regions, ram_mapping)?;
    let mut mmu = Mmu::new(Layout {
        phys_bits,
        ram_frames: mem.ram_bytes() / hv_abi::PAGE_SIZE,
        pool_base: mem.pool_gpa(),
        pool_frames: mem.pool_frames(),
    });
    for &(gpa, size) in regions {
        mmu.add_data_range(gpa, size);
    }
    // The boot tables are typed at entry: the root is pinned as L4 (SPEC 8.5.1).
    mmu.pin(&mut PoolAccess(mem), 4, bi.pt_base)
        .map_err(DomainError::BootTables)?;
    Ok((bi, mmu))
}

/// Parses, checks and runs an ELF kernel in a new domain.
pub fn run_elf(kvm: &Kvm, config: DomainConfig, elf: &[u8]) -> Result<DomainReport, DomainError> {
    let image = KernelImage::from_elf(elf)?;
    Domain::create(kvm, config, &image)?.run()
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, DomainError> {
    Kvm::new().map_err(DomainError::NoKvm)
}
