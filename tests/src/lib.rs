//! Helpers shared by hv's integration tests: KVM availability, booting guests, and
//! ELF surgery for the loader's rejection cases.

pub mod evtchn_model;
// TEMPORARY: grant_model.rs is being rewritten on another branch; its narrowing cast is
// fixed there. Remove this allow when that rewrite lands.
#[allow(clippy::cast_possible_truncation)]
pub mod grant_model;
pub mod mmu_model;

use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use hv_core::hypervisor::Hypervisor;
use hv_core::{ConsoleSink, DomainConfig, DomainError, DomainReport};
use kvm_ioctls::Kvm;

/// The test guest kernel (tests/test-guest), built at build time.
pub static TEST_GUEST: &[u8] = include_bytes!(env!("TEST_GUEST_ELF"));

/// The demo kernel embedded in hv-core.
pub fn demo_kernel() -> &'static [u8] {
    hv_core::DEMO_KERNEL
}

/// Returns true if KVM tests can run. Without a usable /dev/kvm this panics, unless
/// `HV_SKIP_KVM=1` is set, in which case it says so loudly and returns false.
pub fn kvm_available() -> bool {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    match state {
        Ok(()) => true,
        Err(e) if std::env::var("HV_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("SKIPPING KVM TEST (HV_SKIP_KVM=1): /dev/kvm is not usable: {e}");
            false
        }
        Err(e) => panic!(
            "/dev/kvm is not usable ({e}): hv's tests run real guests on KVM. \
             Set HV_SKIP_KVM=1 to skip them explicitly."
        ),
    }
}

/// Opens /dev/kvm (call after [`kvm_available`]).
pub fn kvm() -> Kvm {
    Kvm::new().expect("open /dev/kvm")
}

/// What a test run of a guest produced.
#[derive(Debug)]
pub struct GuestRun {
    /// The report.
    pub report: DomainReport,
    /// Everything the guest wrote to its console.
    pub console: String,
}

impl GuestRun {
    /// The value of a `key=value` console line, if any.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        // A line starting with `key=` (the value is the rest of the line), else a
        // `key=value` word anywhere on a line.
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .or_else(|| {
                self.console
                    .lines()
                    .flat_map(str::split_whitespace)
                    .find_map(|w| w.strip_prefix(prefix.as_str()))
            })
    }

    /// The 64 bits of [`GuestRun::int`] read as unsigned (addresses, feature bitmaps).
    pub fn uint(&self, key: &str) -> u64 {
        u64::from_ne_bytes(self.int(key).to_ne_bytes())
    }

    /// The value of a `key=value` line parsed as an integer; panics with the console
    /// output if missing.
    pub fn int(&self, key: &str) -> i64 {
        let v = self
            .value(key)
            .unwrap_or_else(|| panic!("no {key}= line in console output:\n{}", self.console));
        let v = v.split_whitespace().next().unwrap_or("");
        let parsed = if let Some(hex) = v.strip_prefix("0x") {
            i64::from_str_radix(hex, 16).ok()
        } else {
            v.parse().ok()
        };
        parsed.unwrap_or_else(|| panic!("{key}={v} is not an integer; console:\n{}", self.console))
    }

    /// Panics, with the console output, unless the domain powered off with `code`.
    pub fn assert_poweroff(&self, code: u8) {
        assert!(
            matches!(self.report.outcome, hv_core::Outcome::Poweroff { code: c } if c == code),
            "expected poweroff {code}, got {}; console:\n{}",
            self.report.outcome,
            self.console
        );
    }

    /// The first console line containing `needle`; panics with the console if none.
    pub fn line_with(&self, needle: &str) -> &str {
        self.console
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}; console:\n{}", self.console))
    }
}

/// How long one guest run of a test may take before the test destroys its domains
/// and fails (`HV_TEST_TIMEOUT_S`, default 240 s): a hung guest fails loudly instead
/// of hanging the suite.
pub fn run_timeout() -> Duration {
    let secs = std::env::var("HV_TEST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}

/// Runs the domains created in `hv` until all have ended, as [`Hypervisor::run`], but
/// destroys them and panics (with `what` and their consoles so far) if that takes
/// longer than [`run_timeout`].
pub fn run_bounded(
    hv: Hypervisor,
    what: &str,
    consoles: &[Arc<Mutex<Vec<u8>>>],
) -> Vec<hv_core::hypervisor::DomainResult> {
    wait_bounded(hv.start(), what, consoles)
}

/// Waits for started domains as [`Running::wait`](hv_core::hypervisor::Running::wait),
/// bounded by [`run_timeout`] as [`run_bounded`].
pub fn wait_bounded(
    running: hv_core::hypervisor::Running,
    what: &str,
    consoles: &[Arc<Mutex<Vec<u8>>>],
) -> Vec<hv_core::hypervisor::DomainResult> {
    let domains: Vec<_> = running.domains().cloned().collect();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timeout = run_timeout();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
            for d in &domains {
                d.finish(hv_core::Outcome::Destroyed);
            }
            return true;
        }
        false
    });
    let results = running.wait();
    let _ = done_tx.send(());
    if watchdog.join().unwrap_or(false) {
        let text: Vec<String> = consoles
            .iter()
            .map(|b| String::from_utf8_lossy(&b.lock().expect("console buffer")).into_owned())
            .collect();
        panic!(
            "{what}: the guests did not finish within {} s (HV_TEST_TIMEOUT_S); \
             destroyed. Consoles:\n{}",
            timeout.as_secs(),
            text.join("\n----\n")
        );
    }
    results
}

