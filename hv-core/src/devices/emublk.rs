//! The emulated ("hypervisor-direct") block device: a disk behind a few 32-bit I/O
//! ports ([`hv_abi::device::EmuBlockReg`]). Every guest access is one exit handled here.
//!
//! Protocol (SPEC 8.9): write `SECTOR_LO`, `SECTOR_HI`, `COUNT`, then `COMMAND`.
//! - `READ`: the sectors are read from the disk at once; `STATUS` = `DRQ`; the guest
//!   reads `COUNT * 128` dwords from `DATA`; after the last one `STATUS` = `READY`.
//! - `WRITE`: `STATUS` = `DRQ`; the guest writes `COUNT * 128` dwords to `DATA`; after
//!   the last one the sectors go to the disk (one `pwrite`) and `STATUS` = `READY`.
//! - `FLUSH`: `fdatasync` of the image, then `STATUS` = `READY`.
//!
//! Errors set `STATUS` = `ERROR | errno` until the next command, and end any data
//! phase (its data is dropped):
//! - `EINVAL`: a count of 0 or more than [`EMU_BLOCK_MAX_COUNT`], an unknown command,
//!   a `DATA` access outside a data phase, in the wrong direction, or larger than what
//!   is left of the transfer;
//! - `ERANGE`: sectors beyond the end of the disk;
//! - `EACCES`: a write command to a read-only disk;
//! - `EIO`: the host's I/O failed.
//!
//! Ignored (SPEC 8.9.6): an access of another size than 4 bytes or not at a register's
//! offset (a read returns all ones), a write to `STATUS`, a read of a write-only
//! register (`SECTOR_LO`, `SECTOR_HI`, `COUNT`, `COMMAND`: all ones). A new command
//! ends the data phase of the previous one. `DATA` also takes string I/O
//! (`rep insd` / `rep outsd`, which KVM may hand over several dwords at a time): an
//! access of 4·n bytes is n dword accesses.

use std::sync::{Arc, Mutex};

use hv_abi::blkif::SECTOR_SIZE;
use hv_abi::device::{
    EmuBlockReg, EMU_BLOCK_MAX_COUNT, EMU_BLOCK_PORTS, EMU_CMD_FLUSH, EMU_CMD_READ, EMU_CMD_WRITE,
    EMU_STATUS_DRQ, EMU_STATUS_ERROR, EMU_STATUS_READY,
};
use hv_abi::Errno;

use super::disk::{Disk, DiskError};

/// The data phase of a command.
#[derive(Debug)]
enum Phase {
    /// No data phase: `STATUS` is `READY` or an error.
    Idle,
    /// A read: `buf` holds the sectors; the guest reads from `pos`.
    Read { buf: Vec<u8>, pos: usize },
    /// A write to `sector`: the guest fills `buf` up to `pos`.
    Write {
        sector: u64,
        buf: Vec<u8>,
        pos: usize,
    },
}

/// Register state.
#[derive(Debug)]
struct State {
    sector_lo: u32,
    sector_hi: u32,
    count: u32,
    status: u32,
    phase: Phase,
}

/// An emulated block device at I/O ports `base..base + EMU_BLOCK_PORTS`.
#[derive(Debug)]
pub struct EmuBlock {
    disk: Arc<Disk>,
    base: u16,
    state: Mutex<State>,
}

fn errno_status(e: Errno) -> u32 {
    // The errno (a positive number below 256) in the low 16 bits.
    EMU_STATUS_ERROR | u32::try_from(e as i64).map_or(0xFFFF, |v| v & 0xFFFF)
}

fn disk_errno(e: &DiskError) -> Errno {
    match e {
        DiskError::OutOfRange { .. } => Errno::ERANGE,
        DiskError::ReadOnly => Errno::EACCES,
        _ => Errno::EIO,
    }
}

impl EmuBlock {
    /// A device over `disk` whose registers start at port `base`.
    pub fn new(disk: Arc<Disk>, base: u16) -> EmuBlock {
        EmuBlock {
            disk,
            base,
            state: Mutex::new(State {
                sector_lo: 0,
                sector_hi: 0,
                count: 0,
                status: EMU_STATUS_READY,
                phase: Phase::Idle,
            }),
        }
    }

