//! A buffered console over `console_io(CONSOLEIO_WRITE)` (or, once selected, the PV
//! console's ring or the UART: [`Sink`]), and [`print!`](crate::print) /
//! [`println!`](crate::println).
//!
//! Every hypercall is a VM exit, so [`Console`] gathers output in a
//! [`CONSOLE_BUFFER`]-byte buffer and writes it when a line is complete (`'\n'`), when
//! the buffer is full, on [`Console::flush`] and when dropped: a line costs one
//! hypercall. The macros use a fresh `Console` per invocation, so output from several
//! vCPUs interleaves by whole lines (of at most [`CONSOLE_BUFFER`] bytes).
//!
//! Console errors are ignored: there is nowhere else to report them.

use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Size of a [`Console`]'s buffer in bytes.
pub const CONSOLE_BUFFER: usize = 256;

/// A line buffer that hands complete lines (or full buffers) to a sink.
struct LineBuffer<const N: usize> {
    buf: [MaybeUninit<u8>; N],
    len: usize,
}

impl<const N: usize> LineBuffer<N> {
    /// An empty buffer (left uninitialised: nothing to zero).
    #[inline(always)]
    const fn new() -> Self {
        LineBuffer {
            buf: [MaybeUninit::uninit(); N],
            len: 0,
        }
    }

    /// The bytes buffered so far.
    #[inline(always)]
    fn filled(&self) -> &[u8] {
        // SAFETY: the first `len` bytes (`len <= N`) have been written by `push`.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }

    /// Appends `bytes`, handing the buffer to `sink` after each `'\n'` and whenever it
    /// is full.
    fn push(&mut self, mut bytes: &[u8], sink: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = N - self.len;
            let take = room.min(bytes.len());
            let (n, line_end) = match bytes[..take].iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (take, false),
            };
            // SAFETY: `n <= take <= room`, so the destination range
            // `buf[len..len + n]` is in bounds, and `bytes` holds at least `n` bytes;
            // the two do not overlap (`bytes` is a shared borrow, `buf` is ours).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.buf.as_mut_ptr().add(self.len).cast::<u8>(),
                    n,
                );
            }
            self.len += n;
            bytes = &bytes[n..];
            if line_end || self.len == N {
                self.drain(sink);
            }
        }
    }

    /// Hands whatever is buffered to `sink` and empties the buffer.
    #[inline]
    fn drain(&mut self, sink: &mut impl FnMut(&[u8])) {
        if self.len != 0 {
            sink(self.filled());
            self.len = 0;
        }
    }
}

/// Where [`Console`] output goes: the console hypercall (the default), the PV
/// console's ring ([`use_pv_console`]) or the UART ([`use_uart`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// `console_io(CONSOLEIO_WRITE)`: one hypercall per line.
    Hypercall,
    /// The PV console's output ring ([`crate::pvconsole`]): one notification per line.
    PvConsole,
    /// The 16550 UART ([`crate::uart`]): exits per byte, no PV interface needed.
    Uart,
}

const SINK_HYPERCALL: u8 = 0;
const SINK_PV: u8 = 1;
const SINK_UART: u8 = 2;

static SINK: AtomicU8 = AtomicU8::new(SINK_HYPERCALL);
static PV_PAGE: AtomicU64 = AtomicU64::new(0);
static PV_PORT: AtomicU32 = AtomicU32::new(0);
static UART_PORT: AtomicU16 = AtomicU16::new(crate::uart::UART_BASE);
/// Serialises writers of the PV ring and the UART (the ring has one producer index).
static SINK_LOCK: AtomicBool = AtomicBool::new(false);
/// How long a line waits for room in the PV console ring before the rest of it goes
/// through the console hypercall.
const PV_LINE_TIMEOUT_NS: u64 = 1_000_000_000;
/// Lock attempts before a writer gives up on the lock (an interrupted writer on the
/// same vCPU would otherwise deadlock) and takes a fallback.
const LOCK_SPINS: u32 = 100_000;

/// Sends [`print!`](crate::print) and friends to the PV console `c` from now on.
/// Masks its port: the console's events (room freed, input) then raise no upcall; a
/// writer waiting for room polls for them.
pub fn use_pv_console(c: crate::pvconsole::PvConsole) {
    let _ = crate::evtchn::mask(c.port());
    PV_PAGE.store(c.page(), Ordering::Release);
    PV_PORT.store(c.port(), Ordering::Release);
    SINK.store(SINK_PV, Ordering::Release);
}

/// Sends [`print!`](crate::print) and friends to the UART `u` from now on.
pub fn use_uart(u: crate::uart::Uart) {
    UART_PORT.store(u.base(), Ordering::Release);
    SINK.store(SINK_UART, Ordering::Release);
}

/// Sends [`print!`](crate::print) and friends to the console hypercall again.
pub fn use_hypercall() {
    SINK.store(SINK_HYPERCALL, Ordering::Release);
}

