//! Passthrough regions: a host file (standing for a device's memory) mapped shared and
//! placed straight into one domain's guest-physical space, with no exits on access.
//!
//! - A region is the first `size` bytes of a host file (created with that size if
//!   asked), mapped `MAP_SHARED` into hv and added as its own KVM memslot. What the
//!   guest writes is in the file (the page cache) at once; `msync` when the region is
//!   released makes it durable.
//! - Regions follow the grant window in guest-physical space: the first at the
//!   window's end rounded up to 2 MiB, each next one at the previous one's end rounded
//!   up to 2 MiB ([`region_gpas`]). The boot page tables identity-map them writable
//!   and user-accessible; the PV MMU accepts L1 entries that map region frames as data
//!   pages (never as page tables).
//! - Assignment is exclusive: [`Regions`] (one per hypervisor, in its
//!   [`crate::registry::Registry`]) refuses a region attached to a live domain
//!   ([`PassthroughError::Busy`], naming the owner), and an exclusive `flock` on the
//!   file refuses it to other processes ([`PassthroughError::Locked`], naming the
//!   holder; see [`super::filelock`]). A region is released when it is detached
//!   ([`detach`]) or its domain dies; it can then be assigned again.
//! - When the host cannot back a region's page (the file's file system is full, or the
//!   file was truncated under the domain), KVM fails the guest's access; the vCPU loop
//!   ends the domain with a host fault naming the file, and [`DomainRegions::diagnose`]
//!   finds out why.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use hv_abi::PAGE_SIZE;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;

use super::filelock::{self, HolderText, LockKind};
use crate::outcome::{BackingCause, HostMemory};

/// Largest region.
pub const MAX_REGION_BYTES: u64 = 1 << 30;
/// Most regions per domain.
pub const MAX_REGIONS: usize = 8;
/// KVM memslot of a domain's first region (0-2 are RAM, the pool and the grant
/// window); region `i` uses `FIRST_SLOT + i`.
pub const FIRST_SLOT: u32 = 3;

/// Errors of passthrough regions.
#[derive(Debug, Error)]
pub enum PassthroughError {
    /// The region's size is unusable.
    #[error(
        "passthrough region {path}: size {size} is not a multiple of 4 KiB between 4 KiB and 1 GiB"
    )]
    BadSize {
        /// The region's file.
        path: PathBuf,
        /// The size asked for.
        size: u64,
    },
    /// The file could not be opened or created.
    #[error("passthrough region {path}: cannot open: {source}")]
    Open {
        /// The region's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the region.
    #[error("passthrough region {path}: the file has {file_bytes} bytes, fewer than the region's {size}")]
    FileTooSmall {
        /// The region's file.
        path: PathBuf,
        /// The file's size.
        file_bytes: u64,
        /// The region's size.
        size: u64,
    },
    /// The region is attached to a live domain of this hypervisor.
    #[error("passthrough region {path} is already assigned to domain {owner}")]
    Busy {
        /// The region's file.
        path: PathBuf,
        /// The domain it is attached to.
        owner: u32,
    },
    /// Another process holds the region (its file is locked).
    #[error("passthrough region {path} is in use by {holder}")]
    Locked {
        /// The region's file.
        path: PathBuf,
        /// Who holds the file's lock, if it could be found.
        holder: HolderText,
    },
    /// The same region appears twice in one configuration.
    #[error("passthrough region {path} is given to both {first} and {second}; a region belongs to one domain")]
    Duplicate {
        /// The region's file.
        path: PathBuf,
        /// The first domain that names it.
        first: String,
        /// The second.
        second: String,
    },
    /// Too many regions for one domain.
    #[error("{0} passthrough regions; a domain has at most {MAX_REGIONS}")]
    TooMany(usize),
    /// Mapping the file failed.
    #[error("passthrough region {path}: cannot map: {source}")]
    Map {
        /// The region's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the region's memslot.
    #[error("passthrough region {path}: KVM memslot: {source}")]
    Memslot {
        /// The region's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The region is not attached to the domain.
    #[error("passthrough region {path} is not attached to domain {domid}")]
    NotAttached {
        /// The region's file.
        path: PathBuf,
        /// The domain.
        domid: u32,
    },
}

impl PassthroughError {
    /// True when the error comes from what the user asked for (bad sizes, files,
    /// conflicting assignments) rather than from the host.
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            PassthroughError::Map { .. } | PassthroughError::Memslot { .. }
        )
    }
}

