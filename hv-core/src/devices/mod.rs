//! Devices: the device table, the `dev_op` handshake, and the back-ends behind it (PV
//! console and block over shared rings, the emulated block device, the UART,
//! passthrough regions). SPEC.md §8.9.
//!
//! Each domain has a [`Devices`]: the host's copy of its device table (written into
//! guest RAM at `DEVICE_TABLE_GPA` whenever it changes; never read back), the PV console
//! back-end (device 0), the UART (device 1), then the devices of its configuration in
//! order. [`Devices::attach`] binds the console's event channel and fills the device
//! fields of start_info before the domain runs; [`Devices::start`] starts the threads
//! that need to run from boot; [`Devices::stop`] stops and joins every back-end thread
//! when the domain dies.
//!
//! Configuration-level descriptions ([`DeviceSpec`], [`ConsoleSpec`]) are checked with
//! [`check_specs`] before any domain is created.

pub mod blkback;
pub mod consback;
pub mod disk;
pub mod emublk;
pub mod filelock;
pub mod passthrough;
pub mod uart;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use hv_abi::blkif::SECTOR_SIZE;
use hv_abi::device::{
    DevConnect, DeviceEntry, DEVF_READONLY, DEVOP_CONNECT, DEVOP_DISCONNECT, DEVOP_STATE,
    DEV_CONSOLE, DEV_EMU_BLOCK, DEV_PASSTHROUGH, DEV_PV_BLOCK, DEV_UART, DOMID_HV, EMU_BLOCK_BASE,
    EMU_BLOCK_PORTS, MAX_DEVICES, STATE_CLOSED, STATE_CONNECTED, STATE_INITIALISING, UART_BASE,
};
use hv_abi::layout::{CONSOLE_PAGE_GPA, DEVICE_TABLE_GPA};
use hv_abi::start_info::StartInfo;
use hv_abi::Errno;
use thiserror::Error;

use crate::console::{Console, ConsoleSink};
use crate::domain::DomainShared;
use blkback::{BlkBack, BlkStats};
use consback::ConsoleBack;
use disk::{Disk, DiskError, DiskSpec};
use emublk::EmuBlock;
use passthrough::{DomainRegions, PassthroughError, RegionSpec};
use uart::Uart;

/// A device of a domain's configuration (besides the PV console and the UART, which
/// every domain has). Checked with [`check_specs`] before anything is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A PV block device (split driver) over a disk image.
    PvBlock(DiskSpec),
    /// An emulated block device (port I/O) over a disk image.
    EmuBlock(DiskSpec),
    /// A passthrough region (a host file mapped into guest-physical memory).
    Passthrough(RegionSpec),
}

