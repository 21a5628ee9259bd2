//! A driver for hv's emulated block device (SPEC.md §8.9.6): six 32-bit I/O-port
//! registers ([`hv_abi::device::EmuBlockReg`]), every access handled by the
//! hypervisor (one VM exit per 4 bytes of data: the "hypervisor-direct" model).
//!
//! Works at CPL 0, and at CPL 3 once the device's ports are open to ring 3
//! ([`crate::user::allow_user_ports`]).

use core::fmt;

use hv_abi::device::{
    EmuBlockReg, EMU_BLOCK_MAX_COUNT, EMU_CMD_FLUSH, EMU_CMD_READ, EMU_CMD_WRITE, EMU_STATUS_DRQ,
    EMU_STATUS_ERROR, EMU_STATUS_READY,
};
use hv_abi::Errno;

use crate::arch::{inl, outl};
use crate::devices::{Device, DEV_EMU_BLOCK};
use crate::error::Error;

pub use hv_abi::blkif::SECTOR_SIZE;
pub use hv_abi::device::{EMU_BLOCK_BASE, EMU_BLOCK_PORTS};

/// Dwords per sector.
const DWORDS_PER_SECTOR: usize = SECTOR_SIZE as usize / 4;

/// Why an emulated-block operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmuBlockError {
    /// The device is not an emulated block device.
    NotEmuBlock {
        /// Its index.
        index: u32,
        /// Its kind.
        kind: u16,
    },
    /// The buffer is not a whole number of sectors, or is empty.
    BadLength(usize),
    /// The device reported an error: `STATUS` = `EMU_STATUS_ERROR | errno`.
    Device {
        /// The command (`EMU_CMD_*`).
        command: u32,
        /// The first sector of the failing command.
        sector: u64,
        /// The errno (decoded, or `Unknown(-errno)`).
        error: Error,
    },
    /// `STATUS` held something else than the protocol allows at this point.
    Protocol {
        /// The command.
        command: u32,
        /// The status read.
        status: u32,
    },
}

impl fmt::Display for EmuBlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EmuBlockError::NotEmuBlock { index, kind } => write!(
                f,
                "device {index} is not an emulated block device (kind {kind}: {})",
                crate::devices::kind_name(kind)
            ),
            EmuBlockError::BadLength(n) => {
                write!(f, "{n} bytes is not a whole, non-zero number of sectors")
            }
            EmuBlockError::Device {
                command,
                sector,
                error,
            } => write!(f, "command {command} at sector {sector} failed: {error}"),
            EmuBlockError::Protocol { command, status } => {
                write!(f, "command {command}: unexpected status {status:#x}")
            }
        }
    }
}

/// An emulated block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuBlock {
    base: u16,
    sectors: u64,
    readonly: bool,
}

impl EmuBlock {
    /// The driver for device `dev` of the device table (kind `DEV_EMU_BLOCK`: `base` is
    /// the first port, `size` the sectors).
    pub fn from_device(dev: &Device) -> Result<EmuBlock, EmuBlockError> {
        if dev.kind() != DEV_EMU_BLOCK || dev.entry.base > u64::from(u16::MAX - EMU_BLOCK_PORTS) {
            return Err(EmuBlockError::NotEmuBlock {
                index: dev.index,
                kind: dev.kind(),
            });
        }
        Ok(EmuBlock {
            base: dev.entry.base as u16,
            sectors: dev.entry.size,
            readonly: dev.readonly(),
        })
    }

    /// A driver for the device at ports `base..base + 0x18` with `sectors` sectors.
    ///
    /// # Safety
    /// The ports must be an emulated block device (on hv, an access to an unknown port
    /// crashes the domain).
    pub const unsafe fn new(base: u16, sectors: u64) -> EmuBlock {
        EmuBlock {
            base,
            sectors,
            readonly: false,
        }
    }

    /// The first I/O port.
    pub const fn base(&self) -> u16 {
        self.base
    }

    /// The disk's size in sectors.
    pub const fn sectors(&self) -> u64 {
        self.sectors
    }

    /// True if the disk refuses writes.
    pub const fn readonly(&self) -> bool {
        self.readonly
    }

    fn out(&self, reg: EmuBlockReg, v: u32) {
        // SAFETY: the port is one of the device's registers (constructor contract);
        // register writes affect the device only.
        unsafe { outl(self.base + reg as u16, v) }
    }

    fn inp(&self, reg: EmuBlockReg) -> u32 {
        // SAFETY: as in `out`.
        unsafe { inl(self.base + reg as u16) }
    }

    /// The `STATUS` register.
    pub fn status(&self) -> u32 {
        self.inp(EmuBlockReg::Status)
    }

    /// Starts `command` on `count` sectors from `sector` and returns the status.
    fn start(&self, command: u32, sector: u64, count: u32) -> u32 {
        self.out(EmuBlockReg::SectorLo, sector as u32);
        self.out(EmuBlockReg::SectorHi, (sector >> 32) as u32);
        self.out(EmuBlockReg::Count, count);
        self.out(EmuBlockReg::Command, command);
        self.status()
    }