/// Runs `elf` with `config` (its console is captured), bounded by [`run_timeout`].
pub fn run_elf(elf: &[u8], mut config: DomainConfig) -> Result<GuestRun, DomainError> {
    let (sink, buf) = ConsoleSink::capture();
    config.console = sink;
    let image = hv_core::loader::KernelImage::from_elf(elf)?;
    let mut hv = Hypervisor::new(kvm());
    let what = format!("domain {}", config.name);
    hv.create_domain(config, &image)?;
    let result = run_bounded(hv, &what, std::slice::from_ref(&buf))
        .pop()
        .expect("one domain");
    let report = result.report?;
    let console = String::from_utf8_lossy(&buf.lock().expect("console buffer")).into_owned();
    Ok(GuestRun { report, console })
}

/// Runs a test-guest scenario with default settings and `cmdline` appended.
pub fn scenario(name: &str, extra: &str) -> GuestRun {
    scenario_with(name, extra, DomainConfig::default())
}

/// Runs a test-guest scenario with a given configuration.
pub fn scenario_with(name: &str, extra: &str, mut config: DomainConfig) -> GuestRun {
    config.name = format!("test-{name}");
    config.cmdline = format!("scenario={name} {extra}").trim().to_string();
    run_elf(TEST_GUEST, config).unwrap_or_else(|e| panic!("scenario {name}: {e}"))
}

/// ELF surgery on a valid kernel, for the loader's rejection tests.
/// One domain of a [`run_domains`] test: a test-guest scenario.
#[derive(Clone, Debug)]
pub struct DomSpec {
    /// Domain name (also what connected peers see in `evtchn.<name>=`).
    pub name: &'static str,
    /// Command line (for the test guest: `scenario=... ...`).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
}

impl DomSpec {
    /// A one-vCPU test-guest domain running `cmdline`.
    pub fn new(name: &'static str, cmdline: impl Into<String>) -> DomSpec {
        DomSpec {
            name,
            cmdline: cmdline.into(),
            vcpus: 1,
        }
    }
}

/// Runs several test-guest domains together in one [`hv_core::hypervisor::Hypervisor`],
/// domain ids 1, 2, ... in order, with interdomain event channels between the pairs of
/// indices in `connect` (see `Hypervisor::connect` for what each guest is told). Returns
/// each domain's run, in order. Panics if a domain cannot be created or run.
pub fn run_domains(specs: &[DomSpec], connect: &[(usize, usize)]) -> Vec<GuestRun> {
    run_domains_of(TEST_GUEST, specs, connect)
}

/// [`run_domains`] with another kernel ELF (for example [`demo_kernel`]).
pub fn run_domains_of(elf: &[u8], specs: &[DomSpec], connect: &[(usize, usize)]) -> Vec<GuestRun> {
    let image = hv_core::loader::KernelImage::from_elf(elf).expect("kernel loads");
    let mut hv = Hypervisor::new(kvm());
    let mut bufs = Vec::new();
    let mut ids = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let (sink, buf) = ConsoleSink::capture();
        let config = DomainConfig {
            name: s.name.to_string(),
            domid: u32::try_from(i + 1).expect("fewer than 2^32 domains"),
            cmdline: s.cmdline.clone(),
            vcpus: s.vcpus,
            console: sink,
            ..DomainConfig::default()
        };
        ids.push(
            hv.create_domain(config, &image)
                .unwrap_or_else(|e| panic!("create {}: {e}", s.name)),
        );
        bufs.push(buf);
    }
    for (a, b) in connect {
        hv.connect(ids[*a], ids[*b]).expect("connect domains");
    }
    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
    run_bounded(hv, &format!("domains {names:?}"), &bufs)
        .into_iter()
        .zip(bufs)
        .map(|(r, buf)| {
            let report = r.report.unwrap_or_else(|e| panic!("run {}: {e}", r.name));
            let console =
                String::from_utf8_lossy(&buf.lock().expect("console buffer")).into_owned();
            GuestRun { report, console }
        })
        .collect()
}

/// Edits of ELF images for the loader tests: program headers and the ABI note.
pub mod elf_edit {
    use object::elf::{FileHeader64, ProgramHeader64, PT_LOAD, PT_NOTE};
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::{Endianness, LittleEndian as LE, U16, U32, U64};
    use zerocopy::IntoBytes;

