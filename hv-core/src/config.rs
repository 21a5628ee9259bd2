//! Configuration files of `hv run --config`: several domains, and the interdomain event
//! channels between them, in TOML (SPEC.md §9.4).
//!
//! A file is checked as a whole before any domain is created: [`Config::parse`] checks
//! names, ids, sizes, vCPU counts, command lines and connections;
//! [`Config::load_kernels`] reads and parses each distinct kernel once and checks that
//! it fits every domain that uses it. [`Config::build`] then creates the domains and
//! connects them, and [`exit_code`] and [`summary`] turn the results into the
//! process's exit status and its closing report.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use hv_abi::shared_info::NR_EVENT_CHANNELS;
use kvm_ioctls::Kvm;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use thiserror::Error;

use crate::cli::parse_size;
use crate::console::ConsoleSink;
use crate::devices::disk::DiskSpec;
use crate::devices::passthrough::{self, PassthroughError, RegionSpec};
use crate::devices::{self as devs, ConsoleInput, ConsoleSpec, DeviceSpec, SpecError};
use crate::domain::{DomainConfig, DomainError, DEFAULT_MEM_BYTES, FEATURES, MAX_DOMID};
use crate::hypervisor::{DomainResult, Hypervisor};
use crate::loader::{KernelImage, LoadError};
use crate::outcome::{Outcome, EXIT_CRASH, EXIT_INTERNAL};
use crate::params;

/// Most domains one configuration file may define.
pub const MAX_DOMAINS: usize = 4096;
/// Longest domain name.
pub const MAX_NAME_LEN: usize = 32;

/// Errors of a configuration file, each naming the domain or connection at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or not the schema (unknown field, wrong type, missing name).
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// No `[[domain]]` table.
    #[error("no domains: add at least one [[domain]] table")]
    NoDomains,
    /// More than [`MAX_DOMAINS`] domains.
    #[error("{0} domains; a configuration has at most {MAX_DOMAINS}")]
    TooManyDomains(usize),
    /// A name that is empty, too long or has characters other than `[A-Za-z0-9_-]`.
    #[error("domain #{index}: invalid name {name:?}: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_' and '-'")]
    BadName {
        /// 1-based position of the `[[domain]]` table.
        index: usize,
        /// The name.
        name: String,
    },
    /// Two domains with one name.
    #[error("domain {0:?} is defined twice")]
    DuplicateName(String),
    /// Two domains with one id.
    #[error("domains {first:?} and {second:?} both have domain id {domid}")]
    DuplicateDomid {
        /// The earlier domain.
        first: String,
        /// The later one.
        second: String,
        /// The id.
        domid: u32,
    },
    /// A field of a domain has a bad value.
    #[error("domain {domain:?}: {field}: {message}")]
    Field {
        /// The domain.
        domain: String,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A device or console option of a domain cannot work (bad path, size, kind...).
    #[error("domain {domain:?}: {error}")]
    Device {
        /// The domain.
        domain: String,
        /// What is wrong.
        error: SpecError,
    },
    /// One disk image used by two domains (allowed only if both use it read-only).
    #[error("disk image {} is used by domains {first:?} and {second:?}; an image can be shared only read-only", path.display())]
    SharedDisk {
        /// The image.
        path: PathBuf,
        /// The first domain.
        first: String,
        /// The second.
        second: String,
    },
    /// A passthrough region given to two domains.
    #[error("{0}")]
    Passthrough(#[from] PassthroughError),
    /// Two domains write their console to one file.
    #[error("domains {first:?} and {second:?} both write their console to {}", path.display())]
    SharedConsoleOutput {
        /// The file.
        path: PathBuf,
        /// The first domain.
        first: String,
        /// The second.
        second: String,
    },
    /// Two domains read hv's standard input.
    #[error("domains {first:?} and {second:?} both read standard input (console input = \"stdin\"); only one can")]
    SharedStdin {
        /// The first domain.
        first: String,
        /// The second.
        second: String,
    },
    /// A connection names a domain that is not defined.
    #[error("connection #{index}: no domain is named {name:?}")]
    UnknownDomain {
        /// 1-based position of the `[[connection]]` table.
        index: usize,
        /// The name.
        name: String,
    },
    /// `between` does not hold two names.
    #[error("connection #{index}: between has {count} names; give two domain names")]
    BadConnection {
        /// 1-based position of the `[[connection]]` table.
        index: usize,
        /// How many names it has.
        count: usize,
    },
    /// A connection from a domain to itself.
    #[error("connection #{index}: domain {name:?} cannot be connected to itself")]
    SelfConnection {
        /// 1-based position of the `[[connection]]` table.
        index: usize,
        /// The domain.
        name: String,
    },
    /// The same two domains connected twice.
    #[error("connection #{index}: domains {a:?} and {b:?} are already connected")]
    DuplicateConnection {
        /// 1-based position of the `[[connection]]` table.
        index: usize,
        /// One domain.
        a: String,
        /// The other.
        b: String,
    },
    /// A domain without `kernel`, in an hv built without the demo kernel.
    #[error(
        "domain {0:?}: no kernel given and this hv was built without the embedded demo kernel"
    )]
    NoDemoKernel(String),
    /// A kernel file could not be read.
    #[error("domain {domain:?}: cannot read kernel {}: {source}", path.display())]
    KernelRead {
        /// The first domain using the kernel.
        domain: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A kernel was refused (not a valid hv kernel, or does not fit the domain).
    #[error("domain {domain:?}: {kernel} refused: {source}")]
    Kernel {
        /// The domain.
        domain: String,
        /// The kernel.
        kernel: KernelSource,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// A domain could not be created.
    #[error("cannot create domain {domain:?}: {source}")]
    Create {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: DomainError,
    },
    /// Two domains could not be connected.
    #[error("cannot connect domains {a:?} and {b:?}: {source}")]
    Connect {
        /// One domain.
        a: String,
        /// The other.
        b: String,
        /// Why.
        #[source]
        source: DomainError,
    },
}

impl ConfigError {
    /// True when the error is in what the user asked for (exit status 2) rather than in
    /// the host (exit status 1).
    pub fn is_user_error(&self) -> bool {
        match self {
            ConfigError::Create { source, .. } | ConfigError::Connect { source, .. } => {
                source.is_user_error()
            }
            _ => true,
        }
    }
}

/// Where a domain's kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// The demo kernel embedded in hv.
    Demo,
    /// An ELF file (relative paths already resolved against the file's directory).
    File(PathBuf),
}

