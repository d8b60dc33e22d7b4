//! `fisher`: the command-line front end of fisher-engine.
//!
//! ```text
//! fisher demo [--backend auto|gpu|cpu] [--adapter SUBSTR] [--out-dir fisher-demo] [--quick]
//!             [--json | --quiet]
//! fisher devices [--json]
//! fisher compute (--weights M.safetensors --inputs X.npy --labels y.npy
//!                 | --synthetic-model WIDTHS --synthetic-samples N [--synthetic-seed S]
//!                   [--save-model M.safetensors] [--save-data DIR])
//!                --activation SPEC [--likelihood categorical|gaussian]
//!                [--variant empirical|true|mc] [--mc-samples K] [--seed S]
//!                --form full|diag|layer|kfac|grads|norms [--backend auto|gpu|cpu]
//!                [--adapter SUBSTR] --out F.safetensors [--verify] [--max-result-gib G]
//!                [--block-samples B] [--shard i/n --partial PART.safetensors | --mpi]
//!                [--json | --quiet]
//! fisher reduce (--grads G.npy | --synthetic N,P [--seed S]) [--form FORM]
//!               [--backend auto|gpu|cpu] [--adapter SUBSTR] [--out F.safetensors]
//!               [--verify] [--json | --quiet]
//! fisher bench [--shapes 2048x512,4096x1024|none] [--forms full,diag,gram,norms]
//!              [--network 784,256,10|none] [--samples 1024] [--net-forms diag,kfac]
//!              [--variant true|empirical|mc] [--mc-samples K] [--activation tanh]
//!              [--backend gpu,cpu] [--adapter SUBSTR] [--repeat 3] [--warmup 1] [--seed S]
//!              [--max-result-gib G] [--json | --quiet]
//! fisher train [--widths 16,32,32,4] [--activation tanh] [--samples 2048] [--steps 400]
//!              [--lr 0.1] [--momentum 0.9] [--batch 64] [--checkpoints 25] [--seed 0]
//!              --out-dir RUN [--force] [--json | --quiet]
//! fisher action --checkpoints (RUN | c0.safetensors c1.safetensors ...) --activation SPEC
//!               --inputs X.npy --labels y.npy [--likelihood categorical|gaussian]
//!               [--variant true|empirical|mc] [--mc-samples K] [--seed S] [--segments M]
//!               [--backend auto|gpu|cpu] [--adapter SUBSTR] [--plot action.png|.svg]
//!               [--json | --quiet]
//! fisher report (--weights M.safetensors --inputs X.npy --labels y.npy
//!                | --synthetic-model WIDTHS --synthetic-samples N [--synthetic-seed S])
//!               --activation SPEC [--likelihood ...] [--variant ...] [--mc-samples K] [--seed S]
//!               [--form auto|implicit|full|diag|layer|kfac] [--backend auto|gpu|cpu]
//!               [--adapter SUBSTR] [--top K] [--alpha A1,A2,...] [--damping L] [--samples-n n]
//!               [--probes NV] [--lanczos-steps M] [--coupling-probes R] [--top-tol TOL]
//!               [--top-iterations N] [--probe-seed S] [--plot spectrum.png|.svg] [--json | --quiet]
//! fisher report --fisher F.safetensors [--weights M.safetensors] [--top K] [--alpha ...]
//!               [--damping L] [--samples-n n] [--plot spectrum.png|.svg] [--json | --quiet]
//! fisher inspect --model M.onnx [--input-shape D1,D2,...] [--json]
//! fisher merge PART.safetensors... --out F.safetensors [--force] [--json | --quiet]
//! ```
//!
//! Flags are parsed by clap ([`cli::args`]), validated into a configuration, then run.
//! On failure `fisher` prints one line, `fisher: error: <cause>: <cause>: ...`, to stderr
//! and exits with:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure: GPU/device error, a request beyond the adapter's limits, a result outside the f32 tolerance (`--verify`, or the built-in comparison), a bug |
//! | 2 | usage or bad input: flags; a file that cannot be read, written or parsed; wrong dtype, rank, order or shape; NaN/Inf in the inputs or weights; a label out of range; model keys or widths that do not fit; a `compute` result beyond `--max-result-gib` (checked before computing) |
//! | 3 | no GPU adapter, when `--backend gpu` (or `--adapter`) asked for one |
//!
//! No output file is left behind by a failed run: inputs are checked before the output is
//! created, and the output is written to a temporary file that is renamed into place.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::args::{Cli, Command, ReduceConfig, Report};
use cli::exit::{classify, one_line, Exit};

