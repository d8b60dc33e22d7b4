//! `fisher merge`: the partial files of `fisher compute --shard i/n` → the result file of
//! the whole run ([`fisher_engine::pipeline::merge`]).

use std::path::PathBuf;

use clap::Args;
use fisher_engine::pipeline::merge::{self, MergeOutcome, MergeRequest};
use serde_json::json;

use super::args::{OutputArgs, Report};
use super::exit::usage;
use super::format::{bytes, tensor_list};

/// Raw flags of `fisher merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The partial files (`fisher compute --shard i/n --partial PART_i.safetensors`), one
    /// per shard, in any order.
    #[arg(value_name = "PART.safetensors", required = true)]
    pub parts: Vec<PathBuf>,

    /// The result file: what the single run writes. Written atomically.
    #[arg(long, value_name = "F.safetensors")]
    pub out: PathBuf,

    /// Replace an existing --out (never a part).
    #[arg(long)]
    pub force: bool,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Runs `fisher merge` and prints its report.
pub fn main(args: &MergeArgs) -> anyhow::Result<()> {
    if args.parts.is_empty() {
        return Err(usage("fisher merge needs the partial files"));
    }
    let request = MergeRequest { parts: args.parts.clone(), out: args.out.clone(), force: args.force };
    let outcome = merge::run(&request)?;
    match Report::from_flags(args.output.json, args.output.quiet) {
        Report::Human => println!("{}", human(&outcome)),
        Report::Json => println!("{}", json_line(&request, &outcome)),
        Report::Quiet => {}
    }
    Ok(())
}

pub(crate) fn human(o: &MergeOutcome) -> String {
    let trace_label = if o.form == fisher_engine::fisher::NetForm::Kfac { "tr(G⊗A)" } else { "tr F" };
    [
        format!("merged {} shards of N = {} samples ({} form)", o.shards, o.samples, o.form.name()),
        format!("  backend   {}", o.backends.join(" + ")),
        format!("  result    {}   {trace_label} = {:.6e}", tensor_list(&o.tensors), o.trace),
        format!("  wrote     {} ({})", o.out.0.display(), bytes(o.out.1)),
        format!("  seconds   load {:.3} · merge {:.3} · write {:.3}", o.seconds.load, o.seconds.merge, o.seconds.write),
    ]
    .join("\n")
}

fn json_line(r: &MergeRequest, o: &MergeOutcome) -> String {
    let mut value = json_value(o);
    value["parts"] = json!(r.parts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
    value.to_string()
}

/// The JSON summary of a merge (without the part files).
pub(crate) fn json_value(o: &MergeOutcome) -> serde_json::Value {
    json!({
        "form": o.form.name(),
        "shards": o.shards,
        "samples": o.samples,
        "backends": o.backends,
        "trace": o.trace,
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
        "out": o.out.0.display().to_string(),
        "bytes": o.out.1,
        "seconds": o.seconds,
    })
}