impl fmt::Display for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSource::Demo => f.write_str("the embedded demo kernel"),
            KernelSource::File(p) => write!(f, "kernel {}", p.display()),
        }
    }
}

/// One checked domain of a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSpec {
    /// Unique name, `[A-Za-z0-9_-]{1,32}`.
    pub name: String,
    /// Its kernel.
    pub kernel: KernelSource,
    /// Unique domain id, below [`MAX_DOMID`].
    pub domid: u32,
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Command line as written (connections append to it when the domain is built).
    pub cmdline: String,
    /// Allow hypercalls from guest CPL 3.
    pub allow_user_hypercalls: bool,
    /// Devices: the `[[domain.disk]]` tables in order, then the
    /// `[[domain.passthrough]]` tables in order (paths resolved).
    pub devices: Vec<DeviceSpec>,
    /// The `[domain.console]` table (paths resolved).
    pub console: ConsoleSpec,
}

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The domains, in file order.
    pub domains: Vec<DomainSpec>,
    /// Connections as pairs of indices into `domains`, in file order.
    pub connections: Vec<(usize, usize)>,
}

/// The parsed kernels of a configuration, one per distinct source.
#[derive(Debug)]
pub struct Kernels {
    images: HashMap<KernelSource, KernelImage>,
}

impl Kernels {
    /// The image loaded for `source`.
    pub fn get(&self, source: &KernelSource) -> Option<&KernelImage> {
        self.images.get(source)
    }

    /// How many distinct kernels were read.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// True if no kernel was read.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    domain: Vec<RawDomain>,
    #[serde(default)]
    connection: Vec<RawConnection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: String,
    kernel: Option<PathBuf>,
    memory: Option<RawSize>,
    vcpus: Option<u32>,
    cmdline: Option<String>,
    domid: Option<u32>,
    allow_user_hypercalls: Option<bool>,
    #[serde(default)]
    disk: Vec<RawDisk>,
    #[serde(default)]
    passthrough: Vec<RawRegion>,
    console: Option<RawConsole>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    path: PathBuf,
    size: Option<RawSize>,
    readonly: Option<bool>,
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    path: PathBuf,
    size: RawSize,
    create: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    output: Option<PathBuf>,
    input: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    between: Vec<String>,
}

