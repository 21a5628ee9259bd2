//! Devices: the device table, the `dev_op` handshake, and the back-ends behind it (PV
//! console and block over shared rings, the emulated block device, the UART,
//! passthrough regions).

pub mod disk;
pub mod emublk;
pub mod passthrough;
pub mod uart;
