//! Compiles a guest kernel crate of this workspace for `x86_64-unknown-none` from a
//! build script, so that host crates can embed or locate guest images.
//!
//! The guest is built by a nested `cargo build` with its own target directory (under
//! the workspace's `target/guest`), in the `guest` profile. Guest kernels are
//! workspace members excluded from `default-members`, so plain host builds skip them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target triple of guest kernels.
pub const GUEST_TARGET: &str = "x86_64-unknown-none";

/// Builds `package` (a binary crate in the workspace at `workspace_root`) for the guest
/// target and returns the path of the resulting ELF file. Prints the
/// `cargo:rerun-if-changed` lines for every guest-side source directory.
///
/// Panics with an explanation when the build fails: this runs inside build scripts,
/// where a panic is how an error is reported.
pub fn build_guest(workspace_root: &Path, package: &str, bin: &str) -> PathBuf {
    for dir in [
        "hv-abi",
        "guest-sdk",
        "guest-kernel-demo",
        "tests/test-guest",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_root.join(dir).display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace_root.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace_root.join("Cargo.lock").display()
    );

    check_target_installed();

    let target_dir = workspace_root.join("target").join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root)
        .args(["build", "--package", package, "--bin", bin])
        .args(["--target", GUEST_TARGET, "--profile", "guest"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings are for the host crates; the guest build gets its own.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("guest-build: cannot run cargo to build {package}: {e}"));
    if !status.success() {
        panic!(
            "guest-build: building guest kernel `{package}` for {GUEST_TARGET} failed ({status})"
        );
    }
    let elf = target_dir.join(GUEST_TARGET).join("guest").join(bin);
    if !elf.is_file() {
        panic!("guest-build: expected guest kernel at {}", elf.display());
    }
    elf
}

/// Fails the build with the command to run when the guest target is not installed.
fn check_target_installed() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = sysroot {
        let lib = sysroot.join("lib/rustlib").join(GUEST_TARGET);
        if !lib.is_dir() {
            panic!(
                "guest-build: the Rust target {GUEST_TARGET} is not installed; run \
                 `rustup target add {GUEST_TARGET}` (or `make setup`)"
            );
        }
    }
}

/// The workspace root, given a crate's `CARGO_MANIFEST_DIR` and its depth below the root.
pub fn workspace_root(manifest_dir: &str, depth: usize) -> PathBuf {
    let mut p = PathBuf::from(manifest_dir);
    for _ in 0..depth {
        p.pop();
    }
    p
}

/// The build script of a guest kernel crate (one that depends on guest-sdk): links its
/// binaries with the SDK's linker script as non-PIE executables at their physical
/// addresses, when building for the bare-metal guest target.
///
/// Panics (the build script's way of failing) if guest-sdk did not publish its script.
pub fn link_guest_kernel() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by guest-sdk's build script (`links = "hv_guest_sdk"`).
    let Some(script) = std::env::var_os("DEP_HV_GUEST_SDK_LINKER_SCRIPT") else {
        panic!("guest-sdk did not publish its linker script (DEP_HV_GUEST_SDK_LINKER_SCRIPT)");
    };
    let script = PathBuf::from(script);
    println!("cargo:rerun-if-changed={}", script.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        // x86_64-unknown-none links static PIE by default; hv loads ELF EXEC images
        // at their physical addresses, so turn PIE off (the last flag wins in lld).
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