/// A size as written: `"64M"` or a number of bytes (checked later, with the domain
/// name in the message).
enum RawSize {
    Text(String),
    Bytes(u64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64M\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(s.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawSize, E> {
                u64::try_from(n)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
        }
        d.deserialize_any(V)
    }
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

impl Config {
    /// Reads and checks the configuration file at `path`. Kernel paths are relative to
    /// the file's directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        Config::parse(&text, base)
    }

    /// Parses and checks a configuration; relative kernel paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text)?;
        if raw.domain.is_empty() {
            return Err(ConfigError::NoDomains);
        }
        if raw.domain.len() > MAX_DOMAINS {
            return Err(ConfigError::TooManyDomains(raw.domain.len()));
        }
        let mut index_of: HashMap<&str, usize> = HashMap::new();
        for (i, d) in raw.domain.iter().enumerate() {
            if !valid_name(&d.name) {
                return Err(ConfigError::BadName {
                    index: i + 1,
                    name: d.name.clone(),
                });
            }
            if index_of.insert(&d.name, i).is_some() {
                return Err(ConfigError::DuplicateName(d.name.clone()));
            }
        }
        let connections = check_connections(&raw.connection, &index_of)?;

        // Explicit ids first; the others get the lowest free ids from 1, in file order.
        let mut taken: HashMap<u32, &str> = HashMap::new();
        for d in &raw.domain {
            let Some(id) = d.domid else { continue };
            if id >= MAX_DOMID {
                return Err(field(
                    &d.name,
                    "domid",
                    format!(
                        "{id} is out of range: domain ids are 0 to {}",
                        MAX_DOMID - 1
                    ),
                ));
            }
            if let Some(first) = taken.insert(id, &d.name) {
                return Err(ConfigError::DuplicateDomid {
                    first: first.to_string(),
                    second: d.name.clone(),
                    domid: id,
                });
            }
        }
        let mut next_free = 1;
        let mut domains = Vec::with_capacity(raw.domain.len());
        for (i, d) in raw.domain.iter().enumerate() {
            let domid = match d.domid {
                Some(id) => id,
                None => {
                    while taken.contains_key(&next_free) {
                        next_free += 1;
                    }
                    taken.insert(next_free, &d.name);
                    next_free
                }
            };
            domains.push(check_domain(d, domid, base)?);
            debug_assert_eq!(domains.len(), i + 1);
        }
        let config = Config {
            domains,
            connections,
        };
        config.check_cmdlines()?;
        config.check_shared_files()?;
        Ok(config)
    }

    /// Checks what domains may not share: writable disk images, passthrough regions,
    /// console output files, standard input.
    fn check_shared_files(&self) -> Result<(), ConfigError> {
        let mut disks: HashMap<PathBuf, (&str, bool)> = HashMap::new();
        for d in &self.domains {
            for (path, ro) in devs::disk_identities(&d.devices) {
                match disks.get(&path) {
                    // Within one domain, check_specs has decided already.
                    Some((first, first_ro)) if *first != d.name && !(ro && *first_ro) => {
                        return Err(ConfigError::SharedDisk {
                            path,
                            first: first.to_string(),
                            second: d.name.clone(),
                        })
                    }
                    Some(_) => {}
                    None => {
                        disks.insert(path, (&d.name, ro));
                    }
                }
            }
        }
        let regions: Vec<(&str, RegionSpec)> = self
            .domains
            .iter()
            .flat_map(|d| {
                DeviceSpec::regions(&d.devices)
                    .into_iter()
                    .map(move |r| (d.name.as_str(), r))
            })
            .collect();
        passthrough::check_exclusive(regions.iter().map(|(n, r)| (*n, r)))?;
        let mut outputs: HashMap<PathBuf, &str> = HashMap::new();
        let mut stdin: Option<&str> = None;
        for d in &self.domains {
            if let Some(out) = &d.console.output {
                if let Some(first) = outputs.insert(devs::file_identity(out), &d.name) {
                    return Err(ConfigError::SharedConsoleOutput {
                        path: out.clone(),
                        first: first.to_string(),
                        second: d.name.clone(),
                    });
                }
            }
            if d.console.input == ConsoleInput::Stdin {
                if let Some(first) = stdin {
                    return Err(ConfigError::SharedStdin {
                        first: first.to_string(),
                        second: d.name.clone(),
                    });
                }
                stdin = Some(&d.name);
            }
        }
        Ok(())
    }

