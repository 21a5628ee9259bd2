//! Fuzzes `Config::parse` (the `hv run --config` file) with arbitrary text: it must
//! refuse or accept, never panic, and an accepted configuration must satisfy the
//! documented rules (SPEC.md §9.4): valid unique names, unique domain ids in range,
//! memory, vCPUs and command lines within `params`' rules, connections between two
//! distinct defined domains, each pair once.
//!
//! `parse` checks device paths on the file system (metadata, opening console input
//! files). So that the fuzzer cannot name arbitrary host files (a FIFO would block,
//! a device node could have side effects on open), inputs that could spell a path
//! separator are skipped: any `/`, and TOML's `\u`/`\U` escapes. Every path is then one
//! name joined to a private base directory holding a few small files.
#![no_main]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hv_core::config::{Config, KernelSource, MAX_DOMAINS, MAX_NAME_LEN};
use hv_core::domain::MAX_DOMID;
use hv_core::params;
use libfuzzer_sys::fuzz_target;

/// The base directory: `disk.img` (2 sectors), `odd.img` (100 bytes), `region.bin`
/// (8 KiB), `input.txt`, and a directory `sub`.
fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hv-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("base directory");
        std::fs::write(dir.join("disk.img"), [0u8; 1024]).expect("disk.img");
        std::fs::write(dir.join("odd.img"), [0u8; 100]).expect("odd.img");
        std::fs::write(dir.join("region.bin"), [0u8; 8192]).expect("region.bin");
        std::fs::write(dir.join("input.txt"), b"hello\n").expect("input.txt");
        dir
    })
}

fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains('/') || text.contains("\\u") || text.contains("\\U") {
        return;
    }
    let base = base();
    let Ok(config) = Config::parse(text, base) else {
        return;
    };
    let n = config.domains.len();
    assert!((1..=MAX_DOMAINS).contains(&n));
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for d in &config.domains {
        assert!(valid_name(&d.name), "accepted name {:?}", d.name);
        assert!(names.insert(d.name.as_str()), "duplicate name {:?}", d.name);
        assert!(d.domid < MAX_DOMID, "domid {} out of range", d.domid);
        assert!(ids.insert(d.domid), "duplicate domid {}", d.domid);
        assert!(
            params::check_memory(d.mem_bytes).is_ok(),
            "memory {}",
            d.mem_bytes
        );
        assert!(params::check_vcpus(d.vcpus).is_ok(), "vcpus {}", d.vcpus);
        assert!(params::check_cmdline(&d.cmdline).is_ok());
        if let KernelSource::File(p) = &d.kernel {
            assert!(
                p.starts_with(base),
                "kernel path {} escapes the base",
                p.display()
            );
        }
    }
    let mut pairs = HashSet::new();
    for &(a, b) in &config.connections {
        assert!(
            a < n && b < n && a != b,
            "connection ({a}, {b}) of {n} domains"
        );
        assert!(
            pairs.insert((a.min(b), a.max(b))),
            "connection ({a}, {b}) twice"
        );
    }
    // The checks are a function of the text (and the unchanged base directory).
    let again = Config::parse(text, base).expect("accepted once, accepted again");
    assert_eq!(again, config);
});