    /// File offset of the program header table and the number of entries.
    pub fn phdr_table(elf: &[u8]) -> (usize, usize) {
        let elf = &aligned(elf);
        let h = FileHeader64::<Endianness>::parse(elf.as_bytes()).expect("valid ELF");
        let e = h.endian().expect("endian");
        (
            hv_core::conv::usize_from(h.e_phoff(e)),
            usize::from(h.e_phnum(e)),
        )
    }

    /// Indices of the program headers of a type.
    pub fn phdrs_of_type(elf: &[u8], ty: u32) -> Vec<usize> {
        let owned = aligned(elf);
        let elf = &owned.as_bytes()[..elf.len()];
        let h = FileHeader64::<Endianness>::parse(elf).expect("valid ELF");
        let e = h.endian().expect("endian");
        h.program_headers(e, elf)
            .expect("phdrs")
            .iter()
            .enumerate()
            .filter(|(_, p)| p.p_type(e) == ty)
            .map(|(i, _)| i)
            .collect()
    }

    /// A copy of `elf` with 8-byte alignment (the ELF parser reads structures in place).
    fn aligned(elf: &[u8]) -> Vec<u64> {
        let mut v = vec![0u64; elf.len().div_ceil(8)];
        v.as_mut_bytes()[..elf.len()].copy_from_slice(elf);
        v
    }

    /// Indices of PT_LOAD headers.
    pub fn loads(elf: &[u8]) -> Vec<usize> {
        phdrs_of_type(elf, PT_LOAD)
    }

    /// Reads program header `i`.
    pub fn phdr(elf: &[u8], i: usize) -> ProgramHeader64<LE> {
        let (off, _) = phdr_table(elf);
        let size = core::mem::size_of::<ProgramHeader64<LE>>();
        let at = off + i * size;
        let owned = aligned(&elf[at..at + size]);
        *object::pod::from_bytes::<ProgramHeader64<LE>>(&owned.as_bytes()[..size])
            .expect("phdr")
            .0
    }

    /// Rewrites program header `i` with `f`.
    pub fn edit_phdr(elf: &mut [u8], i: usize, f: impl FnOnce(&mut ProgramHeader64<LE>)) {
        let (off, _) = phdr_table(elf);
        let size = core::mem::size_of::<ProgramHeader64<LE>>();
        let mut p = phdr(elf, i);
        f(&mut p);
        let at = off + i * size;
        elf[at..at + size].copy_from_slice(object::pod::bytes_of(&p));
    }

    /// Sets a u64 field of a program header.
    pub fn u64v(v: u64) -> U64<LE> {
        U64::new(LE, v)
    }

    /// Sets a u32 field.
    pub fn u32v(v: u32) -> U32<LE> {
        U32::new(LE, v)
    }

    /// Sets a u16 in the file header at `offset`.
    pub fn set_u16(elf: &mut [u8], offset: usize, v: u16) {
        elf[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a u64 in the file header at `offset`.
    pub fn set_u64(elf: &mut [u8], offset: usize, v: u64) {
        elf[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// File offset of the hv ABI note's descriptor.
    pub fn abi_note_desc_offset(elf: &[u8]) -> usize {
        for i in phdrs_of_type(elf, PT_NOTE) {
            let p = phdr(elf, i);
            let mut at = hv_core::conv::usize_from(p.p_offset.get(LE));
            let end = at + hv_core::conv::usize_from(p.p_filesz.get(LE));
            while at + 12 <= end {
                let namesz = u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) as usize;
                let descsz = u32::from_le_bytes(elf[at + 4..at + 8].try_into().unwrap()) as usize;
                let ty = u32::from_le_bytes(elf[at + 8..at + 12].try_into().unwrap());
                let name = &elf[at + 12..at + 12 + namesz];
                let desc = at + 12 + namesz.div_ceil(4) * 4;
                if name == b"hv\0" && ty == hv_abi::note::NOTE_TYPE_ABI {
                    return desc;
                }
                at = desc + descsz.div_ceil(4) * 4;
            }
        }
        panic!("no hv ABI note in this ELF");
    }

    /// Rewrites the ABI note's descriptor.
    pub fn set_note(elf: &mut [u8], note: hv_abi::note::AbiNote) {
        let at = abi_note_desc_offset(elf);
        elf[at..at + 16].copy_from_slice(note.as_bytes());
    }

    /// The ABI note's descriptor.
    pub fn note(elf: &[u8]) -> hv_abi::note::AbiNote {
        let at = abi_note_desc_offset(elf);
        zerocopy::FromBytes::read_from_bytes(&elf[at..at + 16]).expect("note")
    }

    /// Unused, keeps U16 imported for callers that edit 16-bit fields.
    pub fn u16v(v: u16) -> U16<LE> {
        U16::new(LE, v)
    }
}
