//! Boot: validating start_info and the version/feature handshake.
//!
//! The hypervisor enters the kernel at `_start` (defined by [`crate::entry!`]) in
//! 64-bit mode with interrupts off and no IDT, RDI = the guest-physical address of the
//! start_info page ([`hv_abi::layout::START_INFO_GPA`]), RSP = 8 bytes below the top of
//! the boot stack (aligned as right after a `call`), the boot GDT (CS = 0x08,
//! DS/ES/SS/FS/GS = 0x10) and TR = 0x28 (boot TSS, `rsp0` = top of the boot stack).
//! Memory starts zeroed, so `.bss` needs no clearing.

use core::fmt;

use hv_abi::start_info::START_INFO_MAGIC;
use hv_abi::{Features, ABI_MAJOR};

pub use hv_abi::start_info::StartInfo;

/// Why [`init`] refused to continue. Every variant names both sides of the mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The start_info address is null or not 8-byte aligned.
    BadStartInfoAddress(u64),
    /// The start_info page does not begin with [`START_INFO_MAGIC`].
    BadMagic {
        /// The value found.
        found: u64,
        /// The value expected.
        expected: u64,
    },
    /// start_info names an ABI major version other than the kernel's.
    StartInfoMajor {
        /// The major version in start_info.
        hypervisor: u16,
        /// The major version the kernel was built for.
        kernel: u16,
    },
    /// The version hypercall failed.
    VersionHypercall(crate::Error),
    /// The features hypercall failed.
    FeaturesHypercall(crate::Error),
    /// The hypervisor implements another ABI major version.
    AbiMajor {
        /// The hypervisor's major version.
        hypervisor: u16,
        /// The kernel's major version.
        kernel: u16,
    },
    /// The hypervisor implements an older ABI minor version than the kernel needs.
    AbiMinor {
        /// The hypervisor's minor version.
        hypervisor: u16,
        /// The minor version the kernel needs.
        kernel: u16,
    },
    /// The hypervisor lacks features the kernel requires.
    MissingFeatures {
        /// The features the kernel requires.
        required: Features,
        /// The features the hypervisor implements.
        available: Features,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InitError::BadStartInfoAddress(a) => write!(f, "bad start_info address {a:#x}"),
            InitError::BadMagic { found, expected } => {
                write!(
                    f,
                    "bad start_info magic {found:#x} (expected {expected:#x})"
                )
            }
            InitError::StartInfoMajor { hypervisor, kernel } => write!(
                f,
                "start_info ABI major {hypervisor}, kernel built for major {kernel}"
            ),
            InitError::VersionHypercall(e) => write!(f, "version hypercall failed: {e}"),
            InitError::FeaturesHypercall(e) => write!(f, "features hypercall failed: {e}"),
            InitError::AbiMajor { hypervisor, kernel } => write!(
                f,
                "hypervisor ABI major {hypervisor}, kernel built for major {kernel}"
            ),
            InitError::AbiMinor { hypervisor, kernel } => write!(
                f,
                "hypervisor ABI minor {hypervisor} older than the kernel's {kernel}"
            ),
            InitError::MissingFeatures {
                required,
                available,
            } => write!(
                f,
                "kernel requires features {required}, hypervisor has {available} (missing {})",
                required.missing_from(available)
            ),
        }
    }
}

/// Validates the start_info page and checks that the hypervisor speaks the kernel's
/// ABI: same major version (in start_info and from `version(VERSION_GET)`), minor
/// version at least `built_minor`, and every feature of `required`
/// (`version(VERSION_FEATURES)`). Returns the start_info page.
///
/// Costs two hypercalls and no formatting on success.
///
/// # Safety
///
/// `start_info_gpa` must be the value the hypervisor passed in RDI at entry, the boot
/// identity map must still be in place, and nothing may write the start_info page for
/// the rest of the kernel's life (it is handed out as `&'static`).
pub unsafe fn init(
    start_info_gpa: u64,
    required: Features,
    built_minor: u16,
) -> Result<&'static StartInfo, InitError> {
    if start_info_gpa == 0 || start_info_gpa % 8 != 0 {
        return Err(InitError::BadStartInfoAddress(start_info_gpa));
    }
    // SAFETY: the caller guarantees the address is the hypervisor's start_info page,
    // identity-mapped, 4096 bytes, aligned, and never written again.
    let si: &'static StartInfo = unsafe { &*(start_info_gpa as *const StartInfo) };
    if si.magic != START_INFO_MAGIC {
        return Err(InitError::BadMagic {
            found: si.magic,
            expected: START_INFO_MAGIC,
        });
    }
    if si.abi_major != ABI_MAJOR {
        return Err(InitError::StartInfoMajor {
            hypervisor: si.abi_major,
            kernel: ABI_MAJOR,
        });
    }
    let (major, minor) = crate::ops::version().map_err(InitError::VersionHypercall)?;
    if major != ABI_MAJOR {
        return Err(InitError::AbiMajor {
            hypervisor: major,
            kernel: ABI_MAJOR,
        });
    }
    if minor < built_minor {
        return Err(InitError::AbiMinor {
            hypervisor: minor,
            kernel: built_minor,
        });
    }
    let available = crate::ops::features().map_err(InitError::FeaturesHypercall)?;
    if !available.contains(required) {
        return Err(InitError::MissingFeatures {
            required,
            available,
        });
    }
    Ok(si)
}

/// What [`crate::entry!`]'s `_start` does: [`init`], then `main` on success; on
/// failure prints `hv guest: cannot boot: <error>` and shuts down with reason crash.
///
/// # Safety
///
/// As for [`init`]: call it once, from the kernel entry point, with the value of RDI.
#[inline(always)]
pub unsafe fn start(
    start_info_gpa: u64,
    required: Features,
    built_minor: u16,
    main: fn(&'static StartInfo) -> !,
) -> ! {
    early_console(start_info_gpa);
    // SAFETY: forwarded from the caller.
    match unsafe { init(start_info_gpa, required, built_minor) } {
        Ok(si) => main(si),
        Err(e) => boot_failed(e),
    }
}

/// Before any hypercall: if the command line has the word `console=uart`, sends the
/// SDK's output to the UART ([`crate::console::use_uart`]), so that even the messages
/// of a failed ABI check go there. Reads start_info only if it is where the hypervisor
/// puts it and carries the magic.
fn early_console(start_info_gpa: u64) {
    if start_info_gpa != hv_abi::layout::START_INFO_GPA {
        return;
    }
    // SAFETY: the boot identity map covers the start_info page (the caller of `start`
    // guarantees the address is the hypervisor's); it is only read.
    let si = unsafe { &*(start_info_gpa as *const StartInfo) };
    if si.magic == START_INFO_MAGIC
        && crate::cmdline::words(si.cmdline_bytes()).any(|w| w == b"console=uart")
    {
        crate::console::use_uart(crate::uart::Uart::com1());
    }
}

/// Reports a failed [`init`] and crashes the domain. When the failure means the
/// hypervisor does not speak this kernel's ABI major version (bad start_info, a failing
/// or foreign version hypercall), its console hypercall cannot be trusted either: the
/// report goes to the UART.
#[cold]
#[inline(never)]
fn boot_failed(e: InitError) -> ! {
    let foreign = !matches!(
        e,
        InitError::AbiMinor { .. } | InitError::MissingFeatures { .. }
    );
    if foreign {
        crate::console::use_uart(crate::uart::Uart::com1());
    }
    crate::println!("hv guest: cannot boot: {}", e);
    crate::crash()
}
