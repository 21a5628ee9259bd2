//! Devices (ABI 1.2): the device table, the connection handshake (`dev_op`), the PV
//! console page, and the register interfaces of the emulated devices.
//!
//! The hypervisor lists a domain's devices in a table at `start_info.devices_gpa`
//! (`start_info.nr_devices` entries of [`DeviceEntry`]). A device's index in the table is
//! its handle in `dev_op`. Kinds:
//!
//! | kind | `base` | `size` | how it is used |
//! | --- | --- | --- | --- |
//! | [`DEV_CONSOLE`] | GPA of the [`ConsoleInterface`] page | 0 | always connected; port in `start_info.console_evtchn` |
//! | [`DEV_PV_BLOCK`] | 0 | disk size in sectors | ring + event channel, connected with [`DEVOP_CONNECT`] |
//! | [`DEV_EMU_BLOCK`] | first I/O port of the [`EmuBlockReg`] registers | disk size in sectors | port I/O, every access handled by the hypervisor |
//! | [`DEV_PASSTHROUGH`] | GPA of the region | bytes | ordinary memory accesses, no exits |
//! | [`DEV_UART`] | first I/O port of a 16550 UART (`0x3F8`) | 8 (ports) | port I/O, for guests without PV support |

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Domain id of the hypervisor's own back-ends: front-ends grant pages and bind event
/// channels to this domain (Xen's `DOMID_XEN`).
pub const DOMID_HV: u16 = 0x7FF2;

/// Device kind: PV console ([`ConsoleInterface`]).
pub const DEV_CONSOLE: u16 = 1;
/// Device kind: PV block ([`crate::blkif`]).
pub const DEV_PV_BLOCK: u16 = 2;
/// Device kind: emulated block device ([`EmuBlockReg`]).
pub const DEV_EMU_BLOCK: u16 = 3;
/// Device kind: passthrough memory region.
pub const DEV_PASSTHROUGH: u16 = 4;
/// Device kind: emulated 16550 UART.
pub const DEV_UART: u16 = 5;

/// Device flag: the disk is read-only (writes fail with `-EACCES`).
pub const DEVF_READONLY: u16 = 1 << 0;

/// Handshake state: the back-end is ready; the front-end has not connected.
pub const STATE_INITIALISING: u32 = 1;
/// Handshake state: connected; requests flow.
pub const STATE_CONNECTED: u32 = 4;
/// Handshake state: closed by the front-end ([`DEVOP_DISCONNECT`]) or by the back-end
/// after a protocol error (`error` then says why). [`DEVOP_CONNECT`] may connect again.
pub const STATE_CLOSED: u32 = 6;

/// Most entries in the device table (it fills one page).
pub const MAX_DEVICES: u32 = 128;

/// One device table entry (32 bytes). Written by the hypervisor; the guest only reads.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DeviceEntry {
    /// `DEV_*`.
    pub kind: u16,
    /// Domain serving the device (front-ends grant to it): [`DOMID_HV`].
    pub backend_domid: u16,
    /// `DEVF_*`.
    pub flags: u16,
    /// Reserved, 0.
    pub reserved: u16,
    /// Kind-specific base (see the module table).
    pub base: u64,
    /// Kind-specific size (see the module table).
    pub size: u64,
    /// `STATE_*`: the handshake state, updated by the hypervisor.
    pub state: u32,
    /// Why the back-end closed the device (a negative [`crate::Errno`]), 0 otherwise.
    pub error: i32,
}

/// `dev_op(DEVOP_CONNECT, gpa)`: connects a ring device; `gpa` holds a [`DevConnect`].
/// The front-end first initialises the ring page, grants it to `backend_domid`
/// (writable) and allocates an unbound event-channel port for `backend_domid`.
pub const DEVOP_CONNECT: u64 = 0;
/// `dev_op(DEVOP_DISCONNECT, dev)`: the back-end stops, answers nothing more, releases
/// the ring grant; the port goes back to unbound (for `backend_domid`). State: closed.
pub const DEVOP_DISCONNECT: u64 = 1;
/// `dev_op(DEVOP_STATE, dev)`: returns the device's `STATE_*`.
pub const DEVOP_STATE: u64 = 2;

/// [`DEVOP_CONNECT`]'s argument (16 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DevConnect {
    /// Device index in the table.
    pub dev: u32,
    /// Grant reference of the ring page (writable grant to `backend_domid`).
    pub ring_gref: u32,
    /// The front-end's event-channel port, unbound for `backend_domid`.
    pub port: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

/// Bytes of console input buffer.
pub const CONSOLE_IN_SIZE: u32 = 1024;
/// Bytes of console output buffer.
pub const CONSOLE_OUT_SIZE: u32 = 2048;

