//! `hv`: run paravirtual guest kernels on KVM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hv_core::config::{self, Config, ConfigError};
use hv_core::devices::passthrough::RegionSpec;
use hv_core::devices::{ConsoleInput, ConsoleSpec, DeviceSpec};
use hv_core::hypervisor::{DomainResult, Hypervisor};
use hv_core::outcome::{EXIT_INTERNAL, EXIT_USAGE};
use hv_core::signals::ShutdownSignals;
use hv_core::{bench, cli, domain, ConsoleSink, DomainConfig, DomainError, KernelImage};

/// What `hv version` and `hv --version` print: hv's version, the ABI version and the
/// feature bits this build implements.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (ABI {}.{}, features {})",
        env!("CARGO_PKG_VERSION"),
        hv_abi::ABI_MAJOR,
        hv_abi::ABI_MINOR,
        hv_core::FEATURES
    )
});

#[derive(Parser)]
#[command(
    name = "hv",
    version = VERSION.as_str(),
    about = "hv: a paravirtual hypervisor on KVM",
    after_help = "Examples:\n  hv run                        run the embedded demo kernel\n  hv run kernel.elf --mem 128M --vcpus 2 --cmdline 'quiet' --stats\n  hv run kernel.elf --disk disk.img,size=64M --console-input -   a PV disk, console input from stdin\n  hv run --config examples/pingpong.toml   several domains from a TOML file\n  hv version                    ABI version and features\n  hv bench --json               all benchmarks, as JSON\n  hv bench null_hypercall exit_floor\n  hv bench density --domains 200   density with 200 idle domains\n\nExit status of `hv run`: the guest's poweroff code (0-99); 0 on a reboot request;\n100 if the domain crashed; 2 for bad arguments or a refused kernel; 1 for an\ninternal error or a host fault (e.g. a passthrough file that cannot be backed); 128+N when stopped by signal N (130 SIGINT, 143 SIGTERM: every\ndomain is stopped, the summary printed). With --config: 100 if any domain crashed, else 1 if one could not run or hit a host\nfault, else the first non-zero poweroff code in file order, else 0. Set RUST_LOG (for example RUST_LOG=hv_core=debug) for traces."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest kernel (the embedded demo kernel if none is given), or the domains
    /// of a configuration file.
    Run {
        /// ELF kernel built for hv (with the hv ABI note).
        kernel: Option<PathBuf>,
        /// Run the domains and connections of a TOML file instead (SPEC.md 9.4).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = [
                "kernel", "mem", "vcpus", "cmdline", "allow_user_hypercalls", "disk",
                "passthrough", "console_output", "console_input"
            ]
        )]
        config: Option<PathBuf>,
        /// Guest RAM: bytes or with a K/M/G suffix; a multiple of 4 KiB from 2M to 256G.
        #[arg(long, default_value = "64M", value_parser = cli::parse_size)]
        mem: u64,
        /// Number of vCPUs (1-32).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Print exit statistics when the domain (each domain) ends.
        #[arg(long)]
        stats: bool,
        /// Allow hypercalls from guest CPL 3.
        #[arg(long)]
        allow_user_hypercalls: bool,
        /// A disk (repeatable): PATH[,size=64M][,emulated][,readonly]. A PV block device
        /// over the raw image PATH (created with `size` bytes if missing), or an emulated
        /// one with `emulated`.
        #[arg(long, value_name = "PATH[,OPTIONS]", value_parser = cli::parse_disk)]
        disk: Vec<DeviceSpec>,
        /// A passthrough region (repeatable): PATH,size=2M[,create]: the first `size`
        /// bytes of the file, mapped into the guest (created if missing with `create`).
        #[arg(long, value_name = "PATH,size=N[,create]", value_parser = cli::parse_passthrough)]
        passthrough: Vec<RegionSpec>,
        /// Write the domain's console output to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        console_output: Option<PathBuf>,
        /// Feed the PV console's input from FILE, or from standard input with `-`.
        #[arg(long, value_name = "FILE|-", value_parser = cli::parse_console_input)]
        console_input: Option<ConsoleInput>,
    },
    /// Print the hypervisor's ABI version and features.
    Version,
    /// Run benchmarks on real KVM.
    Bench {
        /// Benchmarks to run (all if none): exit_floor, null_hypercall, kvm_create_floor,
        /// domain_boot, mmu_trapped_write, mmu_batch_512, irq_floor, evtchn_pingpong,
        /// evtchn_pingpong_poll, memcpy_4k, grant_copy_4k, grant_map_unmap,
        /// blk_host_seq_write, blk_passthrough_seq_write, blk_pv_seq_write,
        /// blk_emulated_seq_write, blk_host_4k_iops, blk_pv_4k_iops, density (density
        /// boots --domains idle demo domains of 4 MiB, ~10 s for 1000, and reports its
        /// density_* rows).
        names: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Domains the density benchmark boots.
        #[arg(long, default_value_t = bench::DENSITY_DOMAINS)]
        domains: usize,
    },
    /// Print a shell completion script for hv (e.g. `hv completions bash >
    /// /etc/bash_completion.d/hv`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print hv's manual page (roff), e.g. `hv man | man -l -`.
    Man,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Each domain holds a few descriptors (hv_core::fdlimit): the default soft limit of
    // 1024 would stop near 250 domains.
    match hv_core::fdlimit::raise_soft_limit() {
        Ok(l) => tracing::debug!(%l, "RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE to its hard limit"),
    }
    let cli = Cli::parse();
    // `hv run` takes SIGINT and SIGTERM on a thread of its own (hv_core::signals); the
    // signals are blocked before any other thread exists.
    let signals = match &cli.command {
        Command::Run { .. } => match ShutdownSignals::install() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("hv: {e}");
                return ExitCode::from(EXIT_INTERNAL);
            }
        },
        _ => None,
    };
    let code = match cli.command {
        Command::Run {
            config: Some(path),
            stats,
            ..
        } => run_config(&path, stats, signals.as_ref()),
        Command::Run {
            kernel,
            config: None,
            mem,
            vcpus,
            cmdline,
            stats,
            allow_user_hypercalls,
            disk,
            passthrough,
            console_output,
            console_input,
        } => {
            let mut devices = disk;
            devices.extend(passthrough.into_iter().map(DeviceSpec::Passthrough));
            let console_spec = ConsoleSpec {
                output: console_output,
                input: console_input.unwrap_or_default(),
            };
            if let Err(e) = hv_core::devices::check_specs(&devices, &console_spec) {
                eprintln!("hv: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
            let config = DomainConfig {
                name: kernel
                    .as_ref()
                    .and_then(|p| p.file_name())
                    .map_or("demo".into(), |n| n.to_string_lossy().into_owned()),
                mem_bytes: mem,
                vcpus,
                cmdline,
                allow_user_hypercalls,
                console: ConsoleSink::Stdout,
                devices,
                console_spec,
                ..DomainConfig::default()
            };
            run(kernel, config, stats, signals.as_ref())
        }
        Command::Version => {
            println!("hv {}", *VERSION);
            0
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "hv", &mut std::io::stdout());
            0
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("hv: cannot write the manual page: {e}");
                    EXIT_INTERNAL
                }
            }
        }
        Command::Bench {
            names,
            json,
            domains,
        } => match bench::run_with(
            &names,
            &bench::BenchOptions {
                density_domains: domains,
            },
        ) {
            Ok(results) => {
                if json {
                    println!("{}", bench::to_json(&results));
                } else {
                    print!("{}", bench::to_table(&results));
                }
                0
            }
            Err(e) => {
                eprintln!("hv bench: {e}");
                if e.is_user_error() {
                    EXIT_USAGE
                } else {
                    EXIT_INTERNAL
                }
            }
        },
    };
    // A stopping signal outranks the domains' outcomes (the summary is printed already).
    ExitCode::from(
        signals
            .and_then(|s| s.received())
            .map_or(code, hv_core::signals::exit_status),
    )
}