impl DeviceSpec {
    /// The passthrough regions among `specs`, in order.
    pub fn regions(specs: &[DeviceSpec]) -> Vec<RegionSpec> {
        specs
            .iter()
            .filter_map(|s| match s {
                DeviceSpec::Passthrough(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Where a domain's PV console goes (every domain has one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleSpec {
    /// Write the domain's console output (PV console, early console hypercall, UART)
    /// to this file (created or truncated) instead of the domain's usual sink.
    pub output: Option<PathBuf>,
    /// What feeds the console's input ring.
    pub input: ConsoleInput,
}

/// The source of a PV console's input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleInput {
    /// No input.
    #[default]
    None,
    /// hv's standard input.
    Stdin,
    /// A file (read to its end).
    File(PathBuf),
}

/// Most emulated block devices per domain (their registers follow each other from
/// `EMU_BLOCK_BASE`).
pub const MAX_EMU_BLOCKS: usize = 8;

/// Index of the PV console in the device table.
pub const DEV_INDEX_CONSOLE: u32 = 0;
/// Index of the UART in the device table.
pub const DEV_INDEX_UART: u32 = 1;
/// Index of the first device of the configuration.
pub const DEV_INDEX_FIRST: u32 = 2;

/// Errors setting up a domain's devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A disk image could not be opened.
    #[error("disk #{index}: {source}")]
    Disk {
        /// 1-based position among the domain's disks.
        index: usize,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// The console output file could not be created.
    #[error("cannot create console output {}: {source}", path.display())]
    ConsoleOutput {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console input file could not be opened.
    #[error("cannot open console input {}: {source}", path.display())]
    ConsoleInput {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// More devices than the table holds.
    #[error("{0} devices; a domain has at most {max}", max = MAX_DEVICES)]
    TooMany(usize),
    /// More emulated block devices than [`MAX_EMU_BLOCKS`].
    #[error("{0} emulated disks; a domain has at most {MAX_EMU_BLOCKS}")]
    TooManyEmulated(usize),
    /// The console's event channel could not be bound.
    #[error("cannot bind the console's event channel: {0}")]
    Evtchn(Errno),
    /// The device table or start_info could not be written.
    #[error("cannot write the device table: {0}")]
    Memory(String),
    /// A back-end's thread or wake-up descriptor could not be created.
    #[error("cannot start a device back-end: {0}")]
    Backend(#[source] std::io::Error),
}

impl DeviceError {
    /// True when the error is in what the user asked for (a bad path or image).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            DeviceError::Disk { .. }
                | DeviceError::ConsoleOutput { .. }
                | DeviceError::ConsoleInput { .. }
                | DeviceError::TooMany(_)
                | DeviceError::TooManyEmulated(_)
        )
    }
}

/// What stands behind one entry of the device table.
#[derive(Debug)]
enum Backend {
    Console,
    Uart(Uart),
    PvBlock(BlkBack),
    EmuBlock(EmuBlock),
    /// A passthrough region (in `Devices::regions`), by guest-physical address.
    Passthrough {
        gpa: u64,
    },
}

/// A domain's devices.
#[derive(Debug)]
pub struct Devices {
    /// The domain, once [`Devices::attach`] ran (back-end threads hold only this).
    dom: OnceLock<Weak<DomainShared>>,
    /// The host's copy of the device table.
    entries: Mutex<Vec<DeviceEntry>>,
    backends: Vec<Backend>,
    console: ConsoleBack,
    regions: DomainRegions,
}

/// Opens the console output file of `spec`, if any, as the domain's console sink
/// (else `default`).
pub fn console_sink(spec: &ConsoleSpec, default: ConsoleSink) -> Result<ConsoleSink, DeviceError> {
    match &spec.output {
        None => Ok(default),
        Some(path) => File::create(path)
            .map(|f| ConsoleSink::File(Arc::new(Mutex::new(f))))
            .map_err(|source| DeviceError::ConsoleOutput {
                path: path.clone(),
                source,
            }),
    }
}

impl Devices {
    /// Opens the disks and the console input of a new domain, whose console writes to
    /// `sink` and whose passthrough regions (those of `specs`, in order) are `regions`.
    /// Nothing runs yet.
    pub fn new(
        specs: &[DeviceSpec],
        console: &ConsoleSpec,
        sink: &ConsoleSink,
        regions: DomainRegions,
    ) -> Result<Devices, DeviceError> {
        let total = specs.len() + DEV_INDEX_FIRST as usize;
        if total > MAX_DEVICES as usize {
            return Err(DeviceError::TooMany(total));
        }
        let emulated = specs
            .iter()
            .filter(|s| matches!(s, DeviceSpec::EmuBlock(_)))
            .count();
        if emulated > MAX_EMU_BLOCKS {
            return Err(DeviceError::TooManyEmulated(emulated));
        }
        let connected = |kind, base, size| DeviceEntry {
            kind,
            backend_domid: DOMID_HV,
            base,
            size,
            state: STATE_CONNECTED,
            ..DeviceEntry::default()
        };
        let mut entries = vec![
            connected(DEV_CONSOLE, CONSOLE_PAGE_GPA, 0),
            connected(DEV_UART, u64::from(UART_BASE), 8),
        ];
        let mut backends = vec![
            Backend::Console,
            Backend::Uart(Uart::new(Console::new(sink.clone()))),
        ];
        let mut emu_base = EMU_BLOCK_BASE;
        let mut region_info = regions.info().into_iter();
        let mut disks = 0;
        for spec in specs {
            let mut open = |d: &DiskSpec| {
                disks += 1;
                Disk::open(d)
                    .map(Arc::new)
                    .map_err(|source| DeviceError::Disk {
                        index: disks,
                        source,
                    })
            };
            match spec {
                DeviceSpec::PvBlock(d) => {
                    let disk = open(d)?;
                    let mut e = connected(DEV_PV_BLOCK, 0, disk.sectors());
                    e.state = STATE_INITIALISING;
                    e.flags = if disk.readonly() { DEVF_READONLY } else { 0 };
                    entries.push(e);
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "entries holds at most MAX_DEVICES (checked above)"
                    )]
                    let dev = (entries.len() - 1) as u32;
                    backends.push(Backend::PvBlock(BlkBack::new(dev, disk)));
                }
                DeviceSpec::EmuBlock(d) => {
                    let disk = open(d)?;
                    let mut e = connected(DEV_EMU_BLOCK, u64::from(emu_base), disk.sectors());
                    e.flags = if disk.readonly() { DEVF_READONLY } else { 0 };
                    entries.push(e);
                    backends.push(Backend::EmuBlock(EmuBlock::new(disk, emu_base)));
                    emu_base += EMU_BLOCK_PORTS;
                }
                DeviceSpec::Passthrough(_) => {
                    // `regions` holds the specs' regions in the same order.
                    let Some(r) = region_info.next() else {
                        return Err(DeviceError::Memory(
                            "passthrough regions do not match the configuration".into(),
                        ));
                    };
                    entries.push(connected(DEV_PASSTHROUGH, r.gpa, r.size));
                    backends.push(Backend::Passthrough { gpa: r.gpa });
                }
            }
        }
        Ok(Devices {
            dom: OnceLock::new(),
            entries: Mutex::new(entries),
            backends,
            console: ConsoleBack::new(&console.input)?,
            regions,
        })
    }

    /// Connects the devices to their domain before it runs: binds the console's event
    /// channel, writes the device table and the device fields of start_info
    /// (`console_ring_gpa`, `console_evtchn`, `devices_gpa`, `nr_devices`).
    pub fn attach(dom: &Arc<DomainShared>) -> Result<(), DeviceError> {
        let me = &dom.devices;
        let _ = me.dom.set(Arc::downgrade(dom));
        let port = me.console.attach(dom)?;
        let entries = me
            .lock_entries()
            .map_err(|e| DeviceError::Memory(e.to_string()))?;
        for (i, e) in entries.iter().enumerate() {
            dom.mem
                .write_obj(DEVICE_TABLE_GPA + i as u64 * 32, e)
                .map_err(|e| DeviceError::Memory(e.to_string()))?;
        }
        let mut si: StartInfo = dom
            .mem
            .read_obj(hv_abi::layout::START_INFO_GPA)
            .map_err(|e| DeviceError::Memory(e.to_string()))?;
        si.console_ring_gpa = CONSOLE_PAGE_GPA;
        si.console_evtchn = port;
        si.devices_gpa = DEVICE_TABLE_GPA;
        #[allow(
            clippy::cast_possible_truncation,
            reason = "entries holds at most MAX_DEVICES (checked when it was built)"
        )]
        let nr_devices = entries.len() as u32;
        si.nr_devices = nr_devices;
        dom.mem
            .write_obj(hv_abi::layout::START_INFO_GPA, &si)
            .map_err(|e| DeviceError::Memory(e.to_string()))?;
        Ok(())
    }

