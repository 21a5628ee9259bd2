//! hv demo kernel: boots through the SDK, prints what the hypervisor told it, shows
//! the PV MMU (its own address space, a ring-3 task, a remap), starts its other vCPUs
//! on that address space ([`smp`]), and powers off.
//!
//! Command line (space-separated words):
//! * `exit=N`: power off with exit code `N` (0 to 99; anything else is reported and
//!   exits with code 1);
//! * `panic`: panic, to show the crash path;
//! * `role=ping peer=NAME` / `role=pong peer=NAME` (`rounds=N`): two connected
//!   domains show event channels, upcalls, grant tables and the timer
//!   ([`pingpong`]); these roles check the `evtchn`, `timer` and `gnttab` features
//!   at run time (the ELF note requires only what every role needs);
//! * `role=idle`: sleep forever (for the density benchmark);
//! * `role=devices` / `role=devices-direct`: one block workload on the PV console and
//!   PV block device, and on the emulated block device and a passthrough region
//!   ([`devices`]); `role=blkbench dev=pv|emu|pt bytes=N`: the guest half of the
//!   block benchmarks ([`blkbench`]);
//! * `console=uart`: print through the 16550 UART from the very start (the SDK
//!   switches before the ABI check); `console=pv`: print through the PV console ring.
#![no_std]
#![no_main]

mod blkbench;
mod devices;
mod pingpong;
mod pv_mmu;
mod ring3;
mod smp;

use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::{cmdline, println, Features, ABI_MAJOR, ABI_MINOR};

guest_sdk::entry!(
    main,
    Features::CONSOLE_IO | Features::SCHED | Features::PV_MMU
);
guest_sdk::panic_handler!();

/// Writes `bits` as `0x<hex> (name|name)` with the names hv-abi knows.
struct FeatureList(Features);

impl core::fmt::Display for FeatureList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x} (", self.0.bits())?;
        let mut rest = self.0.bits();
        let mut sep = "";
        for (feat, name) in Features::NAMED {
            if rest & feat.bits() != 0 {
                write!(f, "{sep}{name}")?;
                sep = "|";
                rest &= !feat.bits();
            }
        }
        if rest != 0 {
            write!(f, "{sep}{rest:#x}")?;
        } else if sep.is_empty() {
            f.write_str("none")?;
        }
        f.write_str(")")
    }
}

/// The command line, printable: the bytes if UTF-8, a placeholder otherwise.
fn printable(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("<not UTF-8>")
}

fn main(si: &'static StartInfo) -> ! {
    let cmd = si.cmdline_bytes();
    match cmdline::value(cmd, b"role") {
        Some(b"idle") => idle(),
        Some(b"ping") => pingpong::run(si, pingpong::Role::Ping),
        Some(b"pong") => pingpong::run(si, pingpong::Role::Pong),
        Some(b"devices") => devices::run_pv(si),
        Some(b"devices-direct") => devices::run_direct(si),
        Some(b"blkbench") => blkbench::run(si),
        _ => {}
    }
    if cmdline::value(cmd, b"console") == Some(b"pv") {
        match guest_sdk::pvconsole::PvConsole::from_start_info(si) {
            Some(c) => guest_sdk::console::use_pv_console(c),
            None => {
                println!("demo: console=pv: no PV console; printing with the console hypercall")
            }
        }
    }
    println!("hv demo kernel: hello from a paravirtual guest");
    println!(
        "  ABI v{}.{} (built for v{}.{}), features {}",
        si.abi_major,
        si.abi_minor,
        ABI_MAJOR,
        ABI_MINOR,
        FeatureList(Features(si.features))
    );
    println!(
        "  domain {}: {} vCPU(s), {} MiB RAM ({} pages)",
        si.domid,
        si.nr_vcpus,
        si.nr_pages >> 8,
        si.nr_pages
    );
    println!(
        "  kernel {:#x}-{:#x}, first free {:#x}",
        si.kernel_start_gpa, si.kernel_end_gpa, si.first_free_gpa
    );
    println!(
        "  page tables: root {:#x}, {} boot frames, pool of {} frames at {:#x}",
        si.pt_base_gpa, si.nr_pt_frames, si.pt_pool_frames, si.pt_pool_gpa
    );
    println!(
        "  shared_info {:#x}, command line: \"{}\"",
        si.shared_info_gpa,
        printable(cmd)
    );

    let space = match pv_mmu::show(si) {
        Ok(space) => space,
        Err(what) => panic!("demo: PV MMU part failed: {what}"),
    };
    if let Err(what) = smp::run(si, &space) {
        panic!("demo: SMP part failed: {what}");
    }

    if cmdline::has_flag(cmd, b"panic") {
        panic!("demo: panic requested on the command line");
    }
    let code = match cmdline::value(cmd, b"exit") {
        None => 0,
        Some(v) => match cmdline::parse_u64(v) {
            Some(n) if n <= 99 => n as u8,
            _ => {
                println!("demo: bad exit code \"{}\" (want 0-99)", printable(v));
                1
            }
        },
    };
    println!("demo: done, powering off with code {code}");
    guest_sdk::poweroff(code)
}

/// `role=idle`: boot and sleep in `SCHEDOP_BLOCK` forever, printing nothing (what
/// `hv bench density` boots by the hundred). Wakes only if an event arrives, and
/// sleeps again.
fn idle() -> ! {
    loop {
        // SAFETY: sched_op(SCHEDOP_BLOCK) takes no pointers.
        unsafe {
            guest_sdk::hypercall::hypercall1(
                guest_sdk::hv_abi::Op::SchedOp,
                guest_sdk::hv_abi::sched::SCHEDOP_BLOCK,
            );
        }
    }
}