/// `hv run --config FILE`: checks the whole file and every kernel, creates and connects
/// the domains, runs them together (console lines prefixed with the domain's name) and
/// prints a summary to stderr.
fn run_config(path: &Path, stats: bool, signals: Option<&ShutdownSignals>) -> u8 {
    let fail = |e: ConfigError| {
        eprintln!("hv: {}: {e}", path.display());
        if e.is_user_error() {
            EXIT_USAGE
        } else {
            EXIT_INTERNAL
        }
    };
    let cfg = match Config::from_file(path) {
        Ok(c) => c,
        Err(e @ ConfigError::Read { .. }) => {
            eprintln!("hv: {e}");
            return EXIT_USAGE;
        }
        Err(e) => return fail(e),
    };
    let kernels = match cfg.load_kernels(hv_core::DEMO_KERNEL) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let kvm = match domain::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("hv: {e}");
            return EXIT_INTERNAL;
        }
    };
    let hv = match cfg.build(kvm, &kernels, |d| {
        ConsoleSink::PrefixedStdout(Arc::from(d.name.as_str()))
    }) {
        Ok(hv) => hv,
        Err(e) => return fail(e),
    };
    let results = run_all(hv, signals);
    for r in &results {
        match &r.report {
            Ok(report) => print_end(report, &format!("{} (id {})", r.name, r.domid), stats),
            Err(e) => eprintln!("hv: domain {} could not run: {e}", r.name),
        }
    }
    eprint!("{}", config::summary(&results));
    config::exit_code(&results)
}

