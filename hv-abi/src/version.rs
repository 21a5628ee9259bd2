//! ABI version and feature bits.

/// Major version of the ABI. A change that breaks existing guests bumps it.
pub const ABI_MAJOR: u16 = 1;

/// Minor version of the ABI. Backwards-compatible additions bump it.
pub const ABI_MINOR: u16 = 3;

/// The version as returned by `version(VERSION_GET)`: `major << 16 | minor`.
pub const fn packed_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// Feature bitmap: which optional parts of ABI v1 a hypervisor implements.
///
/// A guest declares the features it needs in its ELF note ([`crate::note`]); the
/// hypervisor refuses to start a guest that needs a feature it lacks. Bit 63 is never
/// set, so the bitmap can be returned in RAX as a non-negative value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Features(pub u64);

impl Features {
    /// `console_io(CONSOLEIO_WRITE)`: the early console hypercall.
    pub const CONSOLE_IO: Features = Features(1 << 0);
    /// `sched_op(SCHEDOP_YIELD | SCHEDOP_SHUTDOWN)`.
    pub const SCHED: Features = Features(1 << 1);
    /// `vcpu_op(VCPUOP_INITIALISE | VCPUOP_UP | VCPUOP_IS_UP)`: secondary vCPUs.
    pub const VCPU_OP: Features = Features(1 << 2);
    /// PV MMU: page-table pool, `mmu_update`, `mmuext_op`, `update_va_mapping`,
    /// `multicall`, trapped page-table writes.
    pub const PV_MMU: Features = Features(1 << 3);
    /// Event channels (2-level), upcalls, `sched_op(SCHEDOP_BLOCK | SCHEDOP_POLL)`.
    pub const EVTCHN: Features = Features(1 << 4);
    /// Grant tables v1.
    pub const GNTTAB: Features = Features(1 << 5);
    /// `set_timer_op` and system time in `shared_info`.
    pub const TIMER: Features = Features(1 << 6);
    /// Paravirtual console device over a shared ring.
    pub const PV_CONSOLE: Features = Features(1 << 7);
    /// Paravirtual block device over a shared ring.
    pub const PV_BLOCK: Features = Features(1 << 8);
    /// The device table (`start_info.devices_gpa`) and `dev_op` (ABI 1.2).
    pub const DEV_OP: Features = Features(1 << 9);

    /// No features.
    pub const NONE: Features = Features(0);

    /// Every feature bit defined by this version of the crate, with its name.
    pub const NAMED: [(Features, &'static str); 10] = [
        (Self::CONSOLE_IO, "console_io"),
        (Self::SCHED, "sched"),
        (Self::VCPU_OP, "vcpu_op"),
        (Self::PV_MMU, "pv_mmu"),
        (Self::EVTCHN, "evtchn"),
        (Self::GNTTAB, "gnttab"),
        (Self::TIMER, "timer"),
        (Self::PV_CONSOLE, "pv_console"),
        (Self::PV_BLOCK, "pv_block"),
        (Self::DEV_OP, "dev_op"),
    ];

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits set in `self` but not in `other`.
    pub const fn missing_from(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }

    /// The union of two feature sets.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// True if no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl core::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        self.union(rhs)
    }
}

impl core::fmt::Display for Features {
    /// Formats as `0x<hex> (name|name|...)`; unknown bits are shown as `bit<N>`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x} (", self.0)?;
        let mut first = true;
        for bit in 0..64 {
            let b = Features(1 << bit);
            if !self.contains(b) {
                continue;
            }
            if !first {
                f.write_str("|")?;
            }
            first = false;
            match Self::NAMED.iter().find(|(v, _)| *v == b) {
                Some((_, name)) => f.write_str(name)?,
                None => write!(f, "bit{bit}")?,
            }
        }
        if first {
            f.write_str("none")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed() {
        assert_eq!(packed_version(1, 0), 0x1_0000);
        assert_eq!(packed_version(2, 3), 0x2_0003);
    }

    #[test]
    fn feature_bits_are_distinct_and_below_63() {
        let mut all = 0u64;
        for (f, _) in Features::NAMED {
            assert_eq!(f.0.count_ones(), 1);
            assert_eq!(all & f.0, 0);
            assert!(f.0 < 1 << 63);
            all |= f.0;
        }
    }
}
