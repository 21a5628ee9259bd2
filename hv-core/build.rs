//! Builds the demo guest kernel for x86_64-unknown-none and embeds it in `hv`.
//! `HV_DEMO_KERNEL=/path/to/elf` embeds another kernel instead.

fn main() {
    println!("cargo:rerun-if-env-changed=HV_DEMO_KERNEL");
    if std::env::var_os("CARGO_FEATURE_DEMO_KERNEL").is_none() {
        return;
    }
    let elf = match std::env::var("HV_DEMO_KERNEL") {
        Ok(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => {
            let root = guest_build::workspace_root(env!("CARGO_MANIFEST_DIR"), 1);
            guest_build::build_guest(&root, "guest-kernel-demo", "guest-kernel-demo")
        }
    };
    println!("cargo:rustc-env=HV_DEMO_KERNEL={}", elf.display());
}
