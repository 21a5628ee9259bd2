//! A polled 16550 UART driver (SPEC.md §8.9.8): output (and input) through the
//! legacy serial port, with no PV interface at all. Every domain has one at `0x3F8`
//! ([`hv_abi::device::UART_BASE`], device table entry 1); a kernel uses it for its
//! earliest messages, before (or instead of) the hv console.
//!
//! Every register access is a VM exit handled by the hypervisor's 16550 model: about
//! two per byte (the line-status check and the transmit register).

use core::fmt;

use crate::arch::{inb, outb};

pub use hv_abi::device::UART_BASE;

/// Transmit holding register (write) / receive buffer (read), DLAB = 0.
const THR: u16 = 0;
/// Interrupt enable (DLAB = 0) / divisor latch high (DLAB = 1).
const IER: u16 = 1;
/// FIFO control (write).
const FCR: u16 = 2;
/// Line control.
const LCR: u16 = 3;
/// Modem control.
const MCR: u16 = 4;
/// Line status.
const LSR: u16 = 5;

/// LSR: a received byte is waiting.
const LSR_DATA_READY: u8 = 1 << 0;
/// LSR: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;

/// How many line-status reads [`Uart::write_byte`] waits for room before sending
/// anyway (a model that never reports room must not hang the kernel).
const TX_SPINS: u32 = 1000;

/// A 16550 UART at a base I/O port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    base: u16,
}

impl Uart {
    /// The UART every hv domain has at [`UART_BASE`] (COM1). On hv the port range is
    /// always this device; elsewhere, writing to it drives whatever is there.
    pub const fn com1() -> Uart {
        Uart { base: UART_BASE }
    }

    /// A UART at I/O port `base` (8 ports).
    ///
    /// # Safety
    /// Ports `base..base + 8` must be a 16550-compatible UART (on hv, an access to an
    /// unknown port crashes the domain).
    pub const unsafe fn new(base: u16) -> Uart {
        Uart { base }
    }

    /// The base port.
    pub const fn base(&self) -> u16 {
        self.base
    }

    fn out(&self, reg: u16, v: u8) {
        // SAFETY: the port is a register of the UART (constructor contract); a UART
        // register write affects the device only.
        unsafe { outb(self.base + reg, v) }
    }

    fn inp(&self, reg: u16) -> u8 {
        // SAFETY: as in `out`.
        unsafe { inb(self.base + reg) }
    }

    /// Programs 115200 baud 8N1, FIFOs on, interrupts off (polled use).
    pub fn init(&self) {
        self.out(IER, 0x00);
        self.out(LCR, 0x80); // DLAB: divisor latch
        self.out(THR, 0x01); // divisor 1 = 115200 baud
        self.out(IER, 0x00);
        self.out(LCR, 0x03); // 8 bits, no parity, 1 stop bit
        self.out(FCR, 0xC7); // FIFOs on and cleared, 14-byte threshold
        self.out(MCR, 0x0B); // DTR, RTS, OUT2
    }

    /// Sends one byte, waiting (a bounded number of status reads) for room.
    pub fn write_byte(&self, b: u8) {
        for _ in 0..TX_SPINS {
            if self.inp(LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        self.out(THR, b);
    }

    /// Sends `bytes` as they are (no newline translation).
    pub fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// A received byte, if one is waiting.
    pub fn read_byte(&self) -> Option<u8> {
        (self.inp(LSR) & LSR_DATA_READY != 0).then(|| self.inp(THR))
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