/// The PV console page (Xen's `xencons_interface`): two byte rings with free-running
/// indices. The guest produces `out` and consumes `in`; the hypervisor the reverse. After
/// producing or consuming, a side sends on the console port.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ConsoleInterface {
    /// Input bytes (host to guest); byte of index `i` at `i % 1024`.
    pub input: [u8; CONSOLE_IN_SIZE as usize],
    /// Output bytes (guest to host); byte of index `i` at `i % 2048`.
    pub output: [u8; CONSOLE_OUT_SIZE as usize],
    /// Input consumed by the guest.
    pub in_cons: u32,
    /// Input produced by the hypervisor.
    pub in_prod: u32,
    /// Output consumed by the hypervisor.
    pub out_cons: u32,
    /// Output produced by the guest.
    pub out_prod: u32,
    /// Reserved, 0.
    pub reserved: [u8; 1008],
}

/// Registers of the emulated block device: 32-bit I/O ports at `base + offset`.
///
/// Protocol: write `SECTOR_LO`, `SECTOR_HI`, `COUNT` (1..=[`EMU_BLOCK_MAX_COUNT`]
/// sectors), then `COMMAND`. For a write, `STATUS` becomes [`EMU_STATUS_DRQ`] and the
/// guest writes `COUNT * 128` dwords to `DATA`; after the last one the data goes to the
/// disk and `STATUS` becomes [`EMU_STATUS_READY`]. For a read the data is read at once,
/// `STATUS` is `DRQ` and the guest reads `COUNT * 128` dwords from `DATA`. A flush runs
/// `fdatasync` before `STATUS` reads `READY`. Errors: `STATUS` = [`EMU_STATUS_ERROR`] |
/// errno (`EINVAL`, `ERANGE`, `EIO`, `EACCES`) until the next command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum EmuBlockReg {
    /// First sector, low 32 bits (write).
    SectorLo = 0x00,
    /// First sector, high 32 bits (write).
    SectorHi = 0x04,
    /// Sector count (write).
    Count = 0x08,
    /// `EMU_CMD_*` (write): starts the command.
    Command = 0x0C,
    /// `EMU_STATUS_*` (read).
    Status = 0x10,
    /// Data, 4 bytes per access (read or write during `DRQ`).
    Data = 0x14,
}

/// Ports the emulated block device occupies from its base.
pub const EMU_BLOCK_PORTS: u16 = 0x18;
/// The emulated block device's base port. Ring 3 reaches it only through a TSS whose I/O
/// bitmap covers it: the boot TSS's covers ports 0..=0xEF, so a guest loads its own TSS
/// with a longer bitmap (as `guest_sdk::user::allow_user_ports` does).
pub const EMU_BLOCK_BASE: u16 = 0x410;
/// Most sectors per emulated command.
pub const EMU_BLOCK_MAX_COUNT: u32 = 128;
/// Command: read sectors.
pub const EMU_CMD_READ: u32 = 1;
/// Command: write sectors.
pub const EMU_CMD_WRITE: u32 = 2;
/// Command: flush (`fdatasync`).
pub const EMU_CMD_FLUSH: u32 = 3;
/// Status: idle, the last command succeeded.
pub const EMU_STATUS_READY: u32 = 0;
/// Status: data phase (read or write `DATA`).
pub const EMU_STATUS_DRQ: u32 = 1;
/// Status bit: the last command failed; the low 16 bits hold the (positive) errno.
pub const EMU_STATUS_ERROR: u32 = 1 << 31;

/// The UART's base port (COM1).
pub const UART_BASE: u16 = 0x3F8;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout() {
        assert_eq!(size_of::<DeviceEntry>(), 32);
        assert_eq!(offset_of!(DeviceEntry, kind), 0);
        assert_eq!(offset_of!(DeviceEntry, backend_domid), 2);
        assert_eq!(offset_of!(DeviceEntry, flags), 4);
        assert_eq!(offset_of!(DeviceEntry, base), 8);
        assert_eq!(offset_of!(DeviceEntry, size), 16);
        assert_eq!(offset_of!(DeviceEntry, state), 24);
        assert_eq!(offset_of!(DeviceEntry, error), 28);
        assert_eq!(size_of::<DevConnect>(), 16);
        assert_eq!(offset_of!(DevConnect, ring_gref), 4);
        assert_eq!(offset_of!(DevConnect, port), 8);
        assert_eq!(size_of::<ConsoleInterface>(), 4096);
        assert_eq!(offset_of!(ConsoleInterface, output), 1024);
        assert_eq!(offset_of!(ConsoleInterface, in_cons), 3072);
        assert_eq!(offset_of!(ConsoleInterface, in_prod), 3076);
        assert_eq!(offset_of!(ConsoleInterface, out_cons), 3080);
        assert_eq!(offset_of!(ConsoleInterface, out_prod), 3084);
        assert_eq!(MAX_DEVICES as usize * size_of::<DeviceEntry>(), 4096);
    }
}