/// Where output goes now.
pub fn sink() -> Sink {
    match SINK.load(Ordering::Acquire) {
        SINK_PV => Sink::PvConsole,
        SINK_UART => Sink::Uart,
        _ => Sink::Hypercall,
    }
}

/// Takes [`SINK_LOCK`], trying a bounded number of times.
fn lock_sink() -> bool {
    for _ in 0..LOCK_SPINS {
        if SINK_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Writes to the selected sink.
fn hv_sink(bytes: &[u8]) {
    match SINK.load(Ordering::Acquire) {
        SINK_PV => {
            if !lock_sink() {
                let _ = crate::ops::console_write(bytes);
                return;
            }
            // SAFETY: the page and port came from a `PvConsole` (`use_pv_console`).
            let c = unsafe {
                crate::pvconsole::PvConsole::new(
                    PV_PAGE.load(Ordering::Acquire),
                    PV_PORT.load(Ordering::Acquire),
                )
            };
            let deadline = crate::time::system_time_ns().saturating_add(PV_LINE_TIMEOUT_NS);
            let r = c.write_all(bytes, deadline);
            SINK_LOCK.store(false, Ordering::Release);
            if let Err(crate::pvconsole::PvConsoleError::TimedOut { written }) = r {
                let _ = crate::ops::console_write(bytes.get(written..).unwrap_or(&[]));
            }
        }
        SINK_UART => {
            let locked = lock_sink();
            // SAFETY: the port came from a `Uart` (`use_uart`).
            let u = unsafe { crate::uart::Uart::new(UART_PORT.load(Ordering::Acquire)) };
            u.write_bytes(bytes);
            if locked {
                SINK_LOCK.store(false, Ordering::Release);
            }
        }
        _ => {
            let _ = crate::ops::console_write(bytes);
        }
    }
}

/// A buffered writer to the domain's console (see the [module docs](self)).
pub struct Console {
    buf: LineBuffer<CONSOLE_BUFFER>,
}

impl Console {
    /// An empty console writer. Cheap: the buffer is not initialised.
    #[inline(always)]
    pub const fn new() -> Self {
        Console {
            buf: LineBuffer::new(),
        }
    }

    /// Buffers `bytes` (which need not be UTF-8), writing out complete lines.
    #[inline]
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.buf.push(bytes, &mut hv_sink);
    }

    /// Writes out whatever is buffered.
    #[inline]
    pub fn flush(&mut self) {
        self.buf.drain(&mut hv_sink);
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

impl fmt::Write for Console {
    #[inline]
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats `args` to a fresh [`Console`] and flushes it ([`print!`](crate::print)).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut c = Console::new();
    let _ = fmt::Write::write_fmt(&mut c, args);
}

/// Formats `args` and a `'\n'` to a fresh [`Console`] ([`println!`](crate::println)).
pub fn println_fmt(args: fmt::Arguments<'_>) {
    let mut c = Console::new();
    let _ = fmt::Write::write_fmt(&mut c, args);
    c.write_bytes(b"\n");
}

/// Prints to the hypervisor console, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::print_fmt(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the hypervisor console (one hypercall for a line of up to
/// [`CONSOLE_BUFFER`](crate::console::CONSOLE_BUFFER) bytes), like `std::println!`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::console_write_line(b"")
    };
    ($($arg:tt)*) => {
        $crate::console::println_fmt(::core::format_args!($($arg)*))
    };
}

/// Writes `bytes` followed by `'\n'` to the console.
pub fn console_write_line(bytes: &[u8]) {
    let mut c = Console::new();
    c.write_bytes(bytes);
    c.write_bytes(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut lb = LineBuffer::<8>::new();
        let mut sink = |b: &[u8]| out.push(b.to_vec());
        for c in chunks {
            lb.push(c, &mut sink);
        }
        lb.drain(&mut sink);
        out
    }

    #[test]
    fn one_write_per_line() {
        assert_eq!(run(&[b"ab", b"c\nde", b"\n"]), [&b"abc\n"[..], b"de\n"]);
        assert_eq!(run(&[b"a\nb\nc"]), [&b"a\n"[..], b"b\n", b"c"]);
    }

    #[test]
    fn full_buffer_flushes() {
        assert_eq!(
            run(&[b"0123456789abcdefXY\n"]),
            [&b"01234567"[..], b"89abcdef", b"XY\n"]
        );
        assert_eq!(run(&[b"01234567"]), [&b"01234567"[..]]);
        assert_eq!(run(&[b"0123456\n"]), [&b"0123456\n"[..]]);
    }

    #[test]
    fn empty_writes_nothing() {
        assert!(run(&[]).is_empty());
        assert!(run(&[b""]).is_empty());
        assert_eq!(run(&[b"\n"]), [&b"\n"[..]]);
    }
}
