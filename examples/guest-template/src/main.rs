//! A minimal hv guest kernel: `hv run target/x86_64-unknown-none/release/my-guest`.

#![no_std]
#![no_main]

use guest_sdk::{println, Features, StartInfo};

// Entry point and ABI note: hv refuses to start the kernel on a hypervisor without
// these features. Before `main`, the SDK checks start_info and the version handshake.
guest_sdk::entry!(main, Features::CONSOLE_IO | Features::SCHED);
guest_sdk::panic_handler!();

fn main(si: &'static StartInfo) -> ! {
    println!(
        "hello from domain {} ({} pages of RAM, {} vCPUs)",
        si.domid, si.nr_pages, si.nr_vcpus
    );
    match (guest_sdk::version(), guest_sdk::features()) {
        (Ok((major, minor)), Ok(f)) => println!("hv ABI {major}.{minor}, features {:#x}", f.bits()),
        _ => println!("version hypercall failed"),
    }
    guest_sdk::poweroff(0) // `hv run` exits with status 0
}
