//! Device discovery and the connection handshake (SPEC.md §8.9.1, §8.9.3).
//!
//! The hypervisor lists a domain's devices in a table at `start_info.devices_gpa`
//! ([`DeviceTable::from_start_info`]); a device's index in it is its handle in
//! `dev_op`. Ring devices (PV block) are connected with [`connect`] (see
//! [`crate::blkfront`], which does the whole handshake) and closed with
//! [`disconnect`]. Needs the `dev_op` feature ([`hv_abi::Features::DEV_OP`]).
//!
//! The table is hypervisor-written memory (it updates `state` and `error`
//! concurrently): entries are read with volatile copies, never through references.

use core::fmt;

use hv_abi::device::{DevConnect, DEVOP_CONNECT, DEVOP_DISCONNECT, DEVOP_STATE, MAX_DEVICES};
use hv_abi::start_info::StartInfo;
use hv_abi::Op;

use crate::error::{check, Error};
use crate::evtchn::Port;
use crate::grant::GrantRef;
use crate::hypercall::hypercall2;
use crate::virt_to_phys;

pub use hv_abi::device::{
    DeviceEntry, DEVF_READONLY, DEV_CONSOLE, DEV_EMU_BLOCK, DEV_PASSTHROUGH, DEV_PV_BLOCK,
    DEV_UART, DOMID_HV, STATE_CLOSED, STATE_CONNECTED, STATE_INITIALISING,
};

/// A short name for a device kind (`"console"`, `"pv-block"`, `"emu-block"`,
/// `"passthrough"`, `"uart"`, or `"unknown"`).
pub const fn kind_name(kind: u16) -> &'static str {
    match kind {
        DEV_CONSOLE => "console",
        DEV_PV_BLOCK => "pv-block",
        DEV_EMU_BLOCK => "emu-block",
        DEV_PASSTHROUGH => "passthrough",
        DEV_UART => "uart",
        _ => "unknown",
    }
}

/// A short name for a handshake state (`"initialising"`, `"connected"`, `"closed"`, or
/// `"unknown"`).
pub const fn state_name(state: u32) -> &'static str {
    match state {
        STATE_INITIALISING => "initialising",
        STATE_CONNECTED => "connected",
        STATE_CLOSED => "closed",
        _ => "unknown",
    }
}

/// One device: its index (the `dev_op` handle) and a copy of its table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// Index in the device table.
    pub index: u32,
    /// The entry as read (its `state` and `error` may have changed since: see
    /// [`DeviceTable::get`] or [`state`]).
    pub entry: DeviceEntry,
}

impl Device {
    /// The device's kind (`DEV_*`).
    pub const fn kind(&self) -> u16 {
        self.entry.kind
    }

    /// True if the device refuses writes ([`DEVF_READONLY`]).
    pub const fn readonly(&self) -> bool {
        self.entry.flags & DEVF_READONLY != 0
    }
}

/// The device table start_info describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTable {
    base: u64,
    len: u32,
}

impl DeviceTable {
    /// The table at `start_info.devices_gpa` (`nr_devices` entries, at most
    /// [`MAX_DEVICES`]); `None` if start_info describes no table (address 0 or not
    /// 8-byte aligned, or no entry).
    pub fn from_start_info(si: &StartInfo) -> Option<DeviceTable> {
        if si.devices_gpa == 0 || si.devices_gpa % 8 != 0 || si.nr_devices == 0 {
            return None;
        }
        Some(DeviceTable {
            base: si.devices_gpa,
            len: si.nr_devices.min(MAX_DEVICES),
        })
    }

    /// Number of entries.
    pub const fn len(&self) -> u32 {
        self.len
    }

    /// True if the table has no entry.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device `index`, read now; `None` past the end.
    pub fn get(&self, index: u32) -> Option<Device> {
        if index >= self.len {
            return None;
        }
        let at = self.base + u64::from(index) * size_of::<DeviceEntry>() as u64;
        // SAFETY: the table is identity-mapped RAM the hypervisor reserved for it
        // (start_info), `index` is within it and entries are 8-aligned; the hypervisor
        // writes it concurrently, so it is copied with a volatile read.
        let entry = unsafe { core::ptr::read_volatile(at as *const DeviceEntry) };
        Some(Device { index, entry })
    }

    /// Every device, in table order.
    pub fn iter(&self) -> impl Iterator<Item = Device> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }

    /// The `nth` (from 0) device of kind `kind`.
    pub fn find(&self, kind: u16, nth: usize) -> Option<Device> {
        self.iter().filter(|d| d.kind() == kind).nth(nth)
    }

    /// The first device of kind `kind`.
    pub fn first(&self, kind: u16) -> Option<Device> {
        self.find(kind, 0)
    }

    /// Device `index`'s `state` and `error` as the table shows them now (no
    /// hypercall).
    pub fn state(&self, index: u32) -> Option<(u32, i32)> {
        self.get(index).map(|d| (d.entry.state, d.entry.error))
    }
}

/// A failed `dev_op`, with the operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevOpError {
    /// `"connect"`, `"disconnect"` or `"state"`.
    pub op: &'static str,
    /// The device index.
    pub dev: u32,
    /// The hypervisor's error.
    pub error: Error,
}

impl fmt::Display for DevOpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dev_op {} of device {}: {}",
            self.op, self.dev, self.error
        )
    }
}

/// `dev_op(DEVOP_CONNECT)`: connects ring device `dev` to the ring page behind grant
/// `ring_gref` (initialised, granted writable to the device's `backend_domid`) and to
/// `port` (unbound for `backend_domid`). See [`crate::blkfront::Blkfront::connect`],
/// which prepares both.
pub fn connect(dev: u32, ring_gref: GrantRef, port: Port) -> Result<(), DevOpError> {
    let arg = DevConnect {
        dev,
        ring_gref,
        port,
        reserved: 0,
    };
    // SAFETY: the hypervisor only reads the 16-byte argument, borrowed for the call and
    // identity-mapped; what it then does with the granted ring page was consented to by
    // granting it.
    let ret = unsafe {
        hypercall2(
            Op::DevOp,
            DEVOP_CONNECT,
            virt_to_phys(&arg as *const DevConnect),
        )
    };
    check(ret).map(|_| ()).map_err(|error| DevOpError {
        op: "connect",
        dev,
        error,
    })
}

/// `dev_op(DEVOP_DISCONNECT, dev)`: the back-end stops and releases the ring grant;
/// the port becomes unbound again (for `backend_domid`).
pub fn disconnect(dev: u32) -> Result<(), DevOpError> {
    // SAFETY: no pointer; the back-end stops using the granted ring.
    let ret = unsafe { hypercall2(Op::DevOp, DEVOP_DISCONNECT, u64::from(dev)) };
    check(ret).map(|_| ()).map_err(|error| DevOpError {
        op: "disconnect",
        dev,
        error,
    })
}

/// `dev_op(DEVOP_STATE, dev)`: the device's `STATE_*`.
pub fn state(dev: u32) -> Result<u32, DevOpError> {
    // SAFETY: no pointer, no state change.
    let ret = unsafe { hypercall2(Op::DevOp, DEVOP_STATE, u64::from(dev)) };
    check(ret).map(|s| s as u32).map_err(|error| DevOpError {
        op: "state",
        dev,
        error,
    })
}
