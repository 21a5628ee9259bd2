//! The PV console (SPEC.md §8.9.4): output and input over the console page
//! ([`hv_abi::device::ConsoleInterface`], Xen's `xencons_interface`) and its event
//! channel, both given in start_info. Needs the `pv_console` feature.
//!
//! The console is connected from boot: no handshake. [`PvConsole::write`] copies bytes
//! into the `out` ring and sends on the port; the hypervisor writes them to the
//! domain's console and sends back when it consumed them, which
//! [`PvConsole::write_all`] waits for (in `SCHEDOP_POLL`) when the ring is full.
//! [`PvConsole::read`] takes bytes the hypervisor put in the `in` ring. The SDK's
//! [`print!`](crate::print) can be switched to the PV console with
//! [`crate::console::use_pv_console`]; the console hypercall (§8.2) keeps working for
//! early boot.
//!
//! One writer and one reader at a time (the SDK's print path serialises its writers).

use core::fmt;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use hv_abi::device::{CONSOLE_IN_SIZE, CONSOLE_OUT_SIZE};
use hv_abi::start_info::StartInfo;
use hv_abi::{Features, PAGE_SIZE};

use crate::error::Error;
use crate::evtchn::{self, Port};
use crate::{sched, time};

/// Byte offset of `in` in the page.
const IN_OFF: usize = 0;
/// Byte offset of `out`.
const OUT_OFF: usize = 1024;
const IN_CONS: usize = 3072;
const IN_PROD: usize = 3076;
const OUT_CONS: usize = 3080;
const OUT_PROD: usize = 3084;

/// How long one poll sleeps while waiting for room or input, before checking again.
const POLL_SLICE_NS: u64 = 10_000_000;

/// Why a console operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvConsoleError {
    /// The hypervisor consumed nothing before the deadline.
    TimedOut {
        /// Bytes written before giving up.
        written: usize,
    },
    /// The notification hypercall failed.
    Notify(Error),
}

impl fmt::Display for PvConsoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PvConsoleError::TimedOut { written } => write!(
                f,
                "the console output ring stayed full ({written} bytes written)"
            ),
            PvConsoleError::Notify(e) => write!(f, "notifying the console back-end: {e}"),
        }
    }
}

/// The PV console: its page and event-channel port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvConsole {
    page: u64,
    port: Port,
}

impl PvConsole {
    /// The console start_info describes, if the hypervisor has `pv_console` and gives
    /// a page-aligned page and a port.
    pub fn from_start_info(si: &StartInfo) -> Option<PvConsole> {
        let has = Features(si.features).contains(Features::PV_CONSOLE);
        if !has || si.console_ring_gpa == 0 || si.console_ring_gpa % PAGE_SIZE != 0 {
            return None;
        }
        if si.console_evtchn == 0 {
            return None;
        }
        Some(PvConsole {
            page: si.console_ring_gpa,
            port: si.console_evtchn,
        })
    }

    /// A console at page `page` (guest-physical, identity-mapped) with port `port`.
    ///
    /// # Safety
    /// `page` must be the domain's console page (or a page laid out like it that
    /// nothing else uses), mapped for the life of the value.
    pub const unsafe fn new(page: u64, port: Port) -> PvConsole {
        PvConsole { page, port }
    }

    /// The console's event-channel port.
    pub const fn port(&self) -> Port {
        self.port
    }

    /// The page's guest-physical address.
    pub const fn page(&self) -> u64 {
        self.page
    }

    fn index(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is one of the four aligned index words inside the console page,
        // mapped for our life (constructor contract); the hypervisor updates them
        // concurrently, so they are accessed atomically.
        unsafe { &*((self.page + off as u64) as *const AtomicU32) }
    }

    fn byte_ptr(&self, off: usize) -> *mut u8 {
        (self.page + off as u64) as *mut u8
    }

    /// Bytes written and not yet consumed by the hypervisor (at most 2048; a broken
    /// ring reads as full).
    pub fn output_pending(&self) -> u32 {
        let prod = self.index(OUT_PROD).load(Ordering::Relaxed);
        let cons = self.index(OUT_CONS).load(Ordering::Acquire);
        prod.wrapping_sub(cons).min(CONSOLE_OUT_SIZE)
    }

    /// Copies as much of `bytes` as fits into the output ring, publishes it and, if it
    /// wrote anything, notifies the hypervisor. Returns the number of bytes written
    /// (0 if the ring is full). A failing notification is ignored (the bytes are
    /// consumed at the next one).
    pub fn write(&self, bytes: &[u8]) -> usize {
        let n = self.put(bytes);
        if n != 0 {
            let _ = evtchn::send(self.port);
        }
        n
    }

