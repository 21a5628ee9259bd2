//! Per-domain exit statistics: exits by reason, hypercalls by operation with time.
//!
//! Each vCPU counts into its own [`ExitStats`] without locks; the domain merges them
//! when it ends.

use std::fmt;

use hv_abi::Op;
use serde::Serialize;

/// Kinds of vCPU exit that are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A hypercall (port I/O on the hypercall port).
    Hypercall = 0,
    /// Port I/O on another port.
    PortIo,
    /// MMIO access.
    Mmio,
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// Emulation failure (KVM_EXIT_INTERNAL_ERROR).
    InternalError,
    /// VM entry failure.
    FailEntry,
    /// HLT.
    Hlt,
    /// KVM_RUN interrupted by a signal (a kick).
    Interrupted,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// Number of kinds.
    pub const COUNT: usize = 9;
    /// All kinds, in index order.
    pub const ALL: [ExitKind; Self::COUNT] = [
        ExitKind::Hypercall,
        ExitKind::PortIo,
        ExitKind::Mmio,
        ExitKind::Shutdown,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Hlt,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Hypercall => "hypercall",
            ExitKind::PortIo => "port_io",
            ExitKind::Mmio => "mmio",
            ExitKind::Shutdown => "triple_fault",
            ExitKind::InternalError => "internal_error",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::Hlt => "hlt",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// Count and time of one hypercall operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpStat {
    /// Calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Total time in the hypervisor, nanoseconds.
    pub total_ns: u64,
}

/// Number of hypercall buckets: one per op number up to 64 (`dev_op`); bucket 0 is
/// "unknown".
pub const OP_BUCKETS: usize = 65;

/// Exit statistics of one vCPU or a whole domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStats {
    /// Exits by [`ExitKind`] index.
    pub exits: [u64; ExitKind::COUNT],
    /// Hypercalls by op number (bucket 0: unknown op numbers).
    pub ops: [OpStat; OP_BUCKETS],
}

impl Default for ExitStats {
    fn default() -> Self {
        ExitStats {
            exits: [0; ExitKind::COUNT],
            ops: [OpStat::default(); OP_BUCKETS],
        }
    }
}

impl ExitStats {
    /// Counts one exit.
    #[inline]
    pub fn exit(&mut self, kind: ExitKind) {
        self.exits[kind as usize] += 1;
    }

    /// Counts one hypercall.
    #[inline]
    pub fn hypercall(&mut self, op: u64, ok: bool, ns: u64) {
        let b = if Op::from_u64(op).is_some() && op < OP_BUCKETS as u64 {
            crate::conv::usize_from(op)
        } else {
            0
        };
        let s = &mut self.ops[b];
        s.count += 1;
        s.errors += u64::from(!ok);
        s.total_ns += ns;
    }

    /// Adds another set of statistics.
    pub fn merge(&mut self, other: &ExitStats) {
        for (a, b) in self.exits.iter_mut().zip(other.exits.iter()) {
            *a += b;
        }
        for (a, b) in self.ops.iter_mut().zip(other.ops.iter()) {
            a.count += b.count;
            a.errors += b.errors;
            a.total_ns += b.total_ns;
        }
    }

    /// Exits of one kind.
    pub fn exits_of(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize]
    }

    /// Statistics of one op.
    pub fn op(&self, op: Op) -> OpStat {
        self.ops[op as usize]
    }

    /// Calls with an undefined op number.
    pub fn unknown_ops(&self) -> OpStat {
        self.ops[0]
    }
}

impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exits by reason:")?;
        for k in ExitKind::ALL {
            let n = self.exits_of(k);
            if n > 0 {
                writeln!(f, "  {:<16} {:>10}", k.name(), n)?;
            }
        }
        writeln!(
            f,
            "hypercalls by op:\n  {:<18} {:>10} {:>8} {:>12} {:>10}",
            "op", "calls", "errors", "total us", "avg ns"
        )?;
        for (i, s) in self.ops.iter().enumerate() {
            if s.count == 0 {
                continue;
            }
            let name = Op::from_u64(i as u64).map_or("unknown", Op::name);
            writeln!(
                f,
                "  {:<18} {:>10} {:>8} {:>12.1} {:>10}",
                name,
                s.count,
                s.errors,
                s.total_ns as f64 / 1000.0,
                s.total_ns / s.count
            )?;
        }
        Ok(())
    }
}
