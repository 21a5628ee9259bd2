//! An emulated 16550A UART at COM1 ([`UART_BASE`], 8 ports), for guests without PV
//! support. The register model is vm-superio's [`Serial`]; transmitted bytes go to
//! the domain's console (the same sink as its other console output). Byte accesses
//! only: a wider access reads all ones and writes nothing. No interrupt line: guests
//! poll the line status register. No input.
//!
//! The UART has its own [`Console`] on the domain's sink: it keeps its own unfinished
//! line, so with a prefixed sink a UART line and a line of the other console paths
//! never mix mid-line.

use std::io::Write;
use std::sync::Mutex;

use hv_abi::device::UART_BASE;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::console::Console;

/// Number of ports the UART occupies.
pub const UART_PORTS: u16 = 8;

/// The UART's interrupt line: not connected (guests poll).
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Where transmitted bytes go: a console on the domain's sink.
pub struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 16550A UART at [`UART_BASE`].
pub struct Uart {
    serial: Mutex<Serial<NoInterrupt, NoEvents, ConsoleWriter>>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart").field("base", &UART_BASE).finish()
    }
}

impl Uart {
    /// A UART whose output goes to `out` (a console on the domain's sink:
    /// `Console::new(sink.clone())`).
    pub fn new(out: Console) -> Uart {
        Uart {
            serial: Mutex::new(Serial::new(NoInterrupt, ConsoleWriter(out))),
        }
    }

    /// True if `port` is one of the UART's ports.
    pub fn handles(&self, port: u16) -> bool {
        (UART_BASE..UART_BASE + UART_PORTS).contains(&port)
    }

    /// A guest `in` from `port` into `data`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let Some(off) = port.checked_sub(UART_BASE).filter(|o| *o < UART_PORTS) else {
            data.fill(0xFF);
            return;
        };
        match data {
            [b] => {
                let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                *b = s.read(off.to_le_bytes()[0]); // off < UART_PORTS (8)
            }
            _ => data.fill(0xFF),
        }
    }

    /// A guest `out` of `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(off) = port.checked_sub(UART_BASE).filter(|o| *o < UART_PORTS) else {
            return;
        };
        if let [b] = data {
            let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            // Console writes cannot fail (a lost byte is dropped by the sink).
            if let Err(e) = s.write(off.to_le_bytes()[0], *b) {
                tracing::debug!(error = %e, "UART write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleSink;

    #[test]
    fn transmits_to_the_console() {
        let (sink, buf) = ConsoleSink::capture();
        let u = Uart::new(Console::new(sink));
        assert!(u.handles(0x3F8) && u.handles(0x3FF) && !u.handles(0x400));
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        u.pio_read(0x3FD, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        for b in b"hi\x1b\n" {
            u.pio_write(0x3F8, &[*b]);
        }
        // Scratch register round trip; wide accesses are refused.
        u.pio_write(0x3FF, &[0x5A]);
        let mut s = [0u8];
        u.pio_read(0x3FF, &mut s);
        assert_eq!(s, [0x5A]);
        let mut w = [0u8; 2];
        u.pio_read(0x3F8, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        u.pio_write(0x3F8, b"xy");
        // Divisor latch: DLAB set, the data port is the divisor, not output.
        u.pio_write(0x3FB, &[0x80]);
        u.pio_write(0x3F8, &[0x01]);
        u.pio_write(0x3FB, &[0x03]);
        assert_eq!(&*buf.lock().unwrap(), b"hi\\x1b\n");
    }
}