/// Runs every domain of `hv` until all have ended, stopping them all if a stopping
/// signal arrives (hv_core::signals).
fn run_all(hv: Hypervisor, signals: Option<&ShutdownSignals>) -> Vec<DomainResult> {
    let running = hv.start();
    if let Some(s) = signals {
        s.watch(running.domains());
    }
    running.wait()
}

fn run(
    kernel: Option<PathBuf>,
    config: DomainConfig,
    stats: bool,
    signals: Option<&ShutdownSignals>,
) -> u8 {
    let what = kernel
        .as_ref()
        .map_or("the demo kernel".into(), |p| p.display().to_string());
    let fail = |e: DomainError| {
        eprintln!("hv: cannot run {what}: {e}");
        if e.is_user_error() {
            EXIT_USAGE
        } else {
            EXIT_INTERNAL
        }
    };
    let bytes = match &kernel {
        Some(p) => match std::fs::read(p) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("hv: cannot read kernel {}: {e}", p.display());
                return EXIT_USAGE;
            }
        },
        None => hv_core::DEMO_KERNEL.to_vec(),
    };
    let kvm = match domain::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("hv: {e}");
            return EXIT_INTERNAL;
        }
    };
    let image = match KernelImage::from_elf(&bytes) {
        Ok(i) => i,
        Err(e) => return fail(e.into()),
    };
    let mut hv = Hypervisor::new(kvm);
    if let Err(e) = hv.create_domain(config, &image) {
        return fail(e);
    }
    let results = run_all(hv, signals);
    let Some(result) = results.first() else {
        return EXIT_INTERNAL;
    };
    let report = match &result.report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hv: cannot run {what}: {e}");
            return if e.is_user_error() {
                EXIT_USAGE
            } else {
                EXIT_INTERNAL
            };
        }
    };
    print_end(report, &report.name, stats);
    // Stopped by a signal: the same summary as with --config.
    if signals.is_some_and(|s| s.received().is_some()) {
        eprint!("{}", config::summary(&results));
    }
    report.outcome.exit_code()
}

/// What `hv run` prints on stderr when a domain has ended: its crash report or host
/// fault, and with `--stats` its outcome, times and statistics under `label`.
fn print_end(report: &hv_core::DomainReport, label: &str, stats: bool) {
    if let Some(c) = report.outcome.crash() {
        eprintln!("hv: domain {} crashed\n{c}", report.name);
    }
    if let Some(h) = report.outcome.host_fault() {
        eprintln!("hv: domain {} stopped by a host fault: {h}", report.name);
    }
    if stats {
        eprintln!(
            "domain {label}: {} (created in {:.3} ms, ran {:.3} ms)\n{}",
            report.outcome,
            report.created_in.as_secs_f64() * 1e3,
            report.ran_for.as_secs_f64() * 1e3,
            report.stats
        );
    }
}
