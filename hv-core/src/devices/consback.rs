//! The PV console back-end (SPEC.md §8.9.4): device 0 of every domain, its page at
//! `CONSOLE_PAGE_GPA` (Xen's `xencons_interface`), its port bound to hv before entry.
//!
//! Output: a guest send on the console port runs [`ConsoleBack`]'s drain right away on
//! the sending vCPU's thread (as the early console hypercall does): the bytes between
//! `out_cons` and `out_prod` go to the domain's console, `out_cons` advances and the
//! guest gets an event. hv keeps its own `out_cons` (the guest cannot move it back); an
//! `out_prod` more than 2048 bytes ahead is a broken ring: the pending output is dropped
//! and `out_cons = out_prod` (logged). Each send drains once, so a guest flooding the
//! ring from another vCPU cannot hold the sender in hv.
//!
//! Input (`hv run --console-input`): a thread polls the input (hv's standard input or a
//! file) and the back-end's wake-up descriptor; it copies what fits into `in`, advances
//! `in_prod` (hv's own copy, written to the page) and sends an event; when the ring is
//! full it waits for the guest's next send (after the guest consumed). End of input
//! stops the reading, not the console.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;

use hv_abi::device::{CONSOLE_IN_SIZE, CONSOLE_OUT_SIZE};
use hv_abi::layout::CONSOLE_PAGE_GPA;

use super::{ConsoleInput, DeviceError};
use crate::domain::DomainShared;
use crate::evtchn::{HostNotify, HostPort};

const OUT_OFF: usize = CONSOLE_IN_SIZE as usize;
const IN_CONS: usize = 3072;
const IN_PROD: usize = 3076;
const OUT_CONS: usize = 3080;
const OUT_PROD: usize = 3084;

/// Where input comes from.
#[derive(Debug)]
enum Input {
    Stdin,
    File(File),
}

impl Input {
    fn fd(&self) -> RawFd {
        match self {
            Input::Stdin => libc::STDIN_FILENO,
            Input::File(f) => f.as_raw_fd(),
        }
    }
}

/// State shared by the vCPUs' drains, the input thread and the port's notify.
#[derive(Debug)]
struct Shared {
    /// Host address of the console page (in the domain's RAM mapping).
    page: OnceLock<usize>,
    /// The console's port.
    port: OnceLock<HostPort>,
    /// hv's `out_cons` (serialises drains).
    out_cons: Mutex<u32>,
    /// Wakes the input thread (an eventfd; only with input).
    wake: Option<OwnedFd>,
    /// Set when the domain dies.
    stop: AtomicBool,
    /// The domain (for the console sink and events).
    dom: OnceLock<Weak<DomainShared>>,
}

impl Shared {
    fn word(&self, off: usize) -> Option<&AtomicU32> {
        let base = *self.page.get()?;
        // The guest writes these words concurrently, so they are only accessed atomically.
        // SAFETY: `base` is the console page in the domain's RAM mapping, which outlives
        // this back-end (part of the domain); `off` is one of the four aligned index words.
        Some(unsafe { &*((base + off) as *const AtomicU32) })
    }

    fn byte_ptr(&self, off: usize) -> Option<*mut u8> {
        debug_assert!(off < 4096);
        self.page.get().map(|b| (b + off) as *mut u8)
    }

