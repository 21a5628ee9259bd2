//! The density benchmark: boot many idle domains in one hypervisor and measure the boot
//! rate, the host memory each costs beyond the guest RAM it touched, and the CPU the
//! idle domains use.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde::Serialize;
use thiserror::Error;

use crate::console::ConsoleSink;
use crate::domain::{DomainConfig, DomainError};
use crate::hypervisor::Hypervisor;
use crate::loader::KernelImage;
use crate::outcome::Outcome;

/// Errors of the density benchmark.
#[derive(Debug, Error)]
pub enum DensityError {
    /// More domains than domain ids.
    #[error("{0} domains: more than there are domain ids")]
    TooMany(usize),
    /// A domain could not be created.
    #[error("creating domain {index}: {source}")]
    Create {
        /// Which domain (0-based).
        index: usize,
        /// Why.
        #[source]
        source: DomainError,
    },
    /// The domains did not all reach their idle loop in time.
    #[error("only {sleeping} of {n} domains went idle within {secs} s")]
    NotIdle {
        /// Domains sleeping.
        sleeping: usize,
        /// Domains started.
        n: usize,
        /// Seconds waited.
        secs: u64,
    },
    /// A domain ended some other way than being destroyed.
    #[error("domain {name} ended unexpectedly: {what}")]
    Ended {
        /// The domain.
        name: String,
        /// Its outcome or error.
        what: String,
    },
    /// /proc could not be read.
    #[error("reading {0}: {1}")]
    Proc(&'static str, std::io::Error),
}

/// What one density run measured.
#[derive(Clone, Debug, Serialize)]
pub struct DensityReport {
    /// Domains booted.
    pub domains: usize,
    /// Guest RAM per domain (bytes).
    pub guest_ram_bytes: u64,
    /// Time to create all domains (not running yet).
    pub create_s: f64,
    /// Time from the first creation until every domain sleeps in its idle loop.
    pub boot_all_s: f64,
    /// Domains booted per second (domains / boot_all_s).
    pub boot_rate_per_s: f64,
    /// Guest RAM the domains actually touched, per domain (KiB; memfd pages allocated).
    pub touched_kib_per_domain: f64,
    /// Host memory used per domain beyond the touched guest RAM (KiB): the drop of the
    /// host's MemAvailable, minus touched guest RAM, divided by the domains.
    pub overhead_kib_per_domain: f64,
    /// The hypervisor process's resident set growth per domain (KiB; includes touched
    /// guest RAM).
    pub rss_kib_per_domain: f64,
    /// CPU used by the whole process while every domain idles, in percent of one core.
    pub idle_cpu_percent: f64,
    /// Time to destroy all domains and join their threads.
    pub teardown_s: f64,
}

fn meminfo_available_kib() -> Result<u64, DensityError> {
    let s = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| DensityError::Proc("/proc/meminfo", e))?;
    Ok(s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

fn rss_kib() -> Result<u64, DensityError> {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| DensityError::Proc("/proc/self/status", e))?;
    Ok(s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// CPU time (user + system) of the whole process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass; no other preconditions.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    // getrusage reports non-negative times with tv_usec < 1 000 000; anything else
    // counts as zero.
    let tv = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0).min(999_999) * 1000,
        )
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Bytes of a memfd actually allocated (touched).
fn allocated_bytes(f: &std::fs::File) -> u64 {
    // SAFETY: fstat writes into the zeroed struct; the fd is open for the File's life.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(f.as_raw_fd(), &mut st) != 0 {
            return 0;
        }
        u64::try_from(st.st_blocks).unwrap_or(0) * 512
    }
}

/// Boots `n` domains of `image` with command line `cmdline` and `mem_bytes` of RAM each,
/// waits until each has a vCPU sleeping in `SCHEDOP_BLOCK`, measures, and destroys them.
pub fn run(
    kvm: Kvm,
    image: &KernelImage,
    cmdline: &str,
    n: usize,
    mem_bytes: u64,
    idle_window: Duration,
) -> Result<DensityReport, DensityError> {
    let avail0 = meminfo_available_kib()?;
    let rss0 = rss_kib()?;
    let t0 = Instant::now();
    let mut hv = Hypervisor::new(kvm);
    for i in 0..n {
        let config = DomainConfig {
            name: format!("idle{i}"),
            domid: u32::try_from(i + 1).map_err(|_| DensityError::TooMany(n))?,
            mem_bytes,
            cmdline: cmdline.into(),
            console: ConsoleSink::Discard,
            ..DomainConfig::default()
        };
        hv.create_domain(config, image)
            .map_err(|source| DensityError::Create { index: i, source })?;
    }
    let create = t0.elapsed();
    let running = hv.start();
    let deadline = Duration::from_secs(60 + n as u64 / 10);
    let sleeping = |r: &crate::hypervisor::Running| {
        r.domains()
            .filter(|d| d.sleeping.load(std::sync::atomic::Ordering::Acquire) > 0)
            .count()
    };
    loop {
        let s = sleeping(&running);
        if s == n {
            break;
        }
        if t0.elapsed() > deadline {
            running.destroy_all();
            let _ = running.wait();
            return Err(DensityError::NotIdle {
                sleeping: s,
                n,
                secs: deadline.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let boot_all = t0.elapsed();
    // Let the last domains' start-up settle, then measure an idle window.
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = process_cpu();
    let w0 = Instant::now();
    std::thread::sleep(idle_window);
    let idle_cpu = (process_cpu() - cpu0).as_secs_f64() / w0.elapsed().as_secs_f64();
    let touched: u64 = running
        .domains()
        .map(|d| allocated_bytes(d.mem.memfd()))
        .sum();
    let avail1 = meminfo_available_kib()?;
    let rss1 = rss_kib()?;
    let t1 = Instant::now();
    running.destroy_all();
    let results = running.wait();
    let teardown = t1.elapsed();
    for r in results {
        match r.report {
            Ok(rep) if matches!(rep.outcome, Outcome::Destroyed) => {}
            Ok(rep) => {
                return Err(DensityError::Ended {
                    name: r.name,
                    what: rep.outcome.to_string(),
                })
            }
            Err(e) => {
                return Err(DensityError::Ended {
                    name: r.name,
                    what: e.to_string(),
                })
            }
        }
    }
    let nf = n as f64;
    let used_kib = avail0.saturating_sub(avail1) as f64;
    let touched_kib = touched as f64 / 1024.0;
    Ok(DensityReport {
        domains: n,
        guest_ram_bytes: mem_bytes,
        create_s: create.as_secs_f64(),
        boot_all_s: boot_all.as_secs_f64(),
        boot_rate_per_s: nf / boot_all.as_secs_f64(),
        touched_kib_per_domain: touched_kib / nf,
        overhead_kib_per_domain: (used_kib - touched_kib) / nf,
        rss_kib_per_domain: rss1.saturating_sub(rss0) as f64 / nf,
        idle_cpu_percent: idle_cpu * 100.0,
        teardown_s: teardown.as_secs_f64(),
    })
}
