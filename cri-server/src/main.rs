//! `cri-systemd`: the daemon's command line. The work is in the `cri_server` library (src/lib.rs);
//! this file only parses the arguments and dispatches, keeping the init steps single-threaded.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cri_server::config::Config;
use cri_server::{logging, measurements, otel, preflight, server};

#[derive(Debug, Parser)]
#[command(name = "cri-systemd", version, about = "A Kubernetes container runtime (CRI) on systemd")]
struct Cli {
    /// Config file [default: /etc/cri-systemd/config.toml, used only if it exists].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Drop-in directory: its *.toml files are merged over the config file in name order
    /// [default: config.d beside the config file, /etc/cri-systemd/config.d].
    #[arg(long, global = true, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CRI on the configured socket (what runs when no command is given).
    Serve,
    /// Print the effective configuration (the file and its drop-ins merged over the defaults) as
    /// TOML, after a comment line naming the files read.
    Config {
        /// Print the built-in defaults instead, ignoring any config file.
        #[arg(long)]
        default: bool,
    },
    /// Check this node: what works, what does not and what to do, one line a check. Exits 1 only
    /// when a finding blocks pods.
    Check {
        /// Print the findings as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measured starts: the log of container starts (`[measurements]`).
    Measurements {
        #[command(subcommand)]
        command: MeasurementsCommand,
    },
    /// The ExecStopPost of a container unit: record how the container ended in FILE.
    #[command(hide = true, name = "record-exit")]
    RecordExit { file: PathBuf },
    /// The ExecStart of the pod init unit of a pod that shares one PID namespace: join the pod's
    /// namespaces, become PID 1 of a new PID namespace, reap zombies until SIGTERM.
    #[command(hide = true, name = "pod-init")]
    PodInit {
        #[arg(long)]
        net: Option<PathBuf>,
        #[arg(long)]
        ipc: Option<PathBuf>,
        #[arg(long)]
        uts: Option<PathBuf>,
        #[arg(long)]
        user: Option<PathBuf>,
        /// The daemon's pod mount namespace, where the IPC, UTS and user pins are.
        #[arg(long)]
        pod_mounts: Option<PathBuf>,
    },
    /// The ExecStart of a container restored from a checkpoint: mount its root, exec CRIU.
    #[command(hide = true, name = "restore-in")]
    RestoreIn { init_spec: PathBuf, restore_dir: PathBuf, criu: PathBuf },
}

#[derive(Debug, Subcommand)]
enum MeasurementsCommand {
    /// Replay the log: numbering, hash chain, PCR values; with a TPM (the config's, or --tcti),
    /// compare the PCR with the replay. Prints each problem with its record's position; exits 1
    /// when anything does not verify, 2 when the log or the TPM cannot be read.
    Verify {
        /// The log [default: the config's `measurements.log`].
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// The TPM to compare with, as tpm2-tss names a TCTI [default: the config's
        /// `measurements.tcti` when `measurements.tpm` is on].
        #[arg(long)]
        tcti: Option<String>,
        /// Do not compare with a TPM, whatever the config says.
        #[arg(long, conflicts_with = "tcti")]
        no_tpm: bool,
    },
}

fn main() -> ExitCode {
    // `init` (a container unit's ExecStart) and `exec-in` (spawned for ExecSync and Exec), with
    // the init helper's parser (`init::helper`: the daemon's binary runs them when no helper of
    // its build is beside it). Before clap, config, logging or an async runtime: they stay
    // single-threaded (they fork and join namespaces).
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match init::helper::Invocation::parse(&args) {
        Ok(init::helper::Invocation::Init(spec)) => init::run(&spec),
        Ok(init::helper::Invocation::ExecIn(args)) => init::exec_in::run(&args),
        Ok(init::helper::Invocation::BuildId) | Err(_) => {}
    }
    let cli = Cli::parse();
    // Single-threaded too: it joins a user namespace and forks.
    if let Some(Command::PodInit { net, ipc, uts, user, pod_mounts }) = &cli.command {
        let args = init::pod_init::PodInitArgs {
            net: net.clone(),
            ipc: ipc.clone(),
            uts: uts.clone(),
            user: user.clone(),
            pod_mounts: pod_mounts.clone(),
        };
        init::pod_init::run(&args);
    }
    // Single-threaded too: it unshares its mount namespace and execs CRIU.
    if let Some(Command::RestoreIn { init_spec, restore_dir, criu }) = &cli.command {
        let args = init::restore::RestoreArgs {
            init_spec: init_spec.clone(),
            restore_dir: restore_dir.clone(),
            criu: criu.clone(),
        };
        init::restore::run(&args);
    }
    if let Some(Command::RecordExit { file }) = &cli.command {
        return ExitCode::from(runtime::exit_record::record(file) as u8);
    }
    let config = match &cli.command {
        Some(Command::Config { default: true }) => Ok(Config::default()),
        _ => Config::load(cli.config.as_deref(), cli.config_dir.as_deref()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            // Logging is not set up yet (its level comes from the config): stderr reaches the journal.
            eprintln!("cri-systemd: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::RecordExit { .. } | Command::PodInit { .. } | Command::RestoreIn { .. }) => {
            unreachable!("handled above")
        }
        Some(Command::Config { .. }) => {
            let files: Vec<String> = config.sources.iter().map(|f| f.display().to_string()).collect();
            println!("# files read: {}", if files.is_empty() { "none (defaults)".into() } else { files.join(", ") });
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Some(Command::Check { json }) => check(&config, json),
        Some(Command::Measurements { command: MeasurementsCommand::Verify { log, tcti, no_tpm } }) => {
            verify_measurements(&config, log, tcti, no_tpm)
        }
        None | Some(Command::Serve) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("cri-systemd: error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Inside the runtime: the OTLP exporter's channel lives there. Traces are flushed on the way out.
            let traces = match runtime.block_on(async { otel::Tracing::start(&config.tracing) }) {
                Ok(traces) => traces,
                Err(e) => {
                    eprintln!("cri-systemd: error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            logging::init(config.log_level, traces.layer());
            traces.announce();
            let code = match runtime.block_on(server::serve(config, traces.enabled())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
            traces.shutdown();
            code
        }
    }
}

/// `cri-systemd check`: the preflight (cri_server::preflight), with the daemon's config and bus.
fn check(config: &Config, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cri-systemd: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let systemd = runtime::Systemd::new(config.systemd.bus_address.clone());
    let report = runtime.block_on(preflight::run(config, &systemd));
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.table());
    }
    if report.blocking { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn verify_measurements(config: &Config, log: Option<PathBuf>, tcti: Option<String>, no_tpm: bool) -> ExitCode {
    let log = log.unwrap_or_else(|| config.measurements.log_path(&config.state_root));
    let tcti = match (tcti, no_tpm) {
        (_, true) => None,
        (Some(tcti), false) => Some(tcti),
        (None, false) => config.measurements.tpm.then(|| config.measurements.tcti.clone()),
    };
    let pcr = match tcti.map(|tcti| measurements::tpm::Pcr::new(&tcti, config.measurements.pcr)).transpose() {
        Ok(pcr) => pcr,
        Err(e) => {
            eprintln!("cri-systemd: error: {e}");
            return ExitCode::from(2);
        }
    };
    match measurements::verify_command(&log, pcr) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cri-systemd: error: {e}");
            ExitCode::from(2)
        }
    }
}
