//! Helpers shared by hv-core's integration tests (each test binary includes this
//! module; not every binary uses every helper).

/// Returns true if KVM tests can run. Without a usable /dev/kvm this panics, unless
/// `HV_SKIP_KVM=1` is set, in which case it says so loudly and returns false.
#[allow(dead_code)]
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("HV_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("SKIPPING KVM TEST (HV_SKIP_KVM=1): /dev/kvm is not usable: {e}");
            false
        }
        Err(e) => {
            panic!("/dev/kvm is not usable ({e}); set HV_SKIP_KVM=1 to skip KVM tests explicitly")
        }
    }
}

/// The test guest kernel (tests/test-guest), built once per test process.
#[allow(dead_code)]
pub fn test_guest() -> &'static std::path::Path {
    static ELF: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ELF.get_or_init(|| {
        let root = guest_build::workspace_root(env!("CARGO_MANIFEST_DIR"), 1);
        guest_build::build_guest(&root, "test-guest", "test-guest")
    })
}

/// Runs the `hv` binary of this build with `args` and waits for it.
#[allow(dead_code)]
pub fn hv(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hv"))
        .args(args)
        .output()
        .expect("run hv")
}

/// Output bytes as text (lossy).
#[allow(dead_code)]
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