/// How to attach a region.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionSpec {
    /// The host file.
    pub path: PathBuf,
    /// Bytes (a multiple of 4 KiB, at most [`MAX_REGION_BYTES`]); the file must have at
    /// least this many (the region is its first `size` bytes).
    pub size: u64,
    /// Create the file with `size` bytes (zeroes) if it does not exist.
    pub create: bool,
}

impl RegionSpec {
    /// Checks the size.
    pub fn check(&self) -> Result<(), PassthroughError> {
        if self.size == 0 || self.size % PAGE_SIZE != 0 || self.size > MAX_REGION_BYTES {
            return Err(PassthroughError::BadSize {
                path: self.path.clone(),
                size: self.size,
            });
        }
        Ok(())
    }
}

/// What identifies a region's file: its inode once it exists, else its normalised
/// path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileId {
    Inode(u64, u64),
    Path(PathBuf),
}

fn file_id(path: &Path) -> FileId {
    if let Ok(md) = std::fs::metadata(path) {
        return FileId::Inode(md.dev(), md.ino());
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let norm = match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    };
    FileId::Path(norm)
}

/// Checks, before anything is created, that no region is given to two domains (or
/// twice to one): each item is (domain name, region). Sizes are checked too.
pub fn check_exclusive<'a>(
    specs: impl IntoIterator<Item = (&'a str, &'a RegionSpec)>,
) -> Result<(), PassthroughError> {
    let mut seen: HashMap<FileId, &str> = HashMap::new();
    for (name, spec) in specs {
        spec.check()?;
        if let Some(first) = seen.insert(file_id(&spec.path), name) {
            return Err(PassthroughError::Duplicate {
                path: spec.path.clone(),
                first: first.to_string(),
                second: name.to_string(),
            });
        }
    }
    Ok(())
}

pub use crate::gpa::{first_region_gpa, region_gpas, REGION_ALIGN};

/// A region's file, mapped shared into hv. Dropping it syncs and unmaps the file and
/// releases its lock.
#[derive(Debug)]
pub struct Region {
    path: PathBuf,
    size: u64,
    id: (u64, u64),
    /// Kept open: it holds the `flock` (and is checked when a page cannot be backed).
    file: File,
    host: *mut u8,
}

// SAFETY: `host` is a MAP_SHARED mapping owned by the Region (unmapped only on drop);
// hv never dereferences it (only KVM and the guest access it), so sharing the address
// between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above; no method gives out references into the mapping.
unsafe impl Sync for Region {}