    /// The first port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// True if `port` is one of the device's ports.
    pub fn handles(&self, port: u16) -> bool {
        port >= self.base && u32::from(port) < u32::from(self.base) + u32::from(EMU_BLOCK_PORTS)
    }

    /// The register at `port` for an access of `len` bytes, if the access is a
    /// register access (4 bytes at a register's offset; 4·n bytes for `DATA`).
    fn reg(&self, port: u16, len: usize) -> Option<EmuBlockReg> {
        let off = port.checked_sub(self.base)?;
        let reg = match off {
            0x00 => EmuBlockReg::SectorLo,
            0x04 => EmuBlockReg::SectorHi,
            0x08 => EmuBlockReg::Count,
            0x0C => EmuBlockReg::Command,
            0x10 => EmuBlockReg::Status,
            0x14 => EmuBlockReg::Data,
            _ => return None,
        };
        let ok = match reg {
            EmuBlockReg::Data => len >= 4 && len % 4 == 0,
            _ => len == 4,
        };
        ok.then_some(reg)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registers inconsistent in a
        // way that matters more than losing the device: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest `in` from `port` into `data` (its length is the access size).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let reg = self.reg(port, data.len());
        match reg {
            Some(EmuBlockReg::Status) => {
                let v = self.lock().status;
                data.copy_from_slice(&v.to_le_bytes());
            }
            Some(EmuBlockReg::Data) => self.lock().read_data(data),
            _ => {
                if reg.is_none() {
                    tracing::debug!(port, len = data.len(), "emulated block: bad read ignored");
                }
                data.fill(0xFF);
            }
        }
    }

    /// A guest `out` of `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(reg) = self.reg(port, data.len()) else {
            tracing::debug!(port, len = data.len(), "emulated block: bad write ignored");
            return;
        };
        let mut st = self.lock();
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match reg {
            EmuBlockReg::SectorLo => st.sector_lo = v,
            EmuBlockReg::SectorHi => st.sector_hi = v,
            EmuBlockReg::Count => st.count = v,
            EmuBlockReg::Command => self.command(&mut st, v),
            EmuBlockReg::Status => {}
            EmuBlockReg::Data => {
                if let Some(sector) = st.write_data(data) {
                    let r = match &st.phase {
                        Phase::Write { buf, .. } => self.disk.write_at(sector, buf),
                        _ => Ok(()),
                    };
                    st.phase = Phase::Idle;
                    match r {
                        Ok(()) => st.status = EMU_STATUS_READY,
                        Err(e) => {
                            tracing::debug!(error = %e, "emulated block: write failed");
                            st.fail(disk_errno(&e));
                        }
                    }
                }
            }
        }
    }

    /// Starts command `cmd` with the latched registers.
    fn command(&self, st: &mut State, cmd: u32) {
        st.phase = Phase::Idle;
        let sector = u64::from(st.sector_hi) << 32 | u64::from(st.sector_lo);
        let count = st.count;
        let r = match cmd {
            EMU_CMD_READ | EMU_CMD_WRITE if count == 0 || count > EMU_BLOCK_MAX_COUNT => {
                Err(Errno::EINVAL)
            }
            EMU_CMD_READ => {
                let mut buf = vec![0u8; crate::conv::usize_from(u64::from(count) * SECTOR_SIZE)];
                self.disk
                    .read_at(sector, &mut buf)
                    .map(|()| Phase::Read { buf, pos: 0 })
                    .map_err(|e| disk_errno(&e))
            }
            EMU_CMD_WRITE if self.disk.readonly() => Err(Errno::EACCES),
            EMU_CMD_WRITE => self
                .disk
                .check(sector, u64::from(count) * SECTOR_SIZE)
                .map(|_| Phase::Write {
                    sector,
                    buf: vec![0u8; crate::conv::usize_from(u64::from(count) * SECTOR_SIZE)],
                    pos: 0,
                })
                .map_err(|e| disk_errno(&e)),
            EMU_CMD_FLUSH => self
                .disk
                .flush()
                .map(|()| Phase::Idle)
                .map_err(|e| disk_errno(&e)),
            _ => Err(Errno::EINVAL),
        };
        match r {
            Ok(Phase::Idle) => st.status = EMU_STATUS_READY,
            Ok(phase) => {
                st.status = EMU_STATUS_DRQ;
                st.phase = phase;
            }
            Err(e) => {
                tracing::debug!(cmd, sector, count, errno = %e, "emulated block: command failed");
                st.fail(e);
            }
        }
    }
}

