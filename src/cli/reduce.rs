//! `fisher reduce`: flags ([`ReduceConfig`]) → [`fisher_engine::pipeline::reduce`] → the
//! report. A `--synthetic` run without `--out` (and without `--json`/`--quiet`) is the
//! built-in comparison of the compute paths ([`reduce::compare`]) and prints its table.

use std::io::{IsTerminal, Write};

use fisher_engine::compare::Comparison;
use fisher_engine::pipeline::reduce::{self, InputInfo, ReduceOutcome};
use fisher_engine::verify::Verdict;
use fisher_engine::Form;
use serde_json::json;

use super::args::{Input, ReduceConfig, Report};
use super::exit::run_error;
use super::format::{bytes, tensor_list};

/// Runs `fisher reduce` and prints its report.
pub fn main(cfg: &ReduceConfig) -> anyhow::Result<()> {
    let request = &cfg.request;
    if let (true, &Input::Synthetic { samples, params, seed }) = (cfg.is_demo(), &request.input) {
        // A status line while the paths run (the reference can take seconds), on a terminal
        // only: redirected stderr must stay free of control codes.
        let terminal = std::io::stderr().is_terminal();
        let progress = |what: &str| {
            if terminal {
                eprint!("\r\x1b[2K{what} …");
                let _ = std::io::stderr().flush();
            }
        };
        let comparison = reduce::compare(&request.form, request.backend, &request.gpu, (samples, params, seed), progress);
        if terminal {
            eprint!("\r\x1b[2K");
        }
        let comparison = comparison.map_err(run_error)?;
        println!("{}", demo_text(&comparison));
        // The demonstration is also a smoke test of the installation: a path that disagrees
        // with the reference is a failure (exit code 1), after the table that shows it.
        let failed = comparison.failed();
        if !failed.is_empty() {
            anyhow::bail!("{} disagree(s) with the f64 reference beyond the f32 tolerance", failed.join(" and "));
        }
        return Ok(());
    }
    let outcome = reduce::run(request).map_err(run_error)?;
    match cfg.report {
        Report::Human => println!("{}", human(&outcome)),
        Report::Json => println!("{}", json_line(&outcome)),
        Report::Quiet => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reports: readable summaries and one-line JSON

fn verification_text(v: &Verdict) -> String {
    let a = &v.agreement;
    format!(
        "max|Δ| {:.2e} · max|Δ|/max|ref| {:.2e} (tolerance {:.2e}) · ‖Δ‖/‖ref‖ {:.2e}",
        a.max_abs, a.max_rel, v.bound, a.frobenius_rel
    )
}

/// The readable summary of a `reduce` run.
pub fn human(o: &ReduceOutcome) -> String {
    let mut lines = vec![format!("{} of {} samples × {} parameters", o.form.description(), o.samples, o.params)];
    lines.push(match &o.input {
        InputInfo::File { path, dtype } => format!("  input     {} ({dtype})", path.display()),
        InputInfo::Synthetic { seed } => format!("  input     built-in gradient-like data (seed {seed})"),
    });
    lines.push(format!("  backend   {}", o.backend));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    lines.push(format!("  result    {}   tr F = {:.6e}", tensor_list(&o.tensors), o.trace));
    if let Some(v) = &o.verification {
        lines.push(format!("  verified  {} against the f64 reference", verification_text(v)));
    }
    match &o.out {
        Some((path, size)) => lines.push(format!("  wrote     {} ({})", path.display(), bytes(*size))),
        None => lines.push("  wrote     nothing (no --out)".into()),
    }
    let s = &o.seconds;
    lines.push(format!(
        "  seconds   load {:.3} · setup {:.3} · compute {:.3} · verify {:.3} · write {:.3}",
        s.load, s.setup, s.compute, s.verify, s.write
    ));
    lines.join("\n")
}

/// The one-line JSON summary of a `reduce` run.
pub fn json_line(o: &ReduceOutcome) -> String {
    let mut value = json!({
        "samples": o.samples,
        "parameters": o.params,
        "form": o.form.to_string(),
        "backend": o.backend,
        "adapter": o.adapter,
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
        "trace": o.trace,
        "seconds": o.seconds,
        "out": o.out.as_ref().map(|(path, _)| path.display().to_string()),
    });
    match &o.input {
        InputInfo::File { path, dtype } => {
            value["input"] = json!(path.display().to_string());
            value["dtype"] = json!(dtype);
        }
        InputInfo::Synthetic { seed } => {
            value["input"] = json!("synthetic");
            value["seed"] = json!(seed);
        }
    }
    if let Some(v) = &o.verification {
        value["verification"] = json!(v);
    }
    value.to_string()
}

/// The table of the built-in demonstration.
pub fn demo_text(d: &Comparison) -> String {
    let rel = match d.form {
        Form::Full | Form::BlockDiagonal(_) => "max|F|",
        Form::Gram => "max|K|",
        _ => "max|ref|",
    };
    let mut lines = vec![
        format!(
            "Built-in gradient-like data G: N = {} samples × P = {} parameters (seed {}; generated in {:.3} s)",
            d.samples, d.params, d.seed, d.generate
        ),
        format!("Form: {} → {}", d.form.description(), tensor_list(&d.tensors)),
        String::new(),
    ];
    let width = d.runs.iter().map(|r| r.label.chars().count()).max().unwrap_or(0).max(13);
    lines.push(format!(
        "  {:<width$}  {:>8}  {:>9}  {:>12}  {:>14}  {:>10}",
        "path",
        "setup s",
        "compute s",
        "tr F",
        format!("max|Δ|/{rel}"),
        "‖Δ‖/‖ref‖"
    ));
    for r in &d.runs {
        lines.push(format!(
            "  {:<width$}  {:>8.3}  {:>9.4}  {:>12.6e}  {:>14.2e}  {:>10.2e}",
            r.label,
            r.setup,
            r.compute,
            r.trace,
            r.verification.agreement.max_rel,
            r.verification.agreement.frobenius_rel
        ));
    }
    lines.push(format!(
        "  {:<width$}  {:>8}  {:>9.4}  {:>12.6e}  {:>14}  {:>10}",
        "f64 reference", "", d.reference_seconds, d.reference_trace, "(oracle)", ""
    ));
    lines.push(String::new());

    if let Some(a) = &d.gpu_vs_cpu {
        lines.push(format!("GPU vs CPU: max|Δ|/{rel} = {:.2e}, ‖Δ‖/‖CPU‖ = {:.2e}.", a.max_rel, a.frobenius_rel));
    }
    if let Some(note) = &d.note {
        lines.push(format!("Note: {note}."));
    }
    let tolerance = d.runs.first().map_or(0.0, |r| r.verification.bound);
    let failed = d.failed();
    if failed.is_empty() {
        lines.push(format!(
            "Every path matches the f64 reference within the f32 tolerance for sums of {} terms \
             (max|Δ| ≤ {tolerance:.2e}·{rel}).",
            d.terms
        ));
    } else {
        lines.push(format!(
            "MISMATCH: {} disagree(s) with the f64 reference beyond the f32 tolerance {tolerance:.2e}·{rel}.",
            failed.join(" and ")
        ));
    }
    lines.push(String::new());
    lines.push("Nothing was written. On your own per-sample gradients (an N×P .npy file):".into());
    lines.push(format!(
        "  fisher reduce --grads G.npy --form {} --out F.safetensors [--verify]",
        d.form
    ));
    lines.join("\n")
}