impl Region {
    /// Opens (or creates), locks and maps the file of `spec`.
    fn open(spec: &RegionSpec) -> Result<Region, PassthroughError> {
        spec.check()?;
        let path = spec.path.clone();
        let open_err = |source| PassthroughError::Open {
            path: path.clone(),
            source,
        };
        let file = if spec.create && !spec.path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&spec.path)
                .map_err(open_err)?;
            f.set_len(spec.size).map_err(open_err)?;
            f
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&spec.path)
                .map_err(open_err)?
        };
        let md = file.metadata().map_err(open_err)?;
        if md.len() < spec.size {
            return Err(PassthroughError::FileTooSmall {
                path,
                file_bytes: md.len(),
                size: spec.size,
            });
        }
        match filelock::try_lock(&file, LockKind::Exclusive) {
            Ok(true) => {}
            Ok(false) => {
                return Err(PassthroughError::Locked {
                    path,
                    holder: HolderText(filelock::holder(&file, LockKind::Exclusive)),
                })
            }
            Err(source) => return Err(PassthroughError::Open { path, source }),
        }
        let len = usize::try_from(spec.size).map_err(|_| PassthroughError::BadSize {
            path: path.clone(),
            size: spec.size,
        })?;
        // SAFETY: a new shared mapping of `len` bytes of the file (which has at least
        // that many) at an address the kernel picks; nothing else is affected. The
        // result is checked before use.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(PassthroughError::Map {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Region {
            path,
            size: spec.size,
            id: (md.dev(), md.ino()),
            file,
            host: host.cast(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of the mapping (for the memslot).
    pub fn host_address(&self) -> u64 {
        self.host as u64
    }

    /// Why the file cannot back the region's page at `offset` (or, with `None`, some
    /// page), if it shows a cause: the file ends before the page (it was truncated), the
    /// page cannot be allocated (checked with `fallocate(FALLOC_FL_KEEP_SIZE)` of that
    /// one page, which leaves the file's size and data as they are), or, for no
    /// particular page, the file system has no free blocks.
    fn backing_cause(&self, offset: Option<u64>) -> Option<BackingCause> {
        let file_bytes = self.file.metadata().ok()?.len();
        let past_end = BackingCause::PastEndOfFile {
            file_bytes,
            region_bytes: self.size,
        };
        let fd = self.file.as_raw_fd();
        match offset {
            Some(off) => {
                let page = off & !(PAGE_SIZE - 1);
                if page + PAGE_SIZE > file_bytes {
                    return Some(past_end);
                }
                let (Ok(start), Ok(len)) = (
                    libc::off_t::try_from(page),
                    libc::off_t::try_from(PAGE_SIZE),
                ) else {
                    return None;
                };
                // SAFETY: fallocate on the region's own descriptor, within the file's
                // size (KEEP_SIZE): no memory is involved and no data changes.
                let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, start, len) };
                if r == 0 {
                    return None;
                }
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EOPNOTSUPP) | None => None,
                    Some(errno) => Some(BackingCause::Allocate {
                        offset: page,
                        errno,
                    }),
                }
            }
            None => {
                if file_bytes < self.size {
                    return Some(past_end);
                }
                // SAFETY: an all-zero statvfs is a valid value; fstatvfs fills it.
                let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: fstatvfs on the region's own descriptor into `st`.
                let r = unsafe { libc::fstatvfs(fd, &mut st) };
                (r == 0 && st.f_blocks > 0 && st.f_bavail == 0)
                    .then_some(BackingCause::FileSystemFull)
            }
        }
    }

    /// True if `path` names this region's file.
    fn is(&self, path: &Path) -> bool {
        match file_id(path) {
            FileId::Inode(dev, ino) => (dev, ino) == self.id,
            FileId::Path(p) => p == self.path,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `open` with this size and is unmapped only
        // here; KVM memslots using it were removed (or their VM destroyed) first.
        unsafe {
            if libc::msync(
                self.host.cast(),
                crate::conv::usize_from(self.size),
                libc::MS_SYNC,
            ) != 0
            {
                tracing::warn!(path = %self.path.display(), "msync of a passthrough region failed");
            }
            libc::munmap(self.host.cast(), crate::conv::usize_from(self.size));
        }
        // The file (and with it the lock) is closed after this.
    }
}

/// Which domain holds each region (by inode), for one hypervisor.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    owners: Arc<Mutex<HashMap<(u64, u64), u32>>>,
}

impl Regions {
    /// No region assigned.
    pub fn new() -> Regions {
        Regions::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u64), u32>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns the region of `spec` to `domid`: opens, locks and maps it. Refused while
    /// a live domain holds it.
    pub fn assign(&self, domid: u32, spec: &RegionSpec) -> Result<Assignment, PassthroughError> {
        spec.check()?;
        if let FileId::Inode(dev, ino) = file_id(&spec.path) {
            if let Some(owner) = self.lock().get(&(dev, ino)) {
                return Err(PassthroughError::Busy {
                    path: spec.path.clone(),
                    owner: *owner,
                });
            }
        }
        let region = Region::open(spec)?;
        let mut owners = self.lock();
        if let Some(owner) = owners.get(&region.id) {
            return Err(PassthroughError::Busy {
                path: spec.path.clone(),
                owner: *owner,
            });
        }
        owners.insert(region.id, domid);
        tracing::debug!(path = %spec.path.display(), domid, size = spec.size, "passthrough region assigned");
        Ok(Assignment {
            owners: self.clone(),
            domid,
            region,
        })
    }