    fn kick(&self) {
        if let Some(fd) = &self.wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to this back-end's eventfd.
            unsafe {
                libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
    }

    /// Writes what the guest produced to the domain's console (one pass).
    fn drain(&self, dom: &DomainShared) {
        let (Some(prod_w), Some(cons_w), Some(out)) = (
            self.word(OUT_PROD),
            self.word(OUT_CONS),
            self.byte_ptr(OUT_OFF),
        ) else {
            return;
        };
        let Ok(mut cons) = self.out_cons.lock() else {
            return;
        };
        let prod = prod_w.load(Ordering::Acquire);
        let n = prod.wrapping_sub(*cons);
        if n == 0 {
            return;
        }
        if n > CONSOLE_OUT_SIZE {
            tracing::warn!(
                domain = %dom.name,
                out_prod = prod,
                out_cons = *cons,
                "PV console: out_prod is more than 2048 bytes ahead; pending output dropped"
            );
        } else {
            fence(Ordering::Acquire);
            let bytes: Vec<u8> = (0..n)
                .map(|i| {
                    let at = (cons.wrapping_add(i) % CONSOLE_OUT_SIZE) as usize;
                    // SAFETY: `at` < 2048: a byte of the page's `out` array.
                    unsafe { std::ptr::read_volatile(out.add(at)) }
                })
                .collect();
            dom.console.write(&bytes);
        }
        *cons = prod;
        cons_w.store(prod, Ordering::Release);
        drop(cons);
        if let Some(p) = self.port.get() {
            dom.evtchn.notify_guest(*p);
        }
    }
}

/// A domain's PV console back-end.
#[derive(Debug)]
pub struct ConsoleBack {
    shared: Arc<Shared>,
    input: Mutex<Option<Input>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn eventfd() -> Result<OwnedFd, DeviceError> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(DeviceError::Backend(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ConsoleBack {
    /// A console back-end reading `input` (opened now).
    pub fn new(input: &ConsoleInput) -> Result<ConsoleBack, DeviceError> {
        let input = match input {
            ConsoleInput::None => None,
            ConsoleInput::Stdin => Some(Input::Stdin),
            ConsoleInput::File(path) => Some(Input::File(File::open(path).map_err(|source| {
                DeviceError::ConsoleInput {
                    path: path.clone(),
                    source,
                }
            })?)),
        };
        let wake = match input {
            Some(_) => Some(eventfd()?),
            None => None,
        };
        Ok(ConsoleBack {
            shared: Arc::new(Shared {
                page: OnceLock::new(),
                port: OnceLock::new(),
                out_cons: Mutex::new(0),
                wake,
                stop: AtomicBool::new(false),
                dom: OnceLock::new(),
            }),
            input: Mutex::new(input),
            thread: Mutex::new(None),
        })
    }

    /// Binds the console's port (returned) and finds its page.
    pub(super) fn attach(&self, dom: &Arc<DomainShared>) -> Result<u32, DeviceError> {
        let page = dom
            .mem
            .host_address(CONSOLE_PAGE_GPA)
            .map_err(|e| DeviceError::Memory(e.to_string()))?;
        let _ = self.shared.page.set(crate::conv::usize_from(page));
        let _ = self.shared.dom.set(Arc::downgrade(dom));
        let weak = Arc::downgrade(&self.shared);
        let notify = HostNotify(Arc::new(move || {
            let Some(sh) = weak.upgrade() else { return };
            if let Some(dom) = sh.dom.get().and_then(Weak::upgrade) {
                sh.drain(&dom);
            }
            sh.kick();
        }));
        let port = dom.evtchn.alloc_host(notify).map_err(DeviceError::Evtchn)?;
        let _ = self.shared.port.set(port);
        Ok(port.port)
    }

    /// Starts the input thread, if the console has input.
    pub(super) fn start(&self, dom: Weak<DomainShared>) -> Result<(), DeviceError> {
        let Some(input) = self.input.lock().ok().and_then(|mut i| i.take()) else {
            return Ok(());
        };
        let sh = self.shared.clone();
        let h = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || input_loop(&sh, &dom, &input))
            .map_err(DeviceError::Backend)?;
        if let Ok(mut t) = self.thread.lock() {
            *t = Some(h);
        }
        Ok(())
    }

    /// Stops the input thread and writes out what the guest left in the ring.
    pub(super) fn stop(&self, dom: &DomainShared) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.kick();
        let h = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = h {
            let _ = h.join();
        }
        self.shared.drain(dom);
    }
}

/// Bytes the input ring has room for (0 if the guest's `in_cons` is nonsense).
fn in_room(sh: &Shared, prod: u32) -> u32 {
    let Some(cons) = sh.word(IN_CONS) else {
        return 0;
    };
    let used = prod.wrapping_sub(cons.load(Ordering::Acquire));
    CONSOLE_IN_SIZE.saturating_sub(used)
}

fn input_loop(sh: &Shared, dom: &Weak<DomainShared>, input: &Input) {
    let Some(wake) = sh.wake.as_ref().map(|w| w.as_raw_fd()) else {
        return;
    };
    let (Some(prod_w), Some(ring)) = (sh.word(IN_PROD), sh.byte_ptr(0)) else {
        return;
    };
    let mut prod = 0u32;
    let mut eof = false;
    let mut buf = [0u8; CONSOLE_IN_SIZE as usize];
    loop {
        let room = in_room(sh, prod);
        let want_input = !eof && room > 0;
        let mut fds = [
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if want_input { input.fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two initialised pollfds; no timeout.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "PV console input: poll failed; input stops");
            return;
        }
        if fds[0].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from this back-end's eventfd.
            unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
        }
        if !want_input || fds[1].revents == 0 {
            continue;
        }
        let room = in_room(sh, prod) as usize;
        // SAFETY: reads at most `room` <= 1024 bytes into `buf`.
        let n = unsafe { libc::read(input.fd(), buf.as_mut_ptr().cast(), room.min(buf.len())) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            tracing::warn!(error = %e, "PV console input: read failed; input stops");
            eof = true;
            continue;
        }
        if n == 0 {
            eof = true;
            continue;
        }
        // n > 0 here (checked above), at most `room` <= 1024.
        for b in &buf[..n.unsigned_abs()] {
            let at = (prod % CONSOLE_IN_SIZE) as usize;
            // SAFETY: `at` < 1024: a byte of the page's `in` array.
            unsafe { std::ptr::write_volatile(ring.add(at), *b) };
            prod = prod.wrapping_add(1);
        }
        fence(Ordering::Release);
        prod_w.store(prod, Ordering::Release);
        let Some(d) = dom.upgrade() else { return };
        if let Some(p) = sh.port.get() {
            d.evtchn.notify_guest(*p);
        }
    }
}
