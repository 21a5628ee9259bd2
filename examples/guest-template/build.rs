//! Links the kernel with guest-sdk's linker script (which places the hv ABI note in a
//! PT_NOTE segment and loads the kernel at 1 MiB), as a non-PIE executable (ET_EXEC).

fn main() {
    // guest-sdk's build script publishes the script's path to its dependents.
    let script = std::env::var("DEP_HV_GUEST_SDK_LINKER_SCRIPT")
        .expect("guest-sdk publishes DEP_HV_GUEST_SDK_LINKER_SCRIPT");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
