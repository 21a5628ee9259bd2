//! Builds the test guest kernel for x86_64-unknown-none.

fn main() {
    let root = guest_build::workspace_root(env!("CARGO_MANIFEST_DIR"), 1);
    let elf = guest_build::build_guest(&root, "test-guest", "test-guest");
    println!("cargo:rustc-env=TEST_GUEST_ELF={}", elf.display());
}