    /// Copies into the ring without notifying.
    fn put(&self, bytes: &[u8]) -> usize {
        let prod = self.index(OUT_PROD).load(Ordering::Relaxed);
        let room = (CONSOLE_OUT_SIZE - self.output_pending()) as usize;
        let n = room.min(bytes.len());
        for (i, &b) in bytes[..n].iter().enumerate() {
            let at = prod.wrapping_add(i as u32) % CONSOLE_OUT_SIZE;
            // SAFETY: `at` < 2048: inside `out`, a part of the page only the guest
            // writes between `out_cons` and `out_prod`.
            unsafe { core::ptr::write_volatile(self.byte_ptr(OUT_OFF + at as usize), b) };
        }
        if n != 0 {
            fence(Ordering::Release);
            self.index(OUT_PROD)
                .store(prod.wrapping_add(n as u32), Ordering::Release);
        }
        n
    }

    /// Writes all of `bytes`, waiting (in `SCHEDOP_POLL` on the console port, or
    /// spinning where polling fails, as at CPL 3 without user hypercalls) while the
    /// ring is full, until system time `deadline_ns` (0: no deadline).
    pub fn write_all(&self, mut bytes: &[u8], deadline_ns: u64) -> Result<(), PvConsoleError> {
        let mut written = 0;
        while !bytes.is_empty() {
            let n = self.put(bytes);
            if n != 0 {
                evtchn::send(self.port).map_err(PvConsoleError::Notify)?;
                written += n;
                bytes = &bytes[n..];
                continue;
            }
            if deadline_ns != 0 && time::system_time_ns() >= deadline_ns {
                return Err(PvConsoleError::TimedOut { written });
            }
            // Full: sleep until the hypervisor consumed some (it sends when it has).
            evtchn::clear_pending(self.port);
            if self.output_pending() < CONSOLE_OUT_SIZE {
                continue;
            }
            let until = time::system_time_ns().saturating_add(POLL_SLICE_NS);
            let until = if deadline_ns == 0 {
                until
            } else {
                until.min(deadline_ns)
            };
            if sched::poll(&[self.port], until).is_err() {
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Input bytes waiting (at most 1024; a broken ring reads as empty).
    pub fn input_available(&self) -> u32 {
        let prod = self.index(IN_PROD).load(Ordering::Acquire);
        let cons = self.index(IN_CONS).load(Ordering::Relaxed);
        let n = prod.wrapping_sub(cons);
        if n > CONSOLE_IN_SIZE {
            0
        } else {
            n
        }
    }

    /// Takes up to `buf.len()` input bytes; returns how many. Notifies the hypervisor
    /// if it took any (it may have more to give). A broken input ring (`in_prod` more
    /// than 1024 ahead) is resynchronised: its bytes are dropped.
    pub fn read(&self, buf: &mut [u8]) -> usize {
        let prod = self.index(IN_PROD).load(Ordering::Acquire);
        let cons = self.index(IN_CONS).load(Ordering::Relaxed);
        let avail = prod.wrapping_sub(cons);
        if avail > CONSOLE_IN_SIZE {
            self.index(IN_CONS).store(prod, Ordering::Release);
            return 0;
        }
        let n = (avail as usize).min(buf.len());
        fence(Ordering::Acquire);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = cons.wrapping_add(i as u32) % CONSOLE_IN_SIZE;
            // SAFETY: `at` < 1024: inside `in`, bytes the hypervisor published.
            *b = unsafe { core::ptr::read_volatile(self.byte_ptr(IN_OFF + at as usize)) };
        }
        if n != 0 {
            fence(Ordering::Release);
            self.index(IN_CONS)
                .store(cons.wrapping_add(n as u32), Ordering::Release);
            let _ = evtchn::send(self.port);
        }
        n
    }

    /// Sleeps in `SCHEDOP_POLL` on the console port until input is available or
    /// system time reaches `deadline_ns` (0: no deadline); returns whether input is
    /// available.
    pub fn wait_input(&self, deadline_ns: u64) -> Result<bool, Error> {
        loop {
            evtchn::clear_pending(self.port);
            if self.input_available() != 0 {
                return Ok(true);
            }
            let now = time::system_time_ns();
            if deadline_ns != 0 && now >= deadline_ns {
                return Ok(false);
            }
            let until = now.saturating_add(POLL_SLICE_NS);
            let until = if deadline_ns == 0 {
                until
            } else {
                until.min(deadline_ns)
            };
            sched::poll(&[self.port], until)?;
        }
    }
}

impl fmt::Write for PvConsole {
    /// Writes all of `s`, waiting for room (no deadline).
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_all(s.as_bytes(), 0).map_err(|_| fmt::Error)
    }
}
