//! Shards and their merge: `fisher compute --shard i/n --partial PART` sums one contiguous
//! slice of the samples ([`crate::fisher::shard_range`]); `fisher merge PART… --out F`
//! checks that the parts belong to one run and cover every shard exactly once, adds their
//! exact sums, and writes the file that the single run writes. On the CPU the merged
//! result equals the single run's bit for bit (see [`crate::fisher::sums`]); parts from a
//! GPU agree within the GPU's tolerance.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{file_size, since};
use crate::error::{FisherError, Result};
use crate::fisher::{NetForm, NetSums, Variant};
use crate::io::fisher_file::{self, FisherFile};
use crate::io::output::Target;
use crate::io::partial::{self, Fnv, PartialFile};
use crate::model::{DataSource, Likelihood, Mlp, TargetRows};

/// The fingerprint of a run, which every part of it carries: the model (architecture,
/// activations and every parameter's bits), the data (N, the input width, the targets' kind
/// and width, and the bits of the first block's inputs and targets), the likelihood, the
/// variant (with its Monte Carlo draws and seed), the form and the block size. Parts with
/// different fingerprints are not merged.
///
/// Only the first block of the data is hashed, so that every shard can afford it; data that
/// differ only after it are not told apart (N and the shapes still are).
pub fn fingerprint(mlp: &Mlp, data: &dyn DataSource, likelihood: Likelihood, variant: Variant, form: NetForm, block: usize) -> Result<String> {
    let mut h = Fnv::default();
    h.text("fisher-engine run v1").text(form.name()).text(likelihood.name()).text(variant.name());
    if let Variant::MonteCarlo { samples, seed } = variant {
        h.bytes(&(samples as u64).to_le_bytes()).bytes(&seed.to_le_bytes());
    }
    h.bytes(&(block as u64).to_le_bytes());
    for (layer, activation) in mlp.layers.iter().zip(mlp.activations.iter().map(Some).chain([None])) {
        h.bytes(&(layer.index as u64).to_le_bytes())
            .bytes(&(layer.fan_out() as u64).to_le_bytes())
            .bytes(&(layer.fan_in() as u64).to_le_bytes())
            .text(activation.map_or("", |a| a.name()));
        h.floats(layer.weight.iter().copied());
        if let Some(b) = &layer.bias {
            h.text("bias").floats(b.iter().copied());
        }
    }
    let (n, d) = (data.len(), data.input_dim());
    h.bytes(&(n as u64).to_le_bytes()).bytes(&(d as u64).to_le_bytes());
    // The first block, read in pieces of at most 4096 samples (bounded memory).
    let head = n.min(block);
    let mut s0 = 0;
    while s0 < head {
        let m = (head - s0).min(4096);
        h.floats(data.inputs(s0, m)?.iter().copied());
        match data.targets(s0, m)? {
            TargetRows::Classes(c) => {
                h.text("classes");
                for &y in c.iter() {
                    h.bytes(&y.to_le_bytes());
                }
            }
            TargetRows::Values(v) => {
                h.text("values").bytes(&(v.ncols() as u64).to_le_bytes());
                h.floats(v.iter().copied());
            }
        }
        s0 += m;
    }
    Ok(h.hex())
}

/// What to merge, and where.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    /// The partial files, in any order.
    pub parts: Vec<PathBuf>,
    /// The result file.
    pub out: PathBuf,
    /// Replace an existing output file.
    pub force: bool,
}

/// What a merge did.
#[derive(Debug)]
pub struct MergeOutcome {
    /// The form.
    pub form: NetForm,
    /// Shards merged (n).
    pub shards: usize,
    /// N.
    pub samples: usize,
    /// tr F (kfac: Σ tr(G)·tr(A)).
    pub trace: f64,
    /// Names and shapes of the written tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// The backends of the parts (distinct, in shard order).
    pub backends: Vec<String>,
    /// The file written and its size.
    pub out: (PathBuf, u64),
    /// Seconds reading, merging and writing.
    pub seconds: MergeSeconds,
}

/// Wall-clock seconds of a merge.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct MergeSeconds {
    /// Reading and checking the parts.
    pub load: f64,
    /// Adding the sums and dividing by N.
    pub merge: f64,
    /// Writing the result.
    pub write: f64,
}

