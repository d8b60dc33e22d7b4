//! `fisher demo`: the whole pipeline on an embedded default, computed now and verified.
//!
//! Flow: flags → [`DemoConfig`] (the library's [`DemoRequest`], with the follow-up commands
//! this binary prints) → [`fisher_engine::demo::run`] (the sections, their checks and the
//! files) → the report, ending with the verdict; exit 1 when a check failed (after printing
//! and writing everything, so that the failure can be inspected).

use std::path::{Path, PathBuf};

use clap::Args;
use fisher_engine::demo::{self, DemoFiles, DemoOutcome, DemoRequest, LANCZOS_K, RUN_DIR, VARIANT};
use fisher_engine::device::AdapterInfo;
use fisher_engine::fisher::rows_per_sample;
use fisher_engine::verify::{Contract, NETWORK_FROBENIUS_REL};
use fisher_engine::FisherError;

use super::args::{backend_choice, BackendArg, Report};
use super::exit::usage;
use super::format::{sci_short, seconds, shell_word, table};

/// Raw flags of `fisher demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to compute: auto (a hardware GPU adapter if one exists, else the CPU), gpu (any
    /// adapter, software ones included) or cpu. Beside a
    /// GPU, the CPU path runs too, for comparison.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,

    /// Use the GPU adapter whose name contains SUBSTR (case-insensitive; default: $FISHER_ADAPTER).
    #[arg(long, value_name = "SUBSTR")]
    pub adapter: Option<String>,

    /// The directory to write (created; it may already hold an earlier demo's files, which
    /// are replaced, but nothing else).
    #[arg(long, value_name = "DIR", default_value = "fisher-demo")]
    pub out_dir: PathBuf,

    /// Shrink every size (a 6-12-12-3 MLP on 256 samples, 512×64 gradients): the same steps
    /// and checks in a few seconds, for tests and a first try on a slow machine.
    #[arg(long)]
    pub quick: bool,

    /// Print one JSON line (the content of summary.json) instead of the report.
    #[arg(long)]
    pub json: bool,

    /// Print only the final verdict (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// A validated `fisher demo` invocation.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// What to run.
    pub request: DemoRequest,
    /// Output style.
    pub report: Report,
}

impl DemoConfig {
    /// Validates raw flags.
    pub fn from_args(args: DemoArgs) -> anyhow::Result<Self> {
        let (backend, gpu) = backend_choice(args.backend, args.adapter)?;
        if args.out_dir.as_os_str().is_empty() {
            return Err(usage("--out-dir needs a directory name"));
        }
        let report = Report::from_flags(args.json, args.quiet);
        let mut request = DemoRequest {
            backend,
            gpu,
            out_dir: args.out_dir,
            quick: args.quick,
            show_progress: report == Report::Human,
            commands: Vec::new(),
        };
        request.commands = follow_up_commands(&request.files(), &request.sizes().run.activation);
        // A directory the demo must not write is refused before any work, in the library's words.
        demo::check_out_dir(&request.out_dir).map_err(|e| match e {
            FisherError::InvalidInput(message) => usage(message),
            other => other.into(),
        })?;
        Ok(DemoConfig { request, report })
    }
}

/// A path as one shell word.
fn path_text(path: &Path) -> String {
    shell_word(&path.display().to_string())
}

/// The commands that continue from the demo's files.
fn follow_up_commands(files: &DemoFiles, activation: &str) -> Vec<String> {
    let last = files.checkpoints.last().cloned().unwrap_or_else(|| files.run.join("ckpt_000.safetensors"));
    let activation = shell_word(activation);
    let data = format!("--inputs {} --labels {}", path_text(&files.inputs), path_text(&files.labels));
    let (fisher, last, run) = (path_text(&files.fisher), path_text(&last), path_text(&files.run));
    vec![
        format!("fisher report --fisher {fisher} --weights {last} --activation {activation}"),
        format!("fisher action --checkpoints {run} --activation {activation} {data}"),
        format!("fisher compute --weights {last} --activation {activation} {data} --form kfac --out kfac.safetensors --verify"),
    ]
}

/// The final verdict line.
fn verdict_line(o: &DemoOutcome) -> String {
    let (checks, total) = (o.checks.len(), o.seconds.total);
    if o.passed() {
        format!("✓ all {checks} checks passed ({total:.1} s)")
    } else {
        let failed = o.failed();
        format!("✗ {} of {checks} checks failed: {} ({total:.1} s)", failed.len(), failed.join("; "))
    }
}

