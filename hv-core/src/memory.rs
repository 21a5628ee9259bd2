//! Domain memory: RAM and the page-table pool, backed by one memfd.
//!
//! The memfd holds RAM at offset 0 and the page-table pool right after it; vm-memory
//! maps both. RAM is guest-physical `[0, ram_bytes)`, the pool starts at `ram_bytes`
//! rounded up to 2 MiB. Every access from the host to guest memory goes through the
//! bounds-checked helpers here.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use hv_abi::PAGE_SIZE;
use thiserror::Error;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

pub use crate::params::{MAX_RAM_BYTES, MIN_RAM_BYTES};

/// Errors of domain memory set-up and access.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The requested RAM size is not usable.
    #[error("memory size {0} bytes is invalid: it must be a multiple of 4 KiB between 2 MiB and 256 GiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create guest memory file: {0}")]
    Memfd(#[source] std::io::Error),
    /// Mapping the memory failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// A guest-physical range is outside the domain's memory.
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside the domain's memory")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
}

/// The memory of one domain. A clone is another handle to the same memory (the
/// mapping lives as long as any handle).
#[derive(Clone)]
pub struct DomainMemory {
    mem: GuestMemoryMmap<()>,
    memfd: Arc<File>,
    ram_bytes: u64,
    pool_gpa: u64,
    pool_frames: u64,
}

impl std::fmt::Debug for DomainMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainMemory")
            .field("ram_bytes", &self.ram_bytes)
            .field("pool_gpa", &self.pool_gpa)
            .field("pool_frames", &self.pool_frames)
            .finish()
    }
}

pub use crate::gpa::pool_gpa_for;

impl DomainMemory {
    /// Creates RAM of `ram_bytes` and a page-table pool of `pool_frames` frames.
    pub fn new(name: &str, ram_bytes: u64, pool_frames: u64) -> Result<Self, MemoryError> {
        crate::params::check_memory(ram_bytes).map_err(|_| MemoryError::BadSize(ram_bytes))?;
        let pool_bytes = pool_frames
            .checked_mul(PAGE_SIZE)
            .filter(|b| *b > 0 && *b <= 16 << 30)
            .ok_or(MemoryError::BadSize(ram_bytes))?;
        let total = ram_bytes + pool_bytes;
        let memfd = Arc::new(create_memfd(name, total)?);
        let pool_gpa = pool_gpa_for(ram_bytes);
        let ram_len = usize::try_from(ram_bytes).map_err(|_| MemoryError::BadSize(ram_bytes))?;
        let pool_len = usize::try_from(pool_bytes).map_err(|_| MemoryError::BadSize(ram_bytes))?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (
                GuestAddress(0),
                ram_len,
                Some(FileOffset::from_arc(memfd.clone(), 0)),
            ),
            (
                GuestAddress(pool_gpa),
                pool_len,
                Some(FileOffset::from_arc(memfd.clone(), ram_bytes)),
            ),
        ])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(DomainMemory {
            mem,
            memfd,
            ram_bytes,
            pool_gpa,
            pool_frames,
        })
    }

    /// RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// Guest-physical address of the page-table pool.
    pub fn pool_gpa(&self) -> u64 {
        self.pool_gpa
    }

    /// Size of the page-table pool in frames.
    pub fn pool_frames(&self) -> u64 {
        self.pool_frames
    }

    /// One past the last byte of the pool.
    pub fn pool_end(&self) -> u64 {
        self.pool_gpa + self.pool_frames * PAGE_SIZE
    }

    /// The memfd backing the domain's memory (RAM at offset 0, then the pool).
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// The vm-memory view.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Host virtual address of a guest-physical address, for memslot registration.
    pub fn host_address(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| MemoryError::OutOfRange { gpa, len: 0 })
    }

    /// Checks that `[gpa, gpa + len)` lies entirely in RAM (not the pool), without
    /// overflow. This is the check for buffers a guest passes to a hypercall.
    pub fn check_ram(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.ram_bytes => Ok(()),
            _ => Err(MemoryError::OutOfRange { gpa, len }),
        }
    }

    /// Reads guest RAM into `buf` after [`Self::check_ram`].
    pub fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.check_ram(gpa, len)?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Writes `buf` to guest RAM after [`Self::check_ram`].
    pub fn write_ram(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.check_ram(gpa, len)?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Reads a fixed-layout ABI structure from guest RAM.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T, MemoryError> {
        let mut v = T::new_zeroed();
        self.read_ram(gpa, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Writes a fixed-layout ABI structure to guest RAM.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, v: &T) -> Result<(), MemoryError> {
        self.write_ram(gpa, v.as_bytes())
    }

    /// Reads anywhere in the domain's memory (RAM or pool): host-side use only.
    pub fn guest_memory_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }

    /// Writes anywhere in the domain's memory (RAM or pool): host-side set-up only.
    pub fn write_any(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }
}

fn create_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(format!("hv-{}", name.replace('\0', "")))
        .map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: memfd_create takes a valid NUL-terminated string and flags; it returns a
    // new file descriptor or -1, which is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let m = DomainMemory::new("t", 4 << 20, 16).unwrap();
        assert_eq!(m.pool_gpa(), 4 << 20);
        assert!(m.check_ram(0, 4 << 20).is_ok());
        assert!(m.check_ram((4 << 20) - 8, 16).is_err());
        assert!(m.check_ram(u64::MAX - 7, 16).is_err());
        assert!(m.check_ram(4 << 20, 1).is_err());
        m.write_ram(0x1000, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read_ram(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        m.write_any(m.pool_gpa(), b"pt").unwrap();
        assert!(m.read_ram(m.pool_gpa(), &mut b).is_err());
        let m2 = DomainMemory::new("t", (3 << 20) + 4096, 1).unwrap();
        assert_eq!(m2.pool_gpa(), 4 << 20);
        assert!(DomainMemory::new("t", 1 << 20, 1).is_err());
        assert!(DomainMemory::new("t", (4 << 20) + 1, 1).is_err());
    }
}