fn main() -> ExitCode {
    quiet_headless_environment();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    install_panic_report();
    // Temporary outputs are removed on SIGINT/SIGTERM/SIGHUP (the output policy, io::output).
    if let Err(e) = fisher_engine::io::output::install_signal_cleanup() {
        log::warn!("{e}");
    }

    // Under mpirun, MPI starts before anything is printed, so that only rank 0 prints (the
    // universe lives until main returns: MPI is finalized before the process exits).
    #[cfg(feature = "mpi")]
    let _universe = if cli::mpi::requested() {
        match cli::mpi::init() {
            Ok(universe) => Some(universe),
            Err(e) => {
                eprintln!("fisher: error: {e}");
                return ExitCode::from(Exit::Failure as u8);
            }
        }
    } else {
        None
    };

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // Help and version are successes (or, with no arguments at all, the help on
            // stderr with code 2): clap prints those itself.
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap's usage errors span several lines (message, missing flags, tip, usage);
            // fold everything before the usage block into one line.
            let text = e.to_string();
            let folded = text
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .filter(|line| !line.starts_with("For more information"))
                .flat_map(str::split_whitespace)
                .collect::<Vec<_>>()
                .join(" ");
            let message = folded.strip_prefix("error: ").unwrap_or(&folded);
            if cli::mpi::prints() {
                eprintln!("fisher: error: {message} (see `fisher --help`)");
            }
            return ExitCode::from(Exit::Usage as u8);
        }
    };

    keep_freed_scratch();

    // A panic is a bug; it is reported on one line like any error (by the hook) and mapped
    // to exit code 1. Unwinding, rather than aborting, lets a pending temporary output file
    // be removed by its destructor.
    let outcome = std::panic::catch_unwind(|| run(cli));
    match outcome {
        Ok(Ok(())) => ExitCode::from(Exit::Success as u8),
        Ok(Err(err)) => {
            if cli::mpi::prints() {
                eprintln!("fisher: error: {}", one_line(&err));
            }
            ExitCode::from(classify(&err) as u8)
        }
        Err(_) => ExitCode::from(Exit::Failure as u8),
    }
}