/// Runs `fisher demo` and prints its report; errors (exit 1) when a check failed.
pub fn main(cfg: &DemoConfig) -> anyhow::Result<()> {
    let outcome = demo::run(&cfg.request)?;
    match cfg.report {
        Report::Human => println!("{}\n\n{}", human(&outcome), verdict_line(&outcome)),
        Report::Json => println!("{}", outcome.summary),
        Report::Quiet => println!("{}", verdict_line(&outcome)),
    }
    if !outcome.passed() {
        let failed = outcome.failed();
        anyhow::bail!(
            "{} of {} verifications failed ({}); the results are in {}",
            failed.len(),
            outcome.checks.len(),
            failed.join("; "),
            cfg.request.out_dir.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report

/// `value ≤ tolerance ✓` (a NaN fails: ✗).
fn verdict(value: f64, tolerance: f64) -> String {
    format!("{} {}", sci_short(value), if value <= tolerance { "✓" } else { "✗" })
}

/// Lays out rows of label–value pairs: every column left-aligned, as wide as its widest
/// cell, two spaces apart, indented by two.
fn pairs(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> =
                row.iter().enumerate().map(|(c, cell)| format!("{cell:<width$}", width = widths[c])).collect();
            format!("  {}", cells.join("  ").trim_end())
        })
        .collect()
}

/// `Header      text` with the section names aligned.
fn header(name: &str, text: impl AsRef<str>) -> String {
    format!("{name:<10}  {}", text.as_ref())
}

/// The section headers and their rows.
fn human(o: &DemoOutcome) -> String {
    let (device, run) = (&o.device, &o.training);
    let path = if device.gpu { "gpu" } else { "cpu" };
    let mut out: Vec<String> = Vec::new();
    let where_ = if device.gpu {
        let software = device.adapter.as_ref().is_some_and(AdapterInfo::is_software);
        let kind = if software { "a software GPU: the CPU standing in for one" } else { "a GPU" };
        format!(
            "GPU: {} ({kind}); the CPU path runs beside it for comparison",
            device.adapter.as_ref().map_or("?", |a| a.name.as_str()),
        )
    } else {
        let threads = device.backend.strip_prefix("cpu: ").unwrap_or(&device.backend);
        format!("CPU: {threads}{}", device.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())
    };
    out.push(header("Device", where_));
    if o.quick {
        out.push(header("", "--quick: every size shrunk, for tests (drop --quick for the real demo)"));
    }

    // Reduction.
    out.push(String::new());
    out.push(header(
        "Reduction",
        format!(
            "F = GᵀG/N of synthetic per-sample gradients, N = {} × P = {}; against the f64 reference",
            o.reduction.samples, o.reduction.params
        ),
    ));
    let tolerance = o.reduction.runs.first().map_or(0.0, |r| r.verification.bound);
    let mut rows = vec![vec!["path".to_string(), "seconds".into(), "tr F".into(), "max|Δ|/max|F|".into(), "tolerance".into()]];
    for r in &o.reduction.runs {
        rows.push(vec![
            if r.gpu { "gpu".into() } else { "cpu".into() },
            seconds(r.compute),
            format!("{:.6e}", r.trace),
            verdict(r.verification.agreement.max_rel, r.verification.bound),
            sci_short(r.verification.bound),
        ]);
    }
    if let Some(a) = &o.reduction.gpu_vs_cpu {
        rows.push(vec![
            "gpu vs cpu".into(),
            String::new(),
            String::new(),
            verdict(a.max_rel, 2.0 * tolerance),
            sci_short(2.0 * tolerance),
        ]);
    }
    rows.push(vec![
        "f64 reference".into(),
        seconds(o.reduction.reference_seconds),
        format!("{:.6e}", o.reduction.reference_trace),
    ]);
    out.extend(table(&rows));

    // Training.
    out.push(String::new());
    out.push(header(
        "Training",
        format!(
            "{}, P = {}, on {} samples of a seeded classification task: {} SGD steps, {} checkpoints ({:.2} s)",
            o.architecture,
            run.parameters,
            run.spec.samples,
            run.spec.steps,
            run.files.len(),
            run.seconds.0
        ),
    ));
    out.push(format!(
        "  loss {:.4} → {:.4} (mean negative log-likelihood over all samples, first → last checkpoint)",
        run.losses.first().copied().unwrap_or(f64::NAN),
        run.losses.last().copied().unwrap_or(f64::NAN)
    ));

    // Network Fisher.
    out.push(String::new());
    out.push(header(
        "Fisher",
        format!(
            "true Fisher of the trained model ({} outputs, {} rows per sample); ‖Δ‖/‖ref‖ against the f64 reference, tolerance {}",
            o.outputs,
            rows_per_sample(VARIANT, o.outputs),
            sci_short(NETWORK_FROBENIUS_REL)
        ),
    ));
    let mut head = vec!["form".to_string()];
    for r in o.forms.first().map(|f| f.runs.as_slice()).unwrap_or_default() {
        head.push(format!("{} s", r.path));
        head.push(format!("{} ‖Δ‖/‖ref‖", r.path));
    }
    let both = o.forms.iter().any(|f| f.gpu_vs_cpu.is_some());
    if both {
        head.push("gpu vs cpu".into());
    }
    head.push("reference s".into());
    let mut rows = vec![head];
    for f in o.forms.iter() {
        let mut row = vec![f.form.to_string()];
        for r in &f.runs {
            row.push(seconds(r.seconds));
            row.push(verdict(r.agreement.frobenius_rel, r.tolerance_frobenius_rel));
        }
        if both {
            row.push(f.gpu_vs_cpu.map(|a| verdict(a.frobenius_rel, Contract::Network.pair_bound())).unwrap_or_default());
        }
        row.push(seconds(f.reference_seconds));
        rows.push(row);
    }
    out.extend(table(&rows));

    // Geometry.
    let m = &o.geometry.measures;
    let i = &o.geometry.implicit;
    out.push(String::new());
    let (parameters, alpha) = (m.parameters, sci_short(m.alpha));
    let what = format!("of the full F ({path}), exactly from its {parameters} eigenvalues ({:.2} s)", o.geometry.seconds);
    out.push(header("Geometry", format!("{what}; α = λ = {alpha} (10⁻⁴·λ_max)")));
    let top: Vec<String> = m.top_eigenvalues.iter().take(LANCZOS_K).map(|&v| sci_short(v)).collect();
    let fixed = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into());
    let units: Vec<String> = m.inter_unit_coupling.iter().map(|c| fixed(*c, 4)).collect();
    let singular = match o.geometry.zero_eigenvalues {
        0 => String::new(),
        z => format!(" (F alone: {z} zero eigenvalues)"),
    };
    let rows = vec![
        vec!["tr F".to_string(), sci_short(m.trace), "top eigenvalues".into(), top.join("  ")],
        vec![
            "log det(F + λI)".into(),
            format!("{:.2}", m.logdet),
            "condition number of F + λI".into(),
            format!("{}{singular}", sci_short(m.condition_number.unwrap_or(f64::NAN))),
        ],
        vec![
            "effective dimension".into(),
            format!("{:.2}", m.effective_dimension),
            format!("Abbas eff. dim. (n = {})", m.abbas_samples.unwrap_or(0)),
            fixed(m.abbas_effective_dimension, 2),
        ],
        vec!["Fisher–Rao norm √θᵀFθ".into(), fixed(m.fisher_rao_norm, 4), "stable rank".into(), format!("{:.3}", m.stable_rank)],
        vec![
            "spectral entropy".into(),
            format!("{:.3}", m.spectral_entropy),
            "resolved eigenvalues".into(),
            format!(
                "{} above ‖F − F_ref‖_F = {} (Weyl)",
                o.geometry.resolved_eigenvalues,
                sci_short(o.geometry.eigenvalue_error_bound)
            ),
        ],
        vec![
            "inter-layer coupling".into(),
            fixed(m.inter_layer_coupling, 4),
            "inter-unit coupling per layer".into(),
            units.join("  "),
        ],
    ];
    out.extend(pairs(&rows));
    out.push(format!(
        "  implicit: top {} by Lanczos from {} F·v products on {} (F never formed), {:.2} s: max|Δλ|/λ₁ vs exact {} (tolerance {}){}",
        i.lanczos.values.len(),
        i.lanczos.iterations,
        path,
        i.seconds,
        verdict(i.max_rel_diff, i.tolerance),
        sci_short(i.tolerance),
        if i.lanczos.converged { "" } else { ", NOT converged" }
    ));

    // Action.
    out.push(String::new());
    let (checkpoints, segments) = (o.action.checkpoints, o.action.segments);
    let what = format!("along the {checkpoints} checkpoints (true Fisher at each; chord by the midpoint rule, {segments} segments)");
    out.push(header("Action", what));
    let rows = vec![
        vec!["action S".to_string(), sci_short(o.action.action), "Fisher–Rao length L".into(), sci_short(o.action.length)],
        vec!["chord".into(), sci_short(o.action.chord), "efficiency L/chord".into(), format!("{:.3}", o.action.efficiency)],
        vec![
            "Euclidean path length".into(),
            sci_short(o.action.euclidean_length),
            "Euclidean ‖θ_T − θ₀‖".into(),
            sci_short(o.action.euclidean_chord),
        ],
    ];
    out.extend(pairs(&rows));

    // Files.
    out.push(String::new());
    out.push(header("Files", format!("{}/", o.files.dir.display())));
    out.push(format!(
        "  spectrum.png  action.png  fisher.safetensors (F, {p}×{p})  summary.json (every number above)",
        p = run.parameters
    ));
    out.push(format!(
        "  {RUN_DIR}/: X.npy  y.npy  {} … {} ({} checkpoints)  run.json",
        run.files.first().map(String::as_str).unwrap_or(""),
        run.files.last().map(String::as_str).unwrap_or(""),
        run.files.len()
    ));
    out.push(String::new());
    out.push(header("Next", "continue from these files:"));
    out.extend(o.commands.iter().map(|c| format!("  {c}")));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_by_characters() {
        let rows = vec![vec!["a".to_string(), "1.0".into()], vec!["‖Δ‖".into(), "10.25".into()]];
        assert_eq!(pairs(&rows), ["  a    1.0", "  ‖Δ‖  10.25"]);
    }

    #[test]
    fn follow_up_commands_name_the_demo_files() {
        let files = DemoFiles::new(Path::new("out dir"), &demo::Sizes::quick().run);
        let commands = follow_up_commands(&files, "tanh");
        assert!(commands[1].starts_with("fisher action --checkpoints 'out dir/run' --activation tanh"), "{}", commands[1]);
        assert!(commands[0].contains("'out dir/run/ckpt_006.safetensors'"), "{}", commands[0]);
    }
}
