//! Publishes the absolute path of the kernel linker script (`link.ld`) to the build
//! scripts of crates that depend on the SDK, as `DEP_HV_GUEST_SDK_LINKER_SCRIPT`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:linker_script={}", script.display());
}
