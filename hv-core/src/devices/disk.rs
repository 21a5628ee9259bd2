//! A disk image: a raw file on the host, addressed in 512-byte sectors. Shared by the
//! PV block back-end and the emulated block device.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use hv_abi::blkif::SECTOR_SIZE;
use thiserror::Error;

use super::filelock::{self, HolderText, LockKind};

/// Errors opening or using a disk image.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The image could not be opened or created.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image's size is not a whole number of sectors, or is zero.
    #[error("disk image {path} is {bytes} bytes: not a non-zero multiple of 512")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Sectors beyond the end of the disk.
    #[error("sectors {sector}..+{count} are beyond the disk's {sectors} sectors")]
    OutOfRange {
        /// First sector asked for.
        sector: u64,
        /// Sectors asked for.
        count: u64,
        /// Sectors on the disk.
        sectors: u64,
    },
    /// Another open file (another process, usually) holds a conflicting lock on the
    /// image: a writable image is used by one at a time, a read-only one may be shared.
    #[error(
        "cannot open disk image {path} {}: it is in use by {holder} (an image can be shared \
         only when every user opens it read-only)",
        wanted.use_name()
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// The lock hv asked for.
        wanted: LockKind,
        /// Who holds the lock, if it could be found.
        holder: HolderText,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The host's I/O failed.
    #[error("disk I/O failed: {0}")]
    Io(#[source] std::io::Error),
}

/// How to open a disk image.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DiskSpec {
    /// The raw image file.
    pub path: PathBuf,
    /// Create the file with this many bytes if it does not exist (a multiple of 512).
    pub create_size: Option<u64>,
    /// Refuse writes.
    pub readonly: bool,
}

/// An open disk image, locked (shared if read-only, else exclusive: see
/// [`super::filelock`]) until it is dropped.
#[derive(Debug)]
pub struct Disk {
    /// Holds the image's lock while open.
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
}