    /// Starts what must run from boot (the console's input thread, if it has input).
    pub fn start(&self) -> Result<(), DeviceError> {
        self.console.start(self.weak())
    }

    /// Stops every back-end (the domain is dying): threads are joined (a PV block
    /// request in progress finishes), writable disk images `fdatasync`'d, connected rings
    /// released, pending console output written. Idempotent.
    pub fn stop(&self, dom: &DomainShared) {
        for (dev, b) in (0u32..).zip(&self.backends) {
            match b {
                Backend::PvBlock(blk) => blk.stop(dom),
                // Its writes ran on the (now stopped) vCPU threads.
                Backend::EmuBlock(e) => sync_disk(e.disk(), dev),
                _ => {}
            }
        }
        self.console.stop(dom);
        // Released for other domains.
        self.regions.detach_all(&dom.vm);
    }

    /// The domain's passthrough regions.
    pub fn regions(&self) -> &DomainRegions {
        &self.regions
    }

    /// Detaches the passthrough region in file `path` from the running domain: its
    /// memslot goes (a later guest access crashes the domain), the PV MMU takes no new
    /// entries into it, its device entry becomes `CLOSED`, and the region is free for
    /// another domain.
    pub fn detach_region(&self, dom: &DomainShared, path: &Path) -> Result<(), PassthroughError> {
        let (gpa, _) = self.regions.detach(&dom.vm, dom.domid, path)?;
        if let Ok(mut mmu) = dom.mmu.lock() {
            mmu.remove_data_range(gpa);
        }
        let dev = self
            .backends
            .iter()
            .position(|b| matches!(b, Backend::Passthrough { gpa: g } if *g == gpa));
        if let Some(dev) = dev.and_then(|d| u32::try_from(d).ok()) {
            self.set_state(dom, dev, STATE_CLOSED, 0);
        }
        Ok(())
    }

