//! The rules for a domain's parameters, in one place: RAM size, vCPU count and
//! command-line length. The CLI, the configuration file checks and
//! [`crate::domain::Domain::create_in`] all call these, in this order (RAM before
//! anything that depends on it, such as whether the kernel fits).
//!
//! Owns nothing; uses only hv-abi.

use hv_abi::shared_info::MAX_VCPUS;
use hv_abi::start_info::CMDLINE_MAX;
use hv_abi::PAGE_SIZE;
use thiserror::Error;

/// Smallest RAM a domain may have: room for the boot area and a small kernel.
pub const MIN_RAM_BYTES: u64 = 2 << 20;
/// Largest RAM a domain may have.
pub const MAX_RAM_BYTES: u64 = 256 << 30;
/// Longest command line, in bytes (start_info holds it NUL-terminated).
pub const MAX_CMDLINE_BYTES: usize = CMDLINE_MAX - 1;

/// A domain parameter outside its rule.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamError {
    /// RAM size.
    #[error("{0} bytes of RAM: it must be a multiple of 4 KiB between 2 MiB and 256 GiB")]
    Memory(u64),
    /// vCPU count.
    #[error("{0} vCPUs: a domain has 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    /// Command line too long.
    #[error("command line is {0} bytes; at most {MAX_CMDLINE_BYTES} are allowed")]
    CmdlineTooLong(usize),
    /// Command line with a NUL byte.
    #[error("command line contains a NUL byte")]
    CmdlineNul,
}

/// RAM of `bytes`: a multiple of 4 KiB from [`MIN_RAM_BYTES`] to [`MAX_RAM_BYTES`].
pub fn check_memory(bytes: u64) -> Result<(), ParamError> {
    if (MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&bytes) && bytes % PAGE_SIZE == 0 {
        Ok(())
    } else {
        Err(ParamError::Memory(bytes))
    }
}

/// `n` vCPUs: 1 to `MAX_VCPUS`.
pub fn check_vcpus(n: u32) -> Result<(), ParamError> {
    if n == 0 || n as usize > MAX_VCPUS {
        Err(ParamError::Vcpus(n))
    } else {
        Ok(())
    }
}

/// A command line: at most [`MAX_CMDLINE_BYTES`] bytes, no NUL.
pub fn check_cmdline(cmdline: &str) -> Result<(), ParamError> {
    if cmdline.len() > MAX_CMDLINE_BYTES {
        return Err(ParamError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(ParamError::CmdlineNul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert_eq!(check_memory(1), Err(ParamError::Memory(1)));
        assert_eq!(check_memory(2 << 20), Ok(()));
        assert_eq!(
            check_memory((2 << 20) + 1),
            Err(ParamError::Memory((2 << 20) + 1))
        );
        assert_eq!(check_memory(256 << 30), Ok(()));
        assert!(check_memory((256 << 30) + 4096).is_err());
        assert_eq!(check_vcpus(0), Err(ParamError::Vcpus(0)));
        assert_eq!(check_vcpus(32), Ok(()));
        assert!(check_vcpus(33).is_err());
        assert_eq!(check_cmdline(&"x".repeat(1023)), Ok(()));
        assert_eq!(
            check_cmdline(&"x".repeat(1024)),
            Err(ParamError::CmdlineTooLong(1024))
        );
        assert_eq!(check_cmdline("a\0b"), Err(ParamError::CmdlineNul));
    }
}