impl State {
    /// Ends any data phase with error `e`.
    fn fail(&mut self, e: Errno) {
        self.phase = Phase::Idle;
        self.status = errno_status(e);
    }

    /// A read of `DATA` into `out` (4·n bytes) during a read's data phase.
    fn read_data(&mut self, out: &mut [u8]) {
        let done = match &mut self.phase {
            Phase::Read { buf, pos } if buf.len() - *pos >= out.len() => {
                out.copy_from_slice(&buf[*pos..*pos + out.len()]);
                *pos += out.len();
                *pos == buf.len()
            }
            _ => {
                out.fill(0xFF);
                self.fail(Errno::EINVAL);
                return;
            }
        };
        if done {
            self.phase = Phase::Idle;
            self.status = EMU_STATUS_READY;
        }
    }

    /// A write of `DATA` (4·n bytes) during a write's data phase. Returns the first
    /// sector once the buffer is full (the caller writes it out).
    fn write_data(&mut self, data: &[u8]) -> Option<u64> {
        match &mut self.phase {
            Phase::Write { sector, buf, pos } if buf.len() - *pos >= data.len() => {
                buf[*pos..*pos + data.len()].copy_from_slice(data);
                *pos += data.len();
                (*pos == buf.len()).then_some(*sector)
            }
            _ => {
                self.fail(Errno::EINVAL);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::disk::DiskSpec;
    use hv_abi::device::EMU_BLOCK_BASE;

    const B: u16 = EMU_BLOCK_BASE;

    fn dev(name: &str, readonly: bool) -> (EmuBlock, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("hv-emublk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, vec![0u8; 8 * 512]).unwrap();
        let disk = Disk::open(&DiskSpec {
            path: path.clone(),
            create_size: None,
            readonly,
        })
        .unwrap();
        (EmuBlock::new(Arc::new(disk), B), path)
    }

    fn out(d: &EmuBlock, off: u16, v: u32) {
        d.pio_write(B + off, &v.to_le_bytes());
    }

    fn inl(d: &EmuBlock, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.pio_read(B + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn cmd(d: &EmuBlock, sector: u64, count: u32, c: u32) -> u32 {
        out(d, 0, u32::try_from(sector & u64::from(u32::MAX)).unwrap());
        out(d, 4, (sector >> 32) as u32);
        out(d, 8, count);
        out(d, 0xC, c);
        inl(d, 0x10)
    }

    #[test]
    fn write_read_flush() {
        let (d, path) = dev("rw", false);
        assert!(d.handles(B) && d.handles(B + 0x17) && !d.handles(B + 0x18));
        assert!(!d.handles(B - 1));
        assert_eq!(cmd(&d, 2, 2, EMU_CMD_WRITE), EMU_STATUS_DRQ);
        for i in 0..256u32 {
            out(&d, 0x14, i * 3);
            let want = if i == 255 {
                EMU_STATUS_READY
            } else {
                EMU_STATUS_DRQ
            };
            assert_eq!(inl(&d, 0x10), want, "dword {i}");
        }
        assert_eq!(cmd(&d, 0, 0, EMU_CMD_FLUSH), EMU_STATUS_READY);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[1024..1028], &0u32.to_le_bytes());
        assert_eq!(&raw[1028..1032], &3u32.to_le_bytes());
        assert_eq!(&raw[2044..2048], &(255u32 * 3).to_le_bytes());
        assert!(raw[..1024].iter().all(|b| *b == 0));
        // Read back, one dword at a time and then the rest as string I/O.
        assert_eq!(cmd(&d, 2, 2, EMU_CMD_READ), EMU_STATUS_DRQ);
        assert_eq!(inl(&d, 0x14), 0);
        assert_eq!(inl(&d, 0x14), 3);
        let mut rest = vec![0u8; 1016];
        d.pio_read(B + 0x14, &mut rest);
        assert_eq!(&rest[1012..], &(255u32 * 3).to_le_bytes());
        assert_eq!(inl(&d, 0x10), EMU_STATUS_READY);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn errors() {
        let (d, path) = dev("err", false);
        let err = |e: Errno| EMU_STATUS_ERROR | e as u32;
        assert_eq!(cmd(&d, 7, 2, EMU_CMD_READ), err(Errno::ERANGE));
        assert_eq!(cmd(&d, u64::MAX, 1, EMU_CMD_WRITE), err(Errno::ERANGE));
        assert_eq!(cmd(&d, 0, 0, EMU_CMD_READ), err(Errno::EINVAL));
        assert_eq!(cmd(&d, 0, 129, EMU_CMD_WRITE), err(Errno::EINVAL));
        assert_eq!(cmd(&d, 0, 1, 99), err(Errno::EINVAL));
        // DATA outside a data phase.
        assert_eq!(cmd(&d, 0, 0, EMU_CMD_FLUSH), EMU_STATUS_READY);
        assert_eq!(inl(&d, 0x14), u32::MAX);
        assert_eq!(inl(&d, 0x10), err(Errno::EINVAL));
        assert_eq!(cmd(&d, 0, 0, EMU_CMD_FLUSH), EMU_STATUS_READY);
        out(&d, 0x14, 5);
        assert_eq!(inl(&d, 0x10), err(Errno::EINVAL));
        // DATA in the wrong direction ends the phase.
        assert_eq!(cmd(&d, 0, 1, EMU_CMD_READ), EMU_STATUS_DRQ);
        out(&d, 0x14, 5);
        assert_eq!(inl(&d, 0x10), err(Errno::EINVAL));
        assert_eq!(inl(&d, 0x14), u32::MAX);
        // Bad sizes and offsets, STATUS writes: ignored; reads are all ones.
        assert_eq!(cmd(&d, 0, 0, EMU_CMD_FLUSH), EMU_STATUS_READY);
        let mut b = [0u8; 1];
        d.pio_read(B + 0x10, &mut b);
        assert_eq!(b, [0xFF]);
        let mut w = [0u8; 4];
        d.pio_read(B + 0x11, &mut w);
        assert_eq!(w, [0xFF; 4]);
        out(&d, 0x10, 0x1234);
        assert_eq!(inl(&d, 0x10), EMU_STATUS_READY);
        out(&d, 8, 1);
        d.pio_write(B + 0x08, &[0, 0]);
        d.pio_write(B + 0x0A, &[0, 0]);
        out(&d, 0xC, EMU_CMD_WRITE);
        assert_eq!(inl(&d, 0x10), EMU_STATUS_DRQ);
        d.pio_write(B + 0x14, &[1, 2]);
        assert_eq!(inl(&d, 0x10), EMU_STATUS_DRQ);
        // Write-only registers read as all ones.
        for off in [0, 4, 8, 0xC] {
            assert_eq!(inl(&d, off), u32::MAX);
        }
        // Too much string I/O for what is left: refused whole.
        assert_eq!(cmd(&d, 0, 1, EMU_CMD_READ), EMU_STATUS_DRQ);
        let mut big = vec![0u8; 516];
        d.pio_read(B + 0x14, &mut big);
        assert_eq!(inl(&d, 0x10), err(Errno::EINVAL));
        // A good command clears the error.
        assert_eq!(cmd(&d, 7, 1, EMU_CMD_READ), EMU_STATUS_DRQ);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn readonly() {
        let (d, path) = dev("ro", true);
        assert_eq!(
            cmd(&d, 0, 1, EMU_CMD_WRITE),
            EMU_STATUS_ERROR | Errno::EACCES as u32
        );
        assert_eq!(cmd(&d, 0, 1, EMU_CMD_READ), EMU_STATUS_DRQ);
        std::fs::remove_file(&path).unwrap();
    }
}