    /// Checks a status against what the protocol expects.
    fn expect(
        &self,
        command: u32,
        sector: u64,
        status: u32,
        want: u32,
    ) -> Result<(), EmuBlockError> {
        if status & EMU_STATUS_ERROR != 0 {
            let errno = i64::from(status & 0xFFFF);
            let error = match Errno::from_ret(-errno) {
                Some(e) => Error::Errno(e),
                None => Error::Unknown(-errno),
            };
            return Err(EmuBlockError::Device {
                command,
                sector,
                error,
            });
        }
        if status != want {
            return Err(EmuBlockError::Protocol { command, status });
        }
        Ok(())
    }

    /// Runs a raw command and returns the status it leaves (for exercising the
    /// device's checks: no data phase is run).
    pub fn raw_command(&self, command: u32, sector: u64, count: u32) -> u32 {
        self.start(command, sector, count)
    }

    fn check_len(len: usize) -> Result<usize, EmuBlockError> {
        if len == 0 || len % SECTOR_SIZE as usize != 0 {
            return Err(EmuBlockError::BadLength(len));
        }
        Ok(len / SECTOR_SIZE as usize)
    }

    /// Reads `buf.len() / 512` sectors from `sector` (commands of up to 128 sectors).
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), EmuBlockError> {
        Self::check_len(buf.len())?;
        let chunk = EMU_BLOCK_MAX_COUNT as usize * SECTOR_SIZE as usize;
        for (k, part) in buf.chunks_mut(chunk).enumerate() {
            let s = sector.wrapping_add((k * EMU_BLOCK_MAX_COUNT as usize) as u64);
            let count = (part.len() / SECTOR_SIZE as usize) as u32;
            let st = self.start(EMU_CMD_READ, s, count);
            self.expect(EMU_CMD_READ, s, st, EMU_STATUS_DRQ)?;
            for w in part.chunks_exact_mut(4) {
                w.copy_from_slice(&self.inp(EmuBlockReg::Data).to_le_bytes());
            }
            let st = self.status();
            self.expect(EMU_CMD_READ, s, st, EMU_STATUS_READY)?;
        }
        Ok(())
    }

    /// Writes `buf` (a whole number of sectors) from `sector` (commands of up to 128
    /// sectors). The data is in the image when this returns; durable after
    /// [`EmuBlock::flush`].
    pub fn write(&self, sector: u64, buf: &[u8]) -> Result<(), EmuBlockError> {
        Self::check_len(buf.len())?;
        let chunk = EMU_BLOCK_MAX_COUNT as usize * SECTOR_SIZE as usize;
        for (k, part) in buf.chunks(chunk).enumerate() {
            let s = sector.wrapping_add((k * EMU_BLOCK_MAX_COUNT as usize) as u64);
            let count = (part.len() / SECTOR_SIZE as usize) as u32;
            let st = self.start(EMU_CMD_WRITE, s, count);
            self.expect(EMU_CMD_WRITE, s, st, EMU_STATUS_DRQ)?;
            for w in part.chunks_exact(4) {
                let mut b = [0u8; 4];
                b.copy_from_slice(w);
                self.out(EmuBlockReg::Data, u32::from_le_bytes(b));
            }
            let st = self.status();
            self.expect(EMU_CMD_WRITE, s, st, EMU_STATUS_READY)?;
        }
        Ok(())
    }

    /// Writes `sectors` sectors from `sector`, taking each dword of data from
    /// `word(i)` (`i` = dword index from the start): no buffer.
    pub fn write_with(
        &self,
        sector: u64,
        sectors: u64,
        mut word: impl FnMut(u64) -> u32,
    ) -> Result<(), EmuBlockError> {
        let mut done = 0u64;
        while done < sectors {
            let count = (sectors - done).min(u64::from(EMU_BLOCK_MAX_COUNT)) as u32;
            let s = sector.wrapping_add(done);
            let st = self.start(EMU_CMD_WRITE, s, count);
            self.expect(EMU_CMD_WRITE, s, st, EMU_STATUS_DRQ)?;
            let first = done * DWORDS_PER_SECTOR as u64;
            for i in 0..u64::from(count) * DWORDS_PER_SECTOR as u64 {
                self.out(EmuBlockReg::Data, word(first + i));
            }
            let st = self.status();
            self.expect(EMU_CMD_WRITE, s, st, EMU_STATUS_READY)?;
            done += u64::from(count);
        }
        Ok(())
    }

    /// Flushes: every write done before is durable (`fdatasync` on the host) when this
    /// returns.
    pub fn flush(&self) -> Result<(), EmuBlockError> {
        // Sector 0, one sector: valid for any disk, whether or not the device checks
        // the range of a flush.
        let st = self.start(EMU_CMD_FLUSH, 0, 1);
        self.expect(EMU_CMD_FLUSH, 0, st, EMU_STATUS_READY)
    }
}
