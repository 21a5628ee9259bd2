//! Scenario `shutdown-codes`: `SCHEDOP_SHUTDOWN` with a code above
//! `SHUTDOWN_CODE_MAX` must be refused with -EINVAL for every reason (SPEC §8.3), both
//! as a direct call and inside a multicall, and the domain must keep running.
//!
//! Prints `direct_<reason>_<code>=` for each refused direct call, `mc_<reason>_<code>=`
//! for each multicall entry (and `multicall_ok=1` for the batch), then `alive=1`, and powers
//! off with code 0. If hv accepts one of the calls the domain ends there (reboot or
//! crash) and the lines after it are missing.

use guest_sdk::hv_abi::mmu::MulticallEntry;
use guest_sdk::hv_abi::sched::{
    SCHEDOP_SHUTDOWN, SHUTDOWN_CODE_MAX, SHUTDOWN_CRASH, SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT,
};
use guest_sdk::hv_abi::Op;
use guest_sdk::{poweroff, println};

use crate::no_pointer_call;

/// (name, reason) of the reasons tried.
const REASONS: [(&str, u64); 3] = [
    ("reboot", SHUTDOWN_REBOOT),
    ("crash", SHUTDOWN_CRASH),
    ("poweroff", SHUTDOWN_POWEROFF),
];
/// (name, code) of the codes tried: each above `SHUTDOWN_CODE_MAX`.
const CODES: [(&str, u64); 2] = [("100", SHUTDOWN_CODE_MAX + 1), ("max", u64::MAX)];

pub fn run() -> ! {
    for (rname, reason) in REASONS {
        for (cname, code) in CODES {
            let r = no_pointer_call(Op::SchedOp, SCHEDOP_SHUTDOWN, reason, code);
            println!("direct_{rname}_{cname}={r}");
        }
    }
    let entry = |reason, code| MulticallEntry {
        op: Op::SchedOp as u64,
        result: 0,
        args: [SCHEDOP_SHUTDOWN, reason, code, 0, 0, 0],
    };
    let mut entries = [entry(0, 0); 6];
    let mut i = 0;
    for (_, reason) in REASONS {
        for (_, code) in CODES {
            entries[i] = entry(reason, code);
            i += 1;
        }
    }
    // SAFETY: every entry is a shutdown that must be refused (no pointer arguments); if
    // hv accepted one, the domain would simply end.
    let batch = unsafe { guest_sdk::mmu::multicall(&mut entries) };
    println!("multicall_ok={}", u8::from(batch.is_ok()));
    let mut k = 0;
    for (rname, _) in REASONS {
        for (cname, _) in CODES {
            println!("mc_{rname}_{cname}={}", entries[k].result);
            k += 1;
        }
    }
    println!("alive=1");
    poweroff(0)
}