impl Disk {
    /// Opens (or creates, if `spec.create_size` is set and the file is missing) an image
    /// and locks it: shared if read-only, exclusive if writable. [`DiskError::Locked`],
    /// naming the holder, if another open file holds a conflicting lock.
    pub fn open(spec: &DiskSpec) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open {
            path: spec.path.clone(),
            source,
        };
        let file = match spec.create_size {
            Some(size) if !spec.path.exists() => {
                if size == 0 || size % SECTOR_SIZE != 0 {
                    return Err(DiskError::BadSize {
                        path: spec.path.clone(),
                        bytes: size,
                    });
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&spec.path)
                    .map_err(open_err)?;
                f.set_len(size).map_err(open_err)?;
                f
            }
            _ => OpenOptions::new()
                .read(true)
                .write(!spec.readonly)
                .open(&spec.path)
                .map_err(open_err)?,
        };
        let wanted = if spec.readonly {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        if !filelock::try_lock(&file, wanted).map_err(open_err)? {
            return Err(DiskError::Locked {
                path: spec.path.clone(),
                wanted,
                holder: HolderText(filelock::holder(&file, wanted)),
            });
        }
        let bytes = file.metadata().map_err(open_err)?.len();
        if bytes == 0 || bytes % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize {
                path: spec.path.clone(),
                bytes,
            });
        }
        Ok(Disk {
            file,
            path: spec.path.clone(),
            sectors: bytes / SECTOR_SIZE,
            readonly: spec.readonly,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// True if writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Checks that `bytes` (a multiple of 512) starting at `sector` lie on the disk;
    /// returns the byte offset.
    pub fn check(&self, sector: u64, bytes: u64) -> Result<u64, DiskError> {
        let count = bytes.div_ceil(SECTOR_SIZE);
        match sector.checked_add(count) {
            Some(end) if end <= self.sectors && bytes % SECTOR_SIZE == 0 => {
                Ok(sector * SECTOR_SIZE)
            }
            _ => Err(DiskError::OutOfRange {
                sector,
                count,
                sectors: self.sectors,
            }),
        }
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`.
    pub fn read_at(&self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let off = self.check(sector, buf.len() as u64)?;
        self.file.read_exact_at(buf, off).map_err(DiskError::Io)
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    pub fn write_at(&self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.writev_at(sector, &[IoSlice::new(buf)])
    }

    /// Writes the buffers, one after another, from `sector` (one `pwritev` when it
    /// writes everything).
    pub fn writev_at(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut off = self.check(sector, total as u64)?;
        let mut done = 0usize;
        let iovcnt = libc::c_int::try_from(bufs.len().min(libc::UIO_MAXIOV as usize))
            .map_err(|e| DiskError::Io(std::io::Error::other(e)))?;
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices outlive the call; the
        // fd is this Disk's open file.
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                bufs.as_ptr() as *const libc::iovec,
                iovcnt,
                off as libc::off_t,
            )
        };
        if n < 0 {
            return Err(DiskError::Io(std::io::Error::last_os_error()));
        }
        done += n.unsigned_abs(); // n >= 0: checked above
        if done == total {
            return Ok(());
        }
        // A short write: finish buffer by buffer.
        let mut skip = done;
        off += done as u64;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            self.file
                .write_all_at(&b[skip..], off)
                .map_err(DiskError::Io)?;
            off += (b.len() - skip) as u64;
            skip = 0;
        }
        Ok(())
    }

    /// Reads from `sector` into the buffers of `iov`, one after another (`preadv`,
    /// repeated after a short read). For buffers in guest memory, which Rust references
    /// must not cover.
    ///
    /// # Safety
    /// Each iovec must describe memory that stays mapped and writable during the call.
    pub unsafe fn readv_raw(&self, sector: u64, iov: &[libc::iovec]) -> Result<(), DiskError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.rw_raw(false, sector, iov) }
    }

    /// Writes the buffers of `iov`, one after another, from `sector` (`pwritev`,
    /// repeated after a short write). For buffers in guest memory.
    ///
    /// # Safety
    /// Each iovec must describe memory that stays mapped and readable during the call.
    pub unsafe fn writev_raw(&self, sector: u64, iov: &[libc::iovec]) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.rw_raw(true, sector, iov) }
    }

    /// # Safety
    /// As [`Disk::readv_raw`] (reads) or [`Disk::writev_raw`] (writes).
    unsafe fn rw_raw(
        &self,
        write: bool,
        sector: u64,
        iov: &[libc::iovec],
    ) -> Result<(), DiskError> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut off = self.check(sector, total as u64)?;
        let mut iov: Vec<libc::iovec> = iov.iter().filter(|v| v.iov_len != 0).copied().collect();
        let mut first = 0usize;
        while first < iov.len() {
            let rest = &iov[first..];
            let cnt = libc::c_int::try_from(rest.len().min(libc::UIO_MAXIOV as usize))
                .map_err(|e| DiskError::Io(std::io::Error::other(e)))?;
            let pos =
                libc::off_t::try_from(off).map_err(|e| DiskError::Io(std::io::Error::other(e)))?;
            // SAFETY: the iovecs describe memory the caller vouches for (writable for a
            // read, readable for a write) and `cnt` of them follow `rest`'s start; the fd
            // is this Disk's open file.
            let n = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), rest.as_ptr(), cnt, pos)
                } else {
                    libc::preadv(self.file.as_raw_fd(), rest.as_ptr(), cnt, pos)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiskError::Io(e));
            }
            if n == 0 {
                return Err(DiskError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut n = n.unsigned_abs(); // n > 0: checked above
            off += n as u64;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hv-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn create_write_read_flush() {
        let path = tmp("a");
        let d = Disk::open(&DiskSpec {
            path: path.clone(),
            create_size: Some(8192),
            readonly: false,
        })
        .unwrap();
        assert_eq!(d.sectors(), 16);
        let a = [1u8; 512];
        let b = [2u8; 1024];
        d.writev_at(3, &[IoSlice::new(&a), IoSlice::new(&b)])
            .unwrap();
        d.flush().unwrap();
        let mut r = [0u8; 1536];
        d.read_at(3, &mut r).unwrap();
        assert_eq!(&r[..512], &a);
        assert_eq!(&r[512..], &b);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len(), 8192);
        assert_eq!(&raw[3 * 512..4 * 512], &a);
        assert!(matches!(
            d.write_at(15, &b),
            Err(DiskError::OutOfRange {
                sector: 15,
                count: 2,
                sectors: 16
            })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, &mut r),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(d.write_at(0, &[0u8; 100]).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn raw_vectors() {
        let path = tmp("raw");
        let d = Disk::open(&DiskSpec {
            path: path.clone(),
            create_size: Some(4096),
            readonly: false,
        })
        .unwrap();
        let mut a = vec![7u8; 512];
        let mut b = vec![9u8; 1024];
        let iov = |x: &mut Vec<u8>| libc::iovec {
            iov_base: x.as_mut_ptr().cast(),
            iov_len: x.len(),
        };
        let w = [iov(&mut a), iov(&mut b)];
        // SAFETY: both vectors live across the call.
        unsafe { d.writev_raw(2, &w) }.unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert!(raw[1024..1536].iter().all(|&x| x == 7));
        assert!(raw[1536..2560].iter().all(|&x| x == 9));
        let mut r1 = vec![0u8; 1024];
        let mut r2 = vec![0u8; 512];
        let r = [iov(&mut r1), iov(&mut r2)];
        // SAFETY: as above.
        unsafe { d.readv_raw(2, &r) }.unwrap();
        assert!(r1[..512].iter().all(|&x| x == 7) && r1[512..].iter().all(|&x| x == 9));
        assert!(r2.iter().all(|&x| x == 9));
        // SAFETY: as above.
        let e = unsafe { d.readv_raw(7, &r) };
        assert!(matches!(e, Err(DiskError::OutOfRange { .. })));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn images_are_locked_while_open() {
        let path = tmp("lock");
        let spec = |readonly| DiskSpec {
            path: path.clone(),
            create_size: Some(4096),
            readonly,
        };
        let w = Disk::open(&spec(false)).unwrap();
        // A second open of the image, even in this process, is refused either way.
        for readonly in [false, true] {
            let e = Disk::open(&spec(readonly)).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, DiskError::Locked { .. }), "{msg}");
            assert!(
                msg.contains(&format!("process {} (this process)", std::process::id()))
                    && msg.contains("which has it open writable"),
                "{msg}"
            );
        }
        drop(w);
        let r1 = Disk::open(&spec(true)).unwrap();
        let r2 = Disk::open(&spec(true)).unwrap();
        let msg = Disk::open(&spec(false)).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot open disk image {} writable:",
                path.display()
            )) && msg.contains("which has it open read-only"),
            "{msg}"
        );
        drop((r1, r2));
        Disk::open(&spec(false)).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_images() {
        let path = tmp("b");
        assert!(matches!(
            Disk::open(&DiskSpec {
                path: path.clone(),
                create_size: Some(1000),
                readonly: false
            }),
            Err(DiskError::BadSize { bytes: 1000, .. })
        ));
        assert!(matches!(
            Disk::open(&DiskSpec {
                path: path.clone(),
                create_size: None,
                readonly: false
            }),
            Err(DiskError::Open { .. })
        ));
        std::fs::write(&path, [0u8; 700]).unwrap();
        assert!(matches!(
            Disk::open(&DiskSpec {
                path: path.clone(),
                create_size: None,
                readonly: false
            }),
            Err(DiskError::BadSize { bytes: 700, .. })
        ));
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let d = Disk::open(&DiskSpec {
            path: path.clone(),
            create_size: None,
            readonly: true,
        })
        .unwrap();
        assert!(matches!(
            d.write_at(0, &[0u8; 512]),
            Err(DiskError::ReadOnly)
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