/// Checks that `parts` (file, contents) are the n shards of one run, each exactly once: the
/// same form, total, block, fingerprint and shard count as the first; every index 0..n
/// present once; each part's range the one its index defines. Errors name the file or the
/// shard at fault.
pub fn check_parts(parts: &[(PathBuf, PartialFile)]) -> Result<()> {
    let Some((first_path, first)) = parts.first() else {
        return Err(FisherError::Request("fisher merge needs at least one partial file".into()));
    };
    let n = first.shard.1;
    for (path, p) in parts {
        let differs = |what: &str, a: String, b: String| {
            FisherError::io(
                path,
                format!("is a shard of a different run than {}: {what} {a} here, {b} there", first_path.display()),
            )
        };
        if p.sums.form != first.sums.form {
            return Err(differs("form", p.sums.form.name().into(), first.sums.form.name().into()));
        }
        if p.shard.1 != n {
            return Err(differs("shard count", p.shard.1.to_string(), n.to_string()));
        }
        if p.total != first.total {
            return Err(differs("total samples", p.total.to_string(), first.total.to_string()));
        }
        if p.block != first.block {
            return Err(differs("block samples", p.block.to_string(), first.block.to_string()));
        }
        if p.sums.layers != first.sums.layers {
            return Err(differs("network", format!("{:?}", p.sums.layers), format!("{:?}", first.sums.layers)));
        }
        if p.fingerprint != first.fingerprint {
            return Err(differs(
                "fingerprint (model, data, likelihood, variant, form or block)",
                p.fingerprint.clone(),
                first.fingerprint.clone(),
            ));
        }
        let expected = crate::fisher::shard_range(p.total, p.block, p.shard.0, n);
        if p.range != expected {
            return Err(FisherError::io(
                path,
                format!(
                    "shard {}/{n} covers samples {}..{}, but shard {}/{n} of {} samples in blocks of {} is {}..{}",
                    p.shard.0, p.range.start, p.range.end, p.shard.0, p.total, p.block, expected.start, expected.end
                ),
            ));
        }
    }
    // The shard count comes from the files: nothing is sized by it.
    let mut seen: std::collections::BTreeMap<usize, &Path> = std::collections::BTreeMap::new();
    for (path, p) in parts {
        if let Some(earlier) = seen.insert(p.shard.0, path) {
            return Err(FisherError::Request(format!(
                "shard {}/{n} is given twice: {} and {}",
                p.shard.0,
                earlier.display(),
                path.display()
            )));
        }
    }
    if seen.len() < n {
        let count = n - seen.len();
        let listed: Vec<String> = (0..n).filter(|i| !seen.contains_key(i)).take(8).map(|i| format!("{i}/{n}")).collect();
        return Err(FisherError::Request(format!(
            "shard{} {}{} {} missing (given: {})",
            if count > 1 { "s" } else { "" },
            listed.join(", "),
            if count > listed.len() { format!(" and {} more", count - listed.len()) } else { String::new() },
            if count > 1 { "are" } else { "is" },
            parts.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// The merged sums of checked parts, added in shard order (any order gives the same bits).
pub fn merge_sums(parts: &[(PathBuf, PartialFile)]) -> Result<NetSums> {
    check_parts(parts)?;
    let mut order: Vec<&PartialFile> = parts.iter().map(|(_, p)| p).collect();
    order.sort_by_key(|p| p.shard.0);
    let mut total = order[0].sums.clone();
    for p in &order[1..] {
        total.merge(&p.sums)?;
    }
    Ok(total)
}

/// The result file of merged `sums` with the metadata the shards carry (the backends of
/// the parts joined with " + " where they differ).
pub fn result_file(sums: &NetSums, total: usize, metadata: &HashMap<String, String>, backends: &[String]) -> Result<FisherFile> {
    let result = sums.finish(total)?;
    let mut metadata = metadata.clone();
    metadata.insert("backend".into(), backends.join(" + "));
    let indices: Vec<usize> = metadata
        .get("layer_indices")
        .and_then(|text| serde_json::from_str(text).ok())
        .filter(|v: &Vec<usize>| v.len() == sums.layers.len())
        .unwrap_or_else(|| (0..sums.layers.len()).collect());
    Ok(FisherFile::of_network_with(result, &indices, metadata))
}

/// Runs `fisher merge`: the output policy first (no part may be the output), then every
/// part read and checked, merged, finished and written atomically.
pub fn run(request: &MergeRequest) -> Result<MergeOutcome> {
    let inputs: Vec<(&str, &Path)> = request.parts.iter().map(|p| ("a partial file", p.as_path())).collect();
    Target::check(&request.out, "--out", request.force, &inputs)?;
    let start = Instant::now();
    let parts = request.parts.iter().map(|p| Ok((p.clone(), partial::read(p)?))).collect::<Result<Vec<_>>>()?;
    check_parts(&parts)?;
    let load = since(start);

    let mut outcome = write_merged(&parts, &request.out)?;
    outcome.seconds.load = load;
    Ok(outcome)
}

/// Merges checked `parts` (the n shards of one run, in any order) and writes the result to
/// `out` atomically; the caller applied the output policy to `out`.
pub fn write_merged(parts: &[(PathBuf, PartialFile)], out: &Path) -> Result<MergeOutcome> {
    let start = Instant::now();
    let sums = merge_sums(parts)?;
    let first = &parts[0].1;
    let mut backends: Vec<String> = Vec::new();
    let mut by_shard: Vec<&PartialFile> = parts.iter().map(|(_, p)| p).collect();
    by_shard.sort_by_key(|p| p.shard.0);
    for p in by_shard {
        if !backends.contains(&p.backend) {
            backends.push(p.backend.clone());
        }
    }
    let file = result_file(&sums, first.total, &first.result_metadata, &backends)?;
    let merge = since(start);

    let start = Instant::now();
    fisher_file::write(out, &file)?;
    Ok(MergeOutcome {
        form: first.sums.form,
        shards: first.shard.1,
        samples: first.total,
        trace: file.trace(),
        tensors: file.tensor_shapes(),
        backends,
        out: (out.to_path_buf(), file_size(out)),
        seconds: MergeSeconds { load: 0.0, merge, write: since(start) },
    })
}