/// Lets glibc keep the CPU path's freed scratch for the next micro-batch (see
/// `fisher_engine::backend::cpu::allocator`) unless `FISHER_CPU_MEMORY_MB` asks for a budget
/// under 256 MiB. A value that does not parse changes nothing here: the command reports it.
fn keep_freed_scratch() {
    use fisher_engine::backend::cpu::{allocator, DEFAULT_ACCUMULATOR_BYTES};
    use fisher_engine::device::{DeviceRequest, CPU_MEMORY_ENV};
    // The request's own parser, given the CPU budget's variable alone.
    let only_cpu = |name: &str| (name == CPU_MEMORY_ENV).then(|| std::env::var(name).ok()).flatten();
    let budget = match DeviceRequest::with_env(fisher_engine::Backend::Cpu, Default::default(), only_cpu) {
        Ok(request) => request.cpu_memory_bytes.unwrap_or(DEFAULT_ACCUMULATOR_BYTES),
        Err(_) => return,
    };
    let retention = allocator::keep_freed_scratch(budget);
    log::debug!("allocator: {retention:?} (CPU budget {budget} bytes)");
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => {
            let cfg = cli::demo::DemoConfig::from_args(args)?;
            cli::demo::main(&cfg)
        }
        Command::Devices(args) => cli::devices::run(&args),
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Compute(args) => {
            let cfg = cli::compute::ComputeConfig::from_args(args)?;
            if let Some(graph) = &cfg.graph {
                let outcome = cli::compute::run_graph(graph)?;
                match cfg.report {
                    Report::Human => println!("{}", cli::compute::human_graph(graph, &outcome)),
                    Report::Json => println!("{}", cli::compute::json_graph(graph, &outcome)),
                    Report::Quiet => {}
                }
                return Ok(());
            }
            if cfg.mpi {
                if let Some(merged) = cli::mpi::run(&cfg)? {
                    match cfg.report {
                        Report::Human => println!("{}", cli::merge::human(&merged)),
                        Report::Json => println!("{}", cli::merge::json_value(&merged)),
                        Report::Quiet => {}
                    }
                }
                return Ok(());
            }
            let outcome = cli::compute::run(&cfg)?;
            match cfg.report {
                Report::Human => println!("{}", cli::compute::human(&cfg, &outcome)),
                Report::Json => println!("{}", cli::compute::json_line(&cfg, &outcome)),
                Report::Quiet => {}
            }
            Ok(())
        }
        Command::Reduce(args) => cli::reduce::main(&ReduceConfig::from_args(args)?),
        Command::Merge(args) => cli::merge::main(&args),
        Command::Bench(args) => {
            let cfg = cli::bench::BenchConfig::from_args(args)?;
            cli::bench::main(&cfg)
        }
        Command::Train(args) => {
            let cfg = cli::train::TrainConfig::from_args(args)?;
            let outcome = cli::train::run(&cfg)?;
            match cfg.report {
                Report::Human => println!("{}", cli::train::human(&outcome)),
                Report::Json => println!("{}", cli::train::json_line(&outcome)),
                Report::Quiet => {}
            }
            Ok(())
        }
        Command::Action(args) => {
            let cfg = cli::action::ActionConfig::from_args(args)?;
            let outcome = cli::action::run(&cfg)?;
            match cfg.report {
                Report::Human => println!("{}", cli::action::human(&outcome)),
                Report::Json => println!("{}", cli::action::json_line(&outcome)),
                Report::Quiet => {}
            }
            Ok(())
        }
        Command::Report(args) => {
            let cfg = cli::fisher_report::ReportConfig::from_args(args)?;
            let outcome = cli::fisher_report::run(&cfg)?;
            match cfg.report {
                Report::Human => println!("{}", cli::fisher_report::render(&outcome, false)),
                Report::Json => println!("{}", cli::fisher_report::render(&outcome, true)),
                Report::Quiet => {}
            }
            Ok(())
        }
    }
}

/// Reports a panic as one `fisher: error:` line (the full default report only when
/// `RUST_BACKTRACE` asks for it).
fn install_panic_report() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default_hook(info);
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        eprintln!("fisher: error: internal error (a bug; please report it): {message}{location}");
    }));
}

/// Process-wide settings a command-line tool needs, made first thing in `main`, while the
/// process has one thread (so changing the environment is sound):
///
/// * SIGPIPE back to its default action, so that `fisher … | head` ends quietly when `head`
///   closes the pipe, like every Unix tool, instead of failing on a write to stdout (Rust
///   ignores SIGPIPE by default).
/// * `XDG_RUNTIME_DIR`, when unset, pointed at the temporary directory: Mesa's Vulkan and EGL
///   drivers look for a Wayland display while adapters are enumerated and otherwise print
///   "XDG_RUNTIME_DIR is invalid or not set" on every headless run. Compute needs no display;
///   the connection attempt then fails silently.
fn quiet_headless_environment() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}
