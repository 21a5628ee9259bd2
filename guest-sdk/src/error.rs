//! Hypercall errors.

use core::fmt;

use hv_abi::Errno;

/// A failed hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The hypervisor returned `-errno` for an error code ABI v1 defines.
    Errno(Errno),
    /// The hypervisor returned a negative value ABI v1 does not define (kept verbatim).
    Unknown(i64),
}

impl Error {
    /// The raw (negative) value the hypercall returned.
    pub const fn to_ret(self) -> i64 {
        match self {
            Error::Errno(e) => e.to_ret(),
            Error::Unknown(v) => v,
        }
    }
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Error::Errno(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Errno(e) => fmt::Display::fmt(e, f),
            Error::Unknown(v) => write!(f, "unknown error ({v})"),
        }
    }
}

/// Decodes a hypercall's return value: `Ok(value)` if it is non-negative, the error
/// otherwise.
#[inline]
pub fn check(ret: i64) -> Result<u64, Error> {
    if ret >= 0 {
        Ok(ret as u64)
    } else {
        Err(decode_error(ret))
    }
}

/// The error for a negative return value (kept out of line: it is the cold path).
#[cold]
#[inline(never)]
fn decode_error(ret: i64) -> Error {
    match Errno::from_ret(ret) {
        Some(e) => Error::Errno(e),
        None => Error::Unknown(ret),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_decodes() {
        assert_eq!(check(0), Ok(0));
        assert_eq!(check(0x1_0000), Ok(0x1_0000));
        assert_eq!(check(i64::MAX), Ok(i64::MAX as u64));
        assert_eq!(check(-14), Err(Error::Errno(Errno::EFAULT)));
        assert_eq!(check(-38), Err(Error::Errno(Errno::ENOSYS)));
        assert_eq!(check(-4), Err(Error::Unknown(-4)));
        assert_eq!(check(i64::MIN), Err(Error::Unknown(i64::MIN)));
        assert_eq!(Error::Errno(Errno::EINVAL).to_ret(), -22);
        assert_eq!(Error::Unknown(-4).to_ret(), -4);
    }

    #[test]
    fn display() {
        use std::string::ToString;
        assert_eq!(Error::Errno(Errno::EPERM).to_string(), "EPERM (-1)");
        assert_eq!(Error::Unknown(-4).to_string(), "unknown error (-4)");
    }
}