    /// The domain holding the region in file `path`, if any.
    pub fn owner(&self, path: &Path) -> Option<u32> {
        match file_id(path) {
            FileId::Inode(dev, ino) => self.lock().get(&(dev, ino)).copied(),
            FileId::Path(_) => None,
        }
    }
}

/// A region assigned to a domain; dropping it releases the region.
#[derive(Debug)]
pub struct Assignment {
    owners: Regions,
    domid: u32,
    region: Region,
}

impl Assignment {
    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The domain holding it.
    pub fn domid(&self) -> u32 {
        self.domid
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        let mut owners = self.owners.lock();
        if owners.get(&self.region.id) == Some(&self.domid) {
            owners.remove(&self.region.id);
        }
        tracing::debug!(path = %self.region.path.display(), domid = self.domid, "passthrough region released");
    }
}

/// One region of a domain.
#[derive(Debug)]
struct Attached {
    assignment: Assignment,
    gpa: u64,
    slot: u32,
    in_vm: bool,
}

impl Attached {
    fn memslot(&self, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.gpa,
            memory_size: size,
            userspace_addr: self.assignment.region.host_address(),
        }
    }
}

/// A domain's passthrough regions.
#[derive(Debug, Default)]
pub struct DomainRegions {
    list: Mutex<Vec<Attached>>,
}

/// One region as the device table shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The file.
    pub path: PathBuf,
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