    /// Checks every command line, with the worst-case text the connections append.
    fn check_cmdlines(&self) -> Result<(), ConfigError> {
        let max_port = digits(NR_EVENT_CHANNELS as u64 - 1);
        for (i, d) in self.domains.iter().enumerate() {
            let mut len = d.cmdline.len();
            for &(a, b) in &self.connections {
                let peer = match (a == i, b == i) {
                    (true, _) => &self.domains[b],
                    (_, true) => &self.domains[a],
                    _ => continue,
                };
                // " evtchn.<peer>=<port> domid.<peer>=<id>"
                len += " evtchn.= domid.=".len()
                    + 2 * peer.name.len()
                    + max_port
                    + digits(u64::from(peer.domid));
            }
            crate::params::check_cmdline(&d.cmdline)
                .map_err(|e| field(&d.name, "cmdline", e.to_string()))?;
            if len > params::MAX_CMDLINE_BYTES {
                return Err(field(
                    &d.name,
                    "cmdline",
                    format!(
                        "{} bytes, and the connections append up to {} more: at most {} fit",
                        d.cmdline.len(),
                        len - d.cmdline.len(),
                        params::MAX_CMDLINE_BYTES
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads and parses each distinct kernel once (`demo` is the embedded demo kernel,
    /// empty if hv was built without it) and checks each domain's kernel: ABI note and
    /// fit in the domain's memory.
    pub fn load_kernels(&self, demo: &[u8]) -> Result<Kernels, ConfigError> {
        let mut images = HashMap::new();
        for d in &self.domains {
            let image = match images.get(&d.kernel) {
                Some(image) => image,
                None => {
                    let bytes = match &d.kernel {
                        KernelSource::Demo if demo.is_empty() => {
                            return Err(ConfigError::NoDemoKernel(d.name.clone()))
                        }
                        KernelSource::Demo => demo.to_vec(),
                        KernelSource::File(path) => {
                            std::fs::read(path).map_err(|source| ConfigError::KernelRead {
                                domain: d.name.clone(),
                                path: path.clone(),
                                source,
                            })?
                        }
                    };
                    let image = KernelImage::from_elf(&bytes).map_err(|e| kernel_err(d, e))?;
                    images.entry(d.kernel.clone()).or_insert(image)
                }
            };
            image.check_abi(FEATURES).map_err(|e| kernel_err(d, e))?;
            image
                .check_fits(d.mem_bytes)
                .map_err(|e| kernel_err(d, e))?;
        }
        Ok(Kernels { images })
    }

    /// Creates every domain (console from `console`) and connects the pairs; nothing
    /// runs yet.
    pub fn build(
        &self,
        kvm: Kvm,
        kernels: &Kernels,
        console: impl Fn(&DomainSpec) -> ConsoleSink,
    ) -> Result<Hypervisor, ConfigError> {
        let mut hv = Hypervisor::new(kvm);
        for d in &self.domains {
            let create = |source| ConfigError::Create {
                domain: d.name.clone(),
                source,
            };
            let image = kernels.get(&d.kernel).ok_or_else(|| {
                create(DomainError::Thread(std::io::Error::other(
                    "kernel not loaded (load_kernels was not called)",
                )))
            })?;
            let config = DomainConfig {
                name: d.name.clone(),
                domid: d.domid,
                mem_bytes: d.mem_bytes,
                vcpus: d.vcpus,
                cmdline: d.cmdline.clone(),
                allow_user_hypercalls: d.allow_user_hypercalls,
                console: console(d),
                devices: d.devices.clone(),
                console_spec: d.console.clone(),
                ..DomainConfig::default()
            };
            hv.create_domain(config, image).map_err(create)?;
        }
        for &(a, b) in &self.connections {
            let (da, db) = (&self.domains[a], &self.domains[b]);
            hv.connect(da.domid, db.domid)
                .map_err(|source| ConfigError::Connect {
                    a: da.name.clone(),
                    b: db.name.clone(),
                    source,
                })?;
        }
        Ok(hv)
    }
}

fn field(domain: &str, field: &'static str, message: String) -> ConfigError {
    ConfigError::Field {
        domain: domain.to_string(),
        field,
        message,
    }
}

fn kernel_err(d: &DomainSpec, source: LoadError) -> ConfigError {
    ConfigError::Kernel {
        domain: d.name.clone(),
        kernel: d.kernel.clone(),
        source,
    }
}

fn check_connections(
    raw: &[RawConnection],
    index_of: &HashMap<&str, usize>,
) -> Result<Vec<(usize, usize)>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let index = i + 1;
        let [a, b] = c.between.as_slice() else {
            return Err(ConfigError::BadConnection {
                index,
                count: c.between.len(),
            });
        };
        let find = |name: &String| {
            index_of
                .get(name.as_str())
                .copied()
                .ok_or_else(|| ConfigError::UnknownDomain {
                    index,
                    name: name.clone(),
                })
        };
        let (ia, ib) = (find(a)?, find(b)?);
        if ia == ib {
            return Err(ConfigError::SelfConnection {
                index,
                name: a.clone(),
            });
        }
        if !seen.insert((ia.min(ib), ia.max(ib))) {
            return Err(ConfigError::DuplicateConnection {
                index,
                a: a.clone(),
                b: b.clone(),
            });
        }
        out.push((ia, ib));
    }
    Ok(out)
}

fn check_domain(d: &RawDomain, domid: u32, base: &Path) -> Result<DomainSpec, ConfigError> {
    let kernel = match &d.kernel {
        None => KernelSource::Demo,
        Some(p) if p.as_os_str().is_empty() => {
            return Err(field(&d.name, "kernel", "empty path".into()))
        }
        Some(p) => KernelSource::File(base.join(p)),
    };
    let mem_bytes = match &d.memory {
        None => DEFAULT_MEM_BYTES,
        Some(RawSize::Bytes(n)) => *n,
        Some(RawSize::Text(s)) => {
            parse_size(s).map_err(|e| field(&d.name, "memory", e.to_string()))?
        }
    };
    params::check_memory(mem_bytes).map_err(|e| field(&d.name, "memory", e.to_string()))?;
    let vcpus = d.vcpus.unwrap_or(1);
    params::check_vcpus(vcpus).map_err(|e| field(&d.name, "vcpus", e.to_string()))?;
    let (devices, console) = check_devices(d, base)?;
    Ok(DomainSpec {
        name: d.name.clone(),
        kernel,
        domid,
        mem_bytes,
        vcpus,
        cmdline: d.cmdline.clone().unwrap_or_default(),
        allow_user_hypercalls: d.allow_user_hypercalls.unwrap_or(false),
        devices,
        console,
    })
}

/// A size field of a device table.
fn raw_size(raw: &RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(n) => Ok(*n),
        RawSize::Text(s) => parse_size(s).map_err(|e| e.to_string()),
    }
}

/// The `disk`, `passthrough` and `console` tables of a domain, checked
/// ([`devs::check_specs`]); relative paths are joined to `base`.
fn check_devices(
    d: &RawDomain,
    base: &Path,
) -> Result<(Vec<DeviceSpec>, ConsoleSpec), ConfigError> {
    let err = |field: String, message: String| ConfigError::Device {
        domain: d.name.clone(),
        error: SpecError { field, message },
    };
    let mut devices = Vec::new();
    for (i, disk) in d.disk.iter().enumerate() {
        let field = || format!("disk #{}", i + 1);
        let create_size = match &disk.size {
            None => None,
            Some(s) => Some(raw_size(s).map_err(|m| err(field(), format!("size: {m}")))?),
        };
        let spec = DiskSpec {
            path: base.join(&disk.path),
            create_size,
            readonly: disk.readonly.unwrap_or(false),
        };
        devices.push(match disk.kind.as_deref() {
            None | Some("pv") => DeviceSpec::PvBlock(spec),
            Some("emulated") => DeviceSpec::EmuBlock(spec),
            Some(k) => {
                return Err(err(
                    field(),
                    format!("kind {k:?}: use \"pv\" or \"emulated\""),
                ))
            }
        });
    }
    // Passthrough regions follow the disks in the device table.
    for (i, r) in d.passthrough.iter().enumerate() {
        let size = raw_size(&r.size)
            .map_err(|m| err(format!("passthrough #{}", i + 1), format!("size: {m}")))?;
        devices.push(DeviceSpec::Passthrough(RegionSpec {
            path: base.join(&r.path),
            size,
            create: r.create.unwrap_or(false),
        }));
    }
    let console = match &d.console {
        None => ConsoleSpec::default(),
        Some(c) => ConsoleSpec {
            output: c.output.as_ref().map(|p| base.join(p)),
            input: match c.input.as_deref() {
                None => ConsoleInput::None,
                Some("stdin") | Some("-") => ConsoleInput::Stdin,
                Some("") => return Err(err("console.input".into(), "empty path".into())),
                Some(p) => ConsoleInput::File(base.join(p)),
            },
        },
    };
    devs::check_specs(&devices, &console).map_err(|error| ConfigError::Device {
        domain: d.name.clone(),
        error,
    })?;
    Ok((devices, console))
}

/// The exit status of `hv run --config` (SPEC.md §9.4): 100 if any domain crashed;
/// otherwise 1 if any could not run or was stopped by a host fault; otherwise the first
/// non-zero poweroff code in file order; otherwise 0 (every domain powered off with
/// code 0 or asked to reboot).
pub fn exit_code(results: &[DomainResult]) -> u8 {
    let outcomes = || {
        results
            .iter()
            .map(|r| r.report.as_ref().map(|r| &r.outcome))
    };
    if outcomes().any(|o| matches!(o, Ok(Outcome::Crash(_)))) {
        return EXIT_CRASH;
    }
    if outcomes().any(|o| o.is_err() || matches!(o, Ok(Outcome::HostFault(_)))) {
        return EXIT_INTERNAL;
    }
    outcomes()
        .filter_map(|o| o.ok().map(Outcome::exit_code))
        .find(|&c| c != 0)
        .unwrap_or(0)
}

/// The closing report: a header and one line per domain (name, id, run time, outcome).
pub fn summary(results: &[DomainResult]) -> String {
    let width = results
        .iter()
        .map(|r| r.name.len())
        .chain(["domain".len()])
        .max()
        .unwrap_or(0);
    let mut s = format!("{:width$}  {:>5}  {:>12}  outcome\n", "domain", "id", "ran");
    for r in results {
        let (ran, outcome) = match &r.report {
            Ok(rep) => (
                format!("{:.3} ms", rep.ran_for.as_secs_f64() * 1e3),
                rep.outcome.to_string(),
            ),
            Err(e) => ("-".to_string(), format!("could not run: {e}")),
        };
        s += &format!("{:width$}  {:>5}  {ran:>12}  {outcome}\n", r.name, r.domid);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{CrashReason, CrashReport};
    use crate::stats::ExitStats;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/cfg"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn full_schema_and_defaults() {
        let c = parse(
            r#"
            [[domain]]
            name = "ping"
            kernel = "k.elf"
            memory = "32M"
            vcpus = 2
            cmdline = "role=ping peer=pong"
            domid = 1
            allow_user_hypercalls = true
            [[domain]]
            name = "pong"
            kernel = "/abs/k.elf"
            memory = 8388608
            [[domain]]
            name = "third_3"
            [[connection]]
            between = ["ping", "pong"]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.domains[0],
            DomainSpec {
                name: "ping".into(),
                kernel: KernelSource::File("/cfg/k.elf".into()),
                domid: 1,
                mem_bytes: 32 << 20,
                vcpus: 2,
                cmdline: "role=ping peer=pong".into(),
                allow_user_hypercalls: true,
                devices: Vec::new(),
                console: ConsoleSpec::default(),
            }
        );
        assert_eq!(c.domains[1].kernel, KernelSource::File("/abs/k.elf".into()));
        assert_eq!(c.domains[1].mem_bytes, 8 << 20);
        // Lowest free ids from 1, skipping explicit ones.
        assert_eq!((c.domains[1].domid, c.domains[2].domid), (2, 3));
        let d = &c.domains[2];
        assert_eq!(d.kernel, KernelSource::Demo);
        assert_eq!((d.mem_bytes, d.vcpus), (DEFAULT_MEM_BYTES, 1));
        assert!(d.cmdline.is_empty() && !d.allow_user_hypercalls);
        assert_eq!(c.connections, [(0, 1)]);
    }

    #[test]
    fn default_ids_skip_explicit_ones() {
        let c = parse(
            "[[domain]]\nname = \"a\"\n[[domain]]\nname = \"b\"\ndomid = 1\n\
             [[domain]]\nname = \"c\"\ndomid = 0\n",
        )
        .unwrap();
        let ids: Vec<u32> = c.domains.iter().map(|d| d.domid).collect();
        assert_eq!(ids, [2, 1, 0]);
    }

    #[test]
    fn errors_name_the_domain_and_field() {
        let cases: &[(&str, &str)] = &[
            ("", "no domains"),
            ("[[domain]]\nname = \"a\"\nmemroy = \"1M\"\n", "unknown field `memroy`"),
            ("[[domain]]\nkernel = \"x\"\n", "missing field `name`"),
            ("[[domain]]\nname = \"a\"\n[[connection]]\nbetween = [\"a\", \"a\"]\nx = 1\n", "unknown field `x`"),
            ("[[domain]]\nname = \"a\"\n[[connection]]\nbetween = [\"a\", \"b\", \"c\"]\n", "connection #1: between has 3 names"),
            ("[[domain]]\nname = \"a\"\n[[connection]]\nbetween = []\n", "between has 0 names"),
            ("[[domain]]\nname = \"a\"\n[[connection]]\n", "missing field `between`"),
            ("[frobnicate]\n", "unknown field `frobnicate`"),
            ("[[domain]]\nname = \"a b\"\n", "domain #1: invalid name \"a b\""),
            ("[[domain]]\nname = \"\"\n", "invalid name \"\""),
            (&format!("[[domain]]\nname = \"{}\"\n", "x".repeat(33)), "invalid name"),
            ("[[domain]]\nname = \"a\"\n[[domain]]\nname = \"a\"\n", "domain \"a\" is defined twice"),
            ("[[domain]]\nname = \"a\"\ndomid = 3\n[[domain]]\nname = \"b\"\ndomid = 3\n", "domains \"a\" and \"b\" both have domain id 3"),
            ("[[domain]]\nname = \"a\"\ndomid = 32752\n", "domain \"a\": domid: 32752 is out of range"),
            ("[[domain]]\nname = \"a\"\nmemory = \"12X\"\n", "domain \"a\": memory: invalid size \"12X\""),
            ("[[domain]]\nname = \"a\"\nmemory = \"1M\"\n", "domain \"a\": memory: 1048576 bytes"),
            ("[[domain]]\nname = \"a\"\nmemory = 4097000\n", "domain \"a\": memory:"),
            ("[[domain]]\nname = \"a\"\nmemory = -1\n", "a size such as"),
            ("[[domain]]\nname = \"a\"\nmemory = true\n", "a size such as"),
            ("[[domain]]\nname = \"a\"\nvcpus = 0\n", "domain \"a\": vcpus: 0"),
            ("[[domain]]\nname = \"a\"\nvcpus = 33\n", "domain \"a\": vcpus: 33"),
            ("[[domain]]\nname = \"a\"\nkernel = \"\"\n", "domain \"a\": kernel: empty path"),
            ("[[domain]]\nname = \"a\"\ncmdline = \"a\\u0000b\"\n", "domain \"a\": cmdline:"),
            ("[[domain]]\nname = \"a\"\n[[connection]]\nbetween = [\"a\", \"b\"]\n", "connection #1: no domain is named \"b\""),
            ("[[domain]]\nname = \"a\"\n[[connection]]\nbetween = [\"a\", \"a\"]\n", "connection #1: domain \"a\" cannot be connected to itself"),
            ("[[domain]]\nname = \"a\"\n[[domain]]\nname = \"b\"\n[[connection]]\nbetween = [\"a\", \"b\"]\n[[connection]]\nbetween = [\"b\", \"a\"]\n", "connection #2: domains \"b\" and \"a\" are already connected"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text:?}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn too_many_domains() {
        let text: String = (0..=MAX_DOMAINS)
            .map(|i| format!("[[domain]]\nname = \"d{i}\"\n"))
            .collect();
        assert!(matches!(
            parse(&text),
            Err(ConfigError::TooManyDomains(n)) if n == MAX_DOMAINS + 1
        ));
        let text: String = (0..MAX_DOMAINS)
            .map(|i| format!("[[domain]]\nname = \"d{i}\"\n"))
            .collect();
        let c = parse(&text).unwrap();
        assert_eq!(
            c.domains.last().unwrap().domid,
            u32::try_from(MAX_DOMAINS).unwrap()
        );
    }

    #[test]
    fn cmdline_length_counts_connections() {
        let limit = hv_abi::start_info::CMDLINE_MAX - 1;
        let two = |len: usize| {
            format!(
                "[[domain]]\nname = \"a\"\ncmdline = \"{}\"\n[[domain]]\nname = \"b\"\n\
                 [[connection]]\nbetween = [\"a\", \"b\"]\n",
                "x".repeat(len)
            )
        };
        // " evtchn.b=4095 domid.b=2" is 24 bytes at most.
        assert!(parse(&two(limit - 24)).is_ok());
        let e = err(&two(limit - 23));
        assert!(
            e.contains("domain \"a\": cmdline:") && e.contains("connections append up to 24"),
            "{e}"
        );
        let one = format!(
            "[[domain]]\nname = \"a\"\ncmdline = \"{}\"\n",
            "x".repeat(limit)
        );
        assert!(parse(&one).is_ok());
    }

    #[test]
    fn device_and_console_tables() {
        let dir = std::env::temp_dir().join(format!("hv-config-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.img"), vec![0u8; 8192]).unwrap();
        std::fs::write(dir.join("in.txt"), b"hi\n").unwrap();
        let c = Config::parse(
            r#"
            [[domain]]
            name = "a"
            [[domain.disk]]
            path = "a.img"
            [[domain.disk]]
            path = "new.img"
            size = "1M"
            kind = "emulated"
            readonly = true
            [[domain.passthrough]]
            path = "r.bin"
            size = "2M"
            create = true
            [domain.console]
            output = "a.log"
            input = "in.txt"
            [[domain]]
            name = "b"
            [[domain.disk]]
            path = "new.img"
            size = 1048576
            readonly = true
            [domain.console]
            input = "stdin"
            "#,
            &dir,
        )
        .unwrap();
        let a = &c.domains[0];
        assert_eq!(
            a.devices,
            vec![
                DeviceSpec::PvBlock(DiskSpec {
                    path: dir.join("a.img"),
                    create_size: None,
                    readonly: false
                }),
                DeviceSpec::EmuBlock(DiskSpec {
                    path: dir.join("new.img"),
                    create_size: Some(1 << 20),
                    readonly: true
                }),
                DeviceSpec::Passthrough(RegionSpec {
                    path: dir.join("r.bin"),
                    size: 2 << 20,
                    create: true
                }),
            ]
        );
        assert_eq!(
            a.console,
            ConsoleSpec {
                output: Some(dir.join("a.log")),
                input: ConsoleInput::File(dir.join("in.txt")),
            }
        );
        assert_eq!(c.domains[1].console.input, ConsoleInput::Stdin);

        let err = |t: &str| Config::parse(t, &dir).expect_err(t).to_string();
        let dom = |name: &str, body: &str| format!("[[domain]]\nname = \"{name}\"\n{body}");
        let cases = [
            (
                dom("a", "[[domain.disk]]\npath = \"missing.img\"\n"),
                "domain \"a\": disk #1: ",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"missing.img\"\n"),
                "does not exist (give a size to create it)",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"x.img\"\nsize = \"12X\"\n"),
                "disk #1: size: invalid size",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"x.img\"\nsize = 1000\n"),
                "size 1000 bytes",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"a.img\"\nkind = \"fast\"\n"),
                "disk #1: kind \"fast\"",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"a.img\"\nspeed = 1\n"),
                "unknown field `speed`",
            ),
            (
                dom(
                    "a",
                    "[[domain.passthrough]]\npath = \"r.bin\"\nsize = \"2M\"\n",
                ),
                "passthrough #1: ",
            ),
            (
                dom(
                    "a",
                    "[[domain.passthrough]]\npath = \"r.bin\"\nsize = 100\ncreate = true\n",
                ),
                "size 100",
            ),
            (
                dom("a", "[domain.console]\ninput = \"nope.txt\"\n"),
                "domain \"a\": console.input: cannot open",
            ),
            (
                dom("a", "[domain.console]\noutput = \"no/such/dir/x\"\n"),
                "console.output: cannot create",
            ),
            (
                dom("a", "[[domain.disk]]\npath = \"a.img\"\n")
                    + &dom(
                        "b",
                        "[[domain.disk]]\npath = \"./a.img\"\nreadonly = true\n",
                    ),
                "is used by domains \"a\" and \"b\"",
            ),
            (
                dom(
                    "a",
                    "[[domain.passthrough]]\npath = \"r.bin\"\nsize = \"2M\"\ncreate = true\n",
                ) + &dom(
                    "b",
                    "[[domain.passthrough]]\npath = \"r.bin\"\nsize = \"4K\"\ncreate = true\n",
                ),
                "given to both a and b",
            ),
            (
                dom("a", "[domain.console]\ninput = \"stdin\"\n")
                    + &dom("b", "[domain.console]\ninput = \"-\"\n"),
                "both read standard input",
            ),
            (
                dom("a", "[domain.console]\noutput = \"o.log\"\n")
                    + &dom("b", "[domain.console]\noutput = \"o.log\"\n"),
                "both write their console to",
            ),
        ];
        for (text, want) in &cases {
            let got = err(text);
            assert!(got.contains(want), "{text:?}: {got:?} lacks {want:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kernels_are_read_once_and_checked() {
        let dir = std::env::temp_dir().join(format!("hv-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.elf"), b"not an ELF").unwrap();
        let c = Config::parse("[[domain]]\nname = \"a\"\nkernel = \"junk.elf\"\n", &dir).unwrap();
        let e = c.load_kernels(b"").unwrap_err().to_string();
        assert!(
            e.starts_with("domain \"a\": kernel ") && e.contains("junk.elf refused"),
            "{e}"
        );
        let c =
            Config::parse("[[domain]]\nname = \"a\"\nkernel = \"missing.elf\"\n", &dir).unwrap();
        let e = c.load_kernels(b"").unwrap_err().to_string();
        assert!(
            e.contains("domain \"a\": cannot read kernel") && e.contains("missing.elf"),
            "{e}"
        );
        let c = parse("[[domain]]\nname = \"a\"\n").unwrap();
        assert!(matches!(c.load_kernels(b""), Err(ConfigError::NoDemoKernel(n)) if n == "a"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(feature = "demo-kernel")]
    #[test]
    fn demo_kernel_is_parsed_once_for_every_domain() {
        let c =
            parse("[[domain]]\nname = \"a\"\n[[domain]]\nname = \"b\"\n[[domain]]\nname = \"c\"\n")
                .unwrap();
        let k = c.load_kernels(crate::DEMO_KERNEL).unwrap();
        assert_eq!(k.len(), 1);
        assert!(k.get(&KernelSource::Demo).is_some());
    }

    fn result(name: &str, domid: u32, outcome: Option<Outcome>) -> DomainResult {
        DomainResult {
            name: name.into(),
            domid,
            report: match outcome {
                Some(outcome) => Ok(crate::domain::DomainReport {
                    name: name.into(),
                    outcome,
                    stats: ExitStats::default(),
                    created_in: Duration::from_millis(1),
                    ran_for: Duration::from_micros(12_345),
                    vcpu_pauses: 0,
                }),
                None => Err(DomainError::Thread(std::io::Error::other("no threads"))),
            },
        }
    }

    fn crash() -> Outcome {
        Outcome::Crash(Box::new(CrashReport::without_regs(
            0,
            CrashReason::GuestCrash,
        )))
    }

    fn host_fault() -> Outcome {
        Outcome::HostFault(Box::new(crate::outcome::HostFault {
            vcpu: 0,
            kvm_errno: Some(libc::EFAULT),
            gpa: None,
            memory: Some(crate::outcome::HostMemory::Ram),
        }))
    }

    #[test]
    fn exit_status_rule() {
        let off = |code| Some(Outcome::Poweroff { code });
        let code = |v: Vec<DomainResult>| exit_code(&v);
        assert_eq!(
            code(vec![
                result("a", 1, off(0)),
                result("b", 2, Some(Outcome::Reboot))
            ]),
            0
        );
        assert_eq!(
            code(vec![
                result("a", 1, off(0)),
                result("b", 2, off(5)),
                result("c", 3, off(7))
            ]),
            5
        );
        assert_eq!(code(vec![result("a", 1, off(5)), result("b", 2, None)]), 1);
        assert_eq!(
            code(vec![
                result("a", 1, off(5)),
                result("b", 2, None),
                result("c", 3, Some(crash()))
            ]),
            100
        );
        // A host fault is the host's failure: 1, before any poweroff code; a crash
        // still outranks it.
        assert_eq!(
            code(vec![
                result("a", 1, off(5)),
                result("b", 2, Some(host_fault()))
            ]),
            1
        );
        assert_eq!(
            code(vec![
                result("a", 1, Some(host_fault())),
                result("b", 2, Some(crash()))
            ]),
            100
        );
    }

    #[test]
    fn summary_has_a_line_per_domain() {
        let s = summary(&[
            result("ping", 1, Some(Outcome::Poweroff { code: 0 })),
            result("a-long-domain-name", 12, Some(crash())),
            result("x", 3, None),
        ]);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4, "{s}");
        assert!(lines[0].starts_with("domain ") && lines[0].ends_with("outcome"));
        assert!(
            lines[1].starts_with("ping ")
                && lines[1].contains(" 1  ")
                && lines[1].contains("12.345 ms  powered off with code 0"),
            "{s}"
        );
        assert!(
            lines[2].starts_with("a-long-domain-name     12")
                && lines[2].contains("crashed: the guest reported a crash"),
            "{s}"
        );
        assert!(
            lines[3].contains("could not run: cannot start a vCPU thread: no threads"),
            "{s}"
        );
    }
}
