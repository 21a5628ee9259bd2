//! Error codes returned by hypercalls.
//!
//! A hypercall returns a non-negative value on success and `-errno` on failure, in RAX.
//! The values are Linux's x86 errno numbers.

/// A hypercall error code. The hypercall returns its negation in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum Errno {
    /// Operation not permitted (for example a hypercall from guest CPL 3).
    EPERM = 1,
    /// No such entry (an unknown port, grant reference or device).
    ENOENT = 2,
    /// No such domain.
    ESRCH = 3,
    /// I/O error.
    EIO = 5,
    /// Argument list or request too long.
    E2BIG = 7,
    /// Bad handle (closed or foreign event-channel port).
    EBADF = 9,
    /// Try again.
    EAGAIN = 11,
    /// Out of memory or table space.
    ENOMEM = 12,
    /// Permission denied by the target's rules (grant permissions, page-table rules).
    EACCES = 13,
    /// A guest address is outside the guest's memory or misaligned.
    EFAULT = 14,
    /// Resource busy (for example revoking a mapped grant).
    EBUSY = 16,
    /// Already exists or already done (for example pinning a pinned table).
    EEXIST = 17,
    /// No such device.
    ENODEV = 19,
    /// Invalid argument (bad sub-command value, non-zero reserved field).
    EINVAL = 22,
    /// No space left (port or grant table full).
    ENOSPC = 28,
    /// Value out of range.
    ERANGE = 34,
    /// Hypercall or sub-command not implemented.
    ENOSYS = 38,
    /// Timed out.
    ETIMEDOUT = 110,
}

impl Errno {
    /// Every defined code.
    pub const ALL: [Errno; 18] = [
        Errno::EPERM,
        Errno::ENOENT,
        Errno::ESRCH,
        Errno::EIO,
        Errno::E2BIG,
        Errno::EBADF,
        Errno::EAGAIN,
        Errno::ENOMEM,
        Errno::EACCES,
        Errno::EFAULT,
        Errno::EBUSY,
        Errno::EEXIST,
        Errno::ENODEV,
        Errno::EINVAL,
        Errno::ENOSPC,
        Errno::ERANGE,
        Errno::ENOSYS,
        Errno::ETIMEDOUT,
    ];

    /// The value placed in RAX for this error: `-errno`.
    pub const fn to_ret(self) -> i64 {
        -(self as i64)
    }

    /// Decodes a negative hypercall return value. Returns `None` for non-negative
    /// values and for unknown codes.
    pub fn from_ret(ret: i64) -> Option<Errno> {
        if ret >= 0 {
            return None;
        }
        Self::ALL.iter().copied().find(|e| e.to_ret() == ret)
    }

    /// The conventional name (`"EINVAL"`).
    pub const fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::ESRCH => "ESRCH",
            Errno::EIO => "EIO",
            Errno::E2BIG => "E2BIG",
            Errno::EBADF => "EBADF",
            Errno::EAGAIN => "EAGAIN",
            Errno::ENOMEM => "ENOMEM",
            Errno::EACCES => "EACCES",
            Errno::EFAULT => "EFAULT",
            Errno::EBUSY => "EBUSY",
            Errno::EEXIST => "EEXIST",
            Errno::ENODEV => "ENODEV",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::ERANGE => "ERANGE",
            Errno::ENOSYS => "ENOSYS",
            Errno::ETIMEDOUT => "ETIMEDOUT",
        }
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (-{})", self.name(), *self as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for e in Errno::ALL {
            assert_eq!(Errno::from_ret(e.to_ret()), Some(e));
        }
        assert_eq!(Errno::from_ret(0), None);
        assert_eq!(Errno::from_ret(-1000), None);
        assert_eq!(Errno::EFAULT.to_ret(), -14);
        assert_eq!(Errno::EPERM.to_ret(), -1);
        assert_eq!(Errno::ENOSYS.to_ret(), -38);
    }
}