impl DomainRegions {
    /// Assigns the regions of `specs` to `domid` (all or none), placed after a pool
    /// ending at `pool_end`. Nothing is mapped into a VM yet ([`Self::add_memslots`]).
    pub fn assign(
        regions: &Regions,
        domid: u32,
        specs: &[RegionSpec],
        pool_end: u64,
    ) -> Result<DomainRegions, PassthroughError> {
        if specs.len() > MAX_REGIONS {
            return Err(PassthroughError::TooMany(specs.len()));
        }
        check_exclusive(specs.iter().map(|s| ("this domain", s)))?;
        let sizes: Vec<u64> = specs.iter().map(|s| s.size).collect();
        let gpas = region_gpas(pool_end, &sizes);
        let mut list = Vec::with_capacity(specs.len());
        for ((spec, gpa), slot) in specs.iter().zip(gpas).zip(FIRST_SLOT..) {
            // On an error the regions assigned so far are released as `list` drops.
            list.push(Attached {
                assignment: regions.assign(domid, spec)?,
                gpa,
                slot,
                in_vm: false,
            });
        }
        Ok(DomainRegions {
            list: Mutex::new(list),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Attached>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (guest-physical address, bytes) of each region, in order (for the boot page
    /// tables and the PV MMU).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.lock()
            .iter()
            .map(|a| (a.gpa, a.assignment.region.size))
            .collect()
    }

    /// Each attached region, in order.
    pub fn info(&self) -> Vec<RegionInfo> {
        self.lock()
            .iter()
            .map(|a| RegionInfo {
                path: a.assignment.region.path.clone(),
                gpa: a.gpa,
                size: a.assignment.region.size,
            })
            .collect()
    }

    /// Adds every region's memslot to `vm`.
    pub fn add_memslots(&self, vm: &VmFd) -> Result<(), PassthroughError> {
        for a in self.lock().iter_mut() {
            let size = a.assignment.region.size;
            // SAFETY: the region's mapping covers `size` bytes and stays mapped until
            // the memslot is removed (detach) or the VM is gone (DomainShared drops the
            // VM before its devices).
            unsafe { vm.set_user_memory_region(a.memslot(size)) }.map_err(|source| {
                PassthroughError::Memslot {
                    path: a.assignment.region.path.clone(),
                    source,
                }
            })?;
            a.in_vm = true;
        }
        Ok(())
    }

    /// The region holding `gpa`, as (start, bytes).
    pub fn find(&self, gpa: u64) -> Option<(u64, u64)> {
        self.lock()
            .iter()
            .map(|a| (a.gpa, a.assignment.region.size))
            .find(|(start, size)| gpa >= *start && gpa - start < *size)
    }

    /// The region a host fault is about, and why its file cannot back the page: the
    /// region holding `gpa` (`None` if no attached region does), or, when KVM gave no
    /// address (`gpa` is `None`), the first region whose file shows a cause (`None` if
    /// none does).
    pub fn diagnose(&self, gpa: Option<u64>) -> Option<HostMemory> {
        let list = self.lock();
        let memory = |a: &Attached, cause| HostMemory::Region {
            path: a.assignment.region.path.clone(),
            cause,
        };
        match gpa {
            Some(gpa) => list
                .iter()
                .find(|a| gpa >= a.gpa && gpa - a.gpa < a.assignment.region.size)
                .map(|a| memory(a, a.assignment.region.backing_cause(Some(gpa - a.gpa)))),
            None => list.iter().find_map(|a| {
                a.assignment
                    .region
                    .backing_cause(None)
                    .map(|c| memory(a, Some(c)))
            }),
        }
    }

    /// Drops hv's page-table entry of region frame `gpa` so that KVM drops its shadow
    /// translations of it (coherence after a guest changed an L1 entry mapping it); the
    /// data stays in the file.
    pub fn forget_frame(&self, gpa: u64) {
        for a in self.lock().iter() {
            let Some(off) = gpa.checked_sub(a.gpa) else {
                continue;
            };
            if off < a.assignment.region.size {
                let host = a.assignment.region.host_address() + (off & !(PAGE_SIZE - 1));
                // SAFETY: one page inside the region's MAP_SHARED file mapping;
                // MADV_DONTNEED only drops page-table entries, the data stays in the
                // page cache and is faulted back in on the next access.
                unsafe {
                    libc::madvise(
                        host as *mut libc::c_void,
                        crate::conv::usize_from(PAGE_SIZE),
                        libc::MADV_DONTNEED,
                    );
                }
                return;
            }
        }
    }

    /// Detaches the region in file `path`: its memslot leaves `vm` (a later guest
    /// access is an unknown MMIO access and crashes the domain) and the region is
    /// released. Returns its (guest-physical address, bytes).
    pub fn detach(
        &self,
        vm: &VmFd,
        domid: u32,
        path: &Path,
    ) -> Result<(u64, u64), PassthroughError> {
        let mut list = self.lock();
        let Some(i) = list.iter().position(|a| a.assignment.region.is(path)) else {
            return Err(PassthroughError::NotAttached {
                path: path.to_path_buf(),
                domid,
            });
        };
        let a = list.remove(i);
        let range = (a.gpa, a.assignment.region.size);
        remove_memslot(vm, a);
        Ok(range)
    }

    /// Detaches every region (the domain is dying).
    pub fn detach_all(&self, vm: &VmFd) {
        for a in self.lock().drain(..) {
            remove_memslot(vm, a);
        }
    }

    /// Number of attached regions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if no region is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a region's memslot (if it was added), then releases the region.
fn remove_memslot(vm: &VmFd, a: Attached) {
    if a.in_vm {
        // SAFETY: deleting a memslot (size 0) never exposes memory.
        if let Err(e) = unsafe { vm.set_user_memory_region(a.memslot(0)) } {
            tracing::warn!(error = %e, path = %a.assignment.region.path.display(),
                "removing a passthrough memslot failed");
        }
    }
    drop(a);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hv-pt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn spec(path: &Path, size: u64) -> RegionSpec {
        RegionSpec {
            path: path.to_path_buf(),
            size,
            create: true,
        }
    }

    #[test]
    fn gpas_follow_the_window() {
        let pool_end = (64 << 20) + 300 * PAGE_SIZE;
        let w = crate::gpa::window_gpa_for(pool_end);
        let g = region_gpas(pool_end, &[PAGE_SIZE, 3 << 20, 2 << 20]);
        assert_eq!(g[0], w + crate::gpa::WINDOW_BYTES);
        assert_eq!(g[1], g[0] + REGION_ALIGN);
        assert_eq!(g[2], g[1] + (4 << 20));
        assert!(g.iter().all(|g| g % REGION_ALIGN == 0));
    }

    #[test]
    fn exclusive_assignment_and_release() {
        let p = tmp("a");
        let regions = Regions::new();
        assert!(matches!(
            regions.assign(1, &spec(&p, 1000)),
            Err(PassthroughError::BadSize { size: 1000, .. })
        ));
        let a = regions.assign(1, &spec(&p, 8192)).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        assert_eq!(regions.owner(&p), Some(1));
        match regions.assign(2, &spec(&p, 4096)) {
            Err(PassthroughError::Busy { owner: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Another hypervisor (or process) in the meantime: the file is locked.
        let other = Regions::new();
        let e = other.assign(3, &spec(&p, 4096)).unwrap_err();
        assert!(matches!(e, PassthroughError::Locked { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!(
                "is in use by process {} (this process), which has it open writable",
                std::process::id()
            )),
            "{e}"
        );
        drop(a);
        assert_eq!(regions.owner(&p), None);
        let b = regions.assign(2, &spec(&p, 4096)).unwrap();
        assert_eq!(b.domid(), 2);
        assert!(matches!(
            regions.assign(2, &spec(&p, 3 << 20)),
            Err(PassthroughError::Busy { owner: 2, .. })
        ));
        drop(b);
        assert!(matches!(
            regions.assign(
                2,
                &RegionSpec {
                    path: p.clone(),
                    size: 3 << 20,
                    create: true
                }
            ),
            Err(PassthroughError::FileTooSmall {
                file_bytes: 8192,
                ..
            })
        ));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            regions.assign(
                1,
                &RegionSpec {
                    path: p.clone(),
                    size: 4096,
                    create: false
                }
            ),
            Err(PassthroughError::Open { .. })
        ));
    }

    #[test]
    fn all_or_none_and_duplicates() {
        let (p, q) = (tmp("b"), tmp("c"));
        let regions = Regions::new();
        let held = regions.assign(9, &spec(&q, 4096)).unwrap();
        let r = DomainRegions::assign(&regions, 1, &[spec(&p, 4096), spec(&q, 4096)], 1 << 30);
        assert!(matches!(r, Err(PassthroughError::Busy { owner: 9, .. })));
        // The first one was released again.
        assert_eq!(regions.owner(&p), None);
        drop(held);
        let d =
            DomainRegions::assign(&regions, 1, &[spec(&p, 4096), spec(&q, 4096)], 1 << 30).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.ranges()[1].0, d.ranges()[0].0 + REGION_ALIGN);
        assert_eq!(d.find(d.ranges()[1].0 + 4095), Some(d.ranges()[1]));
        assert_eq!(d.find(d.ranges()[1].0 + 4096), None);
        // The same file twice, or through another path, is refused before anything
        // is opened.
        let dot = p.parent().unwrap().join(".").join(p.file_name().unwrap());
        assert!(matches!(
            check_exclusive([("x", &spec(&p, 4096)), ("y", &spec(&dot, 8192))]),
            Err(PassthroughError::Duplicate { .. })
        ));
        let missing = tmp("never");
        let missing2 = missing
            .parent()
            .unwrap()
            .join(".")
            .join(missing.file_name().unwrap());
        match check_exclusive([("x", &spec(&missing, 4096)), ("y", &spec(&missing2, 4096))]) {
            Err(e @ PassthroughError::Duplicate { .. }) => {
                assert!(e.to_string().contains("both x and y"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(check_exclusive([("x", &spec(&p, 4096)), ("y", &spec(&q, 4096))]).is_ok());
        drop(d);
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_file(&q).unwrap();
    }
}
