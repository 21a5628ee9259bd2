//! Links the kernel with the SDK's linker script, as a non-PIE executable at its
//! physical address (only for the bare-metal guest target).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by guest-sdk's build script (`links = "hv_guest_sdk"`).
    let Some(script) = std::env::var_os("DEP_HV_GUEST_SDK_LINKER_SCRIPT") else {
        panic!("guest-sdk did not publish its linker script (DEP_HV_GUEST_SDK_LINKER_SCRIPT)");
    };
    let script = std::path::PathBuf::from(script);
    println!("cargo:rerun-if-changed={}", script.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        // x86_64-unknown-none links static PIE by default; hv loads ELF EXEC images
        // at their physical addresses, so turn PIE off (the last flag wins in lld).
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