    fn weak(&self) -> Weak<DomainShared> {
        self.dom.get().cloned().unwrap_or_default()
    }

    fn lock_entries(&self) -> Result<MutexGuard<'_, Vec<DeviceEntry>>, Errno> {
        self.entries.lock().map_err(|_| Errno::EIO)
    }

    /// The device table as the host last wrote it.
    pub fn entries(&self) -> Vec<DeviceEntry> {
        self.lock_entries().map(|e| e.clone()).unwrap_or_default()
    }

    /// Sets device `dev`'s state and error in the host's table and in guest RAM.
    pub(crate) fn set_state(&self, dom: &DomainShared, dev: u32, state: u32, error: i32) {
        let Ok(mut entries) = self.lock_entries() else {
            return;
        };
        let Some(e) = entries.get_mut(dev as usize) else {
            return;
        };
        e.state = state;
        e.error = error;
        // The table lies in low RAM of every domain.
        let _ = dom
            .mem
            .write_obj(DEVICE_TABLE_GPA + u64::from(dev) * 32, &*e);
    }

    /// Counters of PV block device `dev` (None if it is not one).
    pub fn blk_stats(&self, dev: u32) -> Option<BlkStats> {
        match self.backends.get(dev as usize) {
            Some(Backend::PvBlock(b)) => Some(b.stats()),
            _ => None,
        }
    }

    /// The disk behind emulated block device `dev`, if it is one.
    pub fn emu_disk(&self, dev: u32) -> Option<&Arc<Disk>> {
        match self.backends.get(dev as usize) {
            Some(Backend::EmuBlock(e)) => Some(e.disk()),
            _ => None,
        }
    }

    /// A guest `in` from `port`: handled by a device (the UART, an emulated block
    /// device)? `false` if no device has the port.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        for b in &self.backends {
            match b {
                Backend::Uart(u) if u.handles(port) => {
                    u.pio_read(port, data);
                    return true;
                }
                Backend::EmuBlock(e) if e.handles(port) => {
                    e.pio_read(port, data);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// A guest `out` to `port`: handled by a device? `false` if no device has the port.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        for b in &self.backends {
            match b {
                Backend::Uart(u) if u.handles(port) => {
                    u.pio_write(port, data);
                    return true;
                }
                Backend::EmuBlock(e) if e.handles(port) => {
                    e.pio_write(port, data);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    fn backend(&self, dev: u64) -> Result<(u32, &Backend), Errno> {
        let i = u32::try_from(dev).map_err(|_| Errno::ENODEV)?;
        self.backends
            .get(i as usize)
            .map(|b| (i, b))
            .ok_or(Errno::ENODEV)
    }
}

/// Makes the completed writes to device `dev`'s image durable (`fdatasync`), unless it
/// is read-only; a failure is logged (the domain is gone, nobody else can be told).
fn sync_disk(disk: &Disk, dev: u32) {
    if disk.readonly() {
        return;
    }
    match disk.flush() {
        Ok(()) => tracing::debug!(dev, image = %disk.path().display(), "disk image synced"),
        Err(e) => {
            tracing::error!(dev, image = %disk.path().display(), error = %e, "cannot sync a disk image")
        }
    }
}

/// `dev_op(cmd, arg)` (SPEC §8.9.3).
pub fn dev_op(dom: &DomainShared, cmd: u64, arg: u64) -> Result<u64, Errno> {
    let devs = &dom.devices;
    match cmd {
        DEVOP_CONNECT => {
            let c: DevConnect = crate::guest_arg::copy_in(&dom.mem, arg)?;
            let (i, b) = devs.backend(u64::from(c.dev))?;
            let Backend::PvBlock(blk) = b else {
                return Err(Errno::EINVAL);
            };
            if c.reserved != 0 {
                return Err(Errno::EINVAL);
            }
            debug_assert_eq!(i, c.dev);
            blk.connect(dom, &devs.weak(), c.ring_gref, c.port)
                .map(|()| 0)
        }
        DEVOP_DISCONNECT => match devs.backend(arg)? {
            (_, Backend::PvBlock(blk)) => blk.disconnect(dom).map(|()| 0),
            _ => Err(Errno::EINVAL),
        },
        DEVOP_STATE => {
            let (i, _) = devs.backend(arg)?;
            let entries = devs.lock_entries()?;
            entries
                .get(i as usize)
                .map(|e| u64::from(e.state))
                .ok_or(Errno::ENODEV)
        }
        _ => Err(Errno::EINVAL),
    }
}

// ---------------------------------------------------------------------------------
// Checks before creation.

/// A device or console option that cannot work (checked before any domain exists).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// What is wrong: `disk #N`, `passthrough #N` (counted per kind), `console.output`,
    /// `console.input`, `devices`, `passthrough`.
    pub field: String,
    /// Why.
    pub message: String,
}

fn spec_err(field: impl Into<String>, message: String) -> SpecError {
    SpecError {
        field: field.into(),
        message,
    }
}

/// The identity of a file that may not exist yet: its canonical path, or its canonical
/// directory joined with its name. Two specs naming one file compare equal.
pub fn file_identity(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize()
                .map(|d| d.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

fn check_disk(field: &str, d: &DiskSpec) -> Result<(), SpecError> {
    let path = d.path.display();
    if d.path.as_os_str().is_empty() {
        return Err(spec_err(field, "empty path".into()));
    }
    match std::fs::metadata(&d.path) {
        Ok(m) => {
            if !m.is_file() {
                return Err(spec_err(field, format!("{path} is not a regular file")));
            }
            if m.len() == 0 || m.len() % SECTOR_SIZE != 0 {
                return Err(spec_err(
                    field,
                    format!(
                        "{path} is {} bytes: a disk image is a non-zero multiple of 512 bytes",
                        m.len()
                    ),
                ));
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(!d.readonly)
                .open(&d.path)
                .map_err(|e| spec_err(field, format!("cannot open {path}: {e}")))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match d.create_size {
            None => {
                return Err(spec_err(
                    field,
                    format!("{path} does not exist (give a size to create it)"),
                ))
            }
            Some(size) if size == 0 || size % SECTOR_SIZE != 0 => {
                return Err(spec_err(
                    field,
                    format!("size {size} bytes: not a non-zero multiple of 512"),
                ))
            }
            Some(_) => {
                let dir = d.path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(dir) = dir {
                    if !dir.is_dir() {
                        return Err(spec_err(
                            field,
                            format!("cannot create {path}: {} is not a directory", dir.display()),
                        ));
                    }
                }
            }
        },
        Err(e) => return Err(spec_err(field, format!("cannot open {path}: {e}"))),
    }
    Ok(())
}

/// Checks one domain's devices and console options: every disk exists (or has a size
/// to be created with, a non-zero multiple of 512), existing images are whole sectors
/// and can be opened as asked, no image is used twice (unless every use is
/// read-only), the console files can be created or read, the device count fits.
pub fn check_specs(devices: &[DeviceSpec], console: &ConsoleSpec) -> Result<(), SpecError> {
    let total = devices.len() + DEV_INDEX_FIRST as usize;
    if total > MAX_DEVICES as usize {
        return Err(spec_err(
            "devices",
            format!(
                "{} devices: a domain has at most {} besides its console and UART",
                devices.len(),
                MAX_DEVICES - DEV_INDEX_FIRST
            ),
        ));
    }
    let mut emulated = 0;
    let (mut disks, mut regions) = (0, 0);
    let mut seen: Vec<(PathBuf, bool, usize)> = Vec::new();
    for d in devices {
        match d {
            DeviceSpec::PvBlock(disk) | DeviceSpec::EmuBlock(disk) => {
                disks += 1;
                let field = format!("disk #{disks}");
                if matches!(d, DeviceSpec::EmuBlock(_)) {
                    emulated += 1;
                    if emulated > MAX_EMU_BLOCKS {
                        return Err(spec_err(
                            field,
                            format!("more than {MAX_EMU_BLOCKS} emulated disks"),
                        ));
                    }
                }
                check_disk(&field, disk)?;
                let id = file_identity(&disk.path);
                if let Some((_, ro, j)) = seen.iter().find(|(p, ..)| *p == id) {
                    if !(*ro && disk.readonly) {
                        return Err(spec_err(
                            field,
                            format!(
                                "{} is already disk #{j} (an image can be shared only read-only)",
                                disk.path.display()
                            ),
                        ));
                    }
                }
                seen.push((id, disk.readonly, disks));
            }
            DeviceSpec::Passthrough(r) => {
                regions += 1;
                check_region(&format!("passthrough #{regions}"), r)?
            }
        }
    }
    let regions = DeviceSpec::regions(devices);
    if regions.len() > passthrough::MAX_REGIONS {
        return Err(spec_err(
            "passthrough",
            format!(
                "{} regions: a domain has at most {}",
                regions.len(),
                passthrough::MAX_REGIONS
            ),
        ));
    }
    passthrough::check_exclusive(regions.iter().map(|r| ("this domain", r)))
        .map_err(|e| spec_err("passthrough", e.to_string()))?;
    if let Some(out) = &console.output {
        if out.as_os_str().is_empty() || out.is_dir() {
            return Err(spec_err(
                "console.output",
                format!("{} is not a file name", out.display()),
            ));
        }
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = dir {
            if !dir.is_dir() {
                return Err(spec_err(
                    "console.output",
                    format!(
                        "cannot create {}: {} is not a directory",
                        out.display(),
                        dir.display()
                    ),
                ));
            }
        }
    }
    if let ConsoleInput::File(p) = &console.input {
        File::open(p)
            .map_err(|e| spec_err("console.input", format!("cannot open {}: {e}", p.display())))?;
    }
    Ok(())
}

fn check_region(field: &str, r: &RegionSpec) -> Result<(), SpecError> {
    r.check().map_err(|e| spec_err(field, e.to_string()))?;
    let path = r.path.display();
    match std::fs::metadata(&r.path) {
        Ok(m) if !m.is_file() => Err(spec_err(field, format!("{path} is not a regular file"))),
        Ok(m) if m.len() < r.size => Err(spec_err(
            field,
            format!(
                "{path} has {} bytes, fewer than the region's {}",
                m.len(),
                r.size
            ),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !r.create => Err(spec_err(
            field,
            format!("{path} does not exist (add create to create it)"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match r.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(dir) if !dir.is_dir() => Err(spec_err(
                    field,
                    format!("cannot create {path}: {} is not a directory", dir.display()),
                )),
                _ => Ok(()),
            }
        }
        Err(e) => Err(spec_err(field, format!("cannot open {path}: {e}"))),
    }
}

/// The disk image paths of `devices`, each with its read-only flag (for checks across
/// domains).
pub fn disk_identities(devices: &[DeviceSpec]) -> Vec<(PathBuf, bool)> {
    devices
        .iter()
        .filter_map(|d| match d {
            DeviceSpec::PvBlock(disk) | DeviceSpec::EmuBlock(disk) => {
                Some((file_identity(&disk.path), disk.readonly))
            }
            DeviceSpec::Passthrough(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hv-devspec-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn pv(path: &Path, size: Option<u64>, readonly: bool) -> DeviceSpec {
        DeviceSpec::PvBlock(DiskSpec {
            path: path.to_path_buf(),
            create_size: size,
            readonly,
        })
    }

    #[test]
    fn spec_checks() {
        let dir = tmpdir("a");
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 700]).unwrap();
        let missing = dir.join("new.img");
        let none = ConsoleSpec::default();
        let ok = |d: &[DeviceSpec]| check_specs(d, &none);
        assert_eq!(ok(&[pv(&img, None, false)]), Ok(()));
        assert_eq!(ok(&[pv(&missing, Some(1 << 20), false)]), Ok(()));
        let msg = |d: &[DeviceSpec]| ok(d).unwrap_err().to_string();
        assert!(msg(&[pv(&missing, None, false)]).contains("does not exist (give a size"));
        assert!(msg(&[pv(&missing, Some(1000), false)]).contains("size 1000 bytes"));
        assert!(msg(&[pv(&odd, None, false)]).contains("700 bytes"));
        assert!(msg(&[pv(&dir, None, false)]).contains("not a regular file"));
        assert!(msg(&[pv(&dir.join("no/x.img"), Some(512), false)]).contains("not a directory"));
        let twice = msg(&[
            pv(&img, None, false),
            pv(&dir.join("./disk.img"), None, true),
        ]);
        assert!(
            twice.starts_with("disk #2:") && twice.contains("already disk #1"),
            "{twice}"
        );
        assert_eq!(ok(&[pv(&img, None, true), pv(&img, None, true)]), Ok(()));
        let many: Vec<DeviceSpec> = (0..MAX_DEVICES).map(|_| pv(&img, None, true)).collect();
        assert!(msg(&many).starts_with("devices:"));
        let emu = |_| {
            DeviceSpec::EmuBlock(DiskSpec {
                path: img.clone(),
                create_size: None,
                readonly: true,
            })
        };
        let emus: Vec<DeviceSpec> = (0..=MAX_EMU_BLOCKS).map(emu).collect();
        assert!(msg(&emus).contains("more than 8 emulated"));
        let con = |output: Option<PathBuf>, input| ConsoleSpec { output, input };
        assert_eq!(
            check_specs(&[], &con(Some(dir.join("out.txt")), ConsoleInput::Stdin)),
            Ok(())
        );
        let e = check_specs(&[], &con(Some(dir.clone()), ConsoleInput::None)).unwrap_err();
        assert_eq!(e.field, "console.output");
        let e = check_specs(&[], &con(Some(dir.join("x/y")), ConsoleInput::None)).unwrap_err();
        assert!(e.message.contains("not a directory"));
        let e = check_specs(&[], &con(None, ConsoleInput::File(missing.clone()))).unwrap_err();
        assert_eq!(e.field, "console.input");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
