//! Partial files: one shard's exact sums (`fisher compute --shard i/n --partial PART`), which
//! `fisher merge` combines into the result file the single run would have written.
//!
//! # Format (safetensors)
//!
//! For every part of [`crate::fisher::sums`]'s layout (`diag.<l>`, `kfac.<l>.A`,
//! `kfac.<l>.G`, `layer.<l>`, `full`), three tensors:
//! * `<part>.sum`: F64 \[len\], the shard's sums as f64 (for reading; not used by the merge);
//! * `<part>.tops`: U8 \[len\] and `<part>.folds`: I64 \[len, 3\], the exact state
//!   ([`ExactSum`]) that the merge adds.
//!
//! Metadata: `format` = [`FORMAT`], `partial_version` = 1, `form`, `shard` (`i/n`),
//! `samples` (in this shard), `range` (`start..end`), `total_samples` (N), `block_samples`,
//! `fingerprint` (see [`fingerprint`]), `layers` (JSON list of `{fan_out, fan_in, bias}`),
//! `backend`, and `result_metadata`: the JSON object of metadata that the merged result file
//! carries (what the single run writes).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::error::{FisherError, Result};
use crate::fisher::exact::{ExactSum, FOLDS};
use crate::fisher::sums::part_layout;
use crate::fisher::{NetForm, NetSums, SumLayer};
use crate::validate::quote;

use super::io_error;
use super::output::{check_output_path, Target};

/// The `format` of a partial file.
pub const FORMAT: &str = "fisher-engine partial sums";

/// One shard's sums and what identifies the run they belong to.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialFile {
    /// The sums.
    pub sums: NetSums,
    /// Shard index i of n.
    pub shard: (usize, usize),
    /// The samples of the whole data summed here.
    pub range: std::ops::Range<usize>,
    /// N, the samples of the whole run.
    pub total: usize,
    /// Samples per block (see [`crate::fisher::sums`]).
    pub block: usize,
    /// The run's fingerprint (model, data, likelihood, variant, form, block).
    pub fingerprint: String,
    /// The backend's label.
    pub backend: String,
    /// The metadata of the merged result file.
    pub result_metadata: HashMap<String, String>,
}

/// A 64-bit FNV-1a hash, stable across builds and machines (unlike std's `DefaultHasher`),
/// for fingerprints.
#[derive(Debug, Clone)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Adds a length-prefixed string (so that "ab","c" and "a","bc" differ).
    pub fn text(&mut self, text: &str) -> &mut Self {
        self.bytes(&(text.len() as u64).to_le_bytes()).bytes(text.as_bytes())
    }

    /// Adds f32 values.
    pub fn floats(&mut self, values: impl IntoIterator<Item = f32>) -> &mut Self {
        for v in values {
            self.bytes(&v.to_bits().to_le_bytes());
        }
        self
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Little-endian bytes of a tensor to write.
enum Data<'a> {
    F64(Cow<'a, [f64]>),
    U8(&'a [u8]),
    I64(&'a [[i64; FOLDS]]),
}

impl Data<'_> {
    fn dtype(&self) -> ::safetensors::Dtype {
        match self {
            Data::F64(_) => ::safetensors::Dtype::F64,
            Data::U8(_) => ::safetensors::Dtype::U8,
            Data::I64(_) => ::safetensors::Dtype::I64,
        }
    }

    fn byte_len(&self) -> usize {
        match self {
            Data::F64(v) => v.len() * 8,
            Data::U8(v) => v.len(),
            Data::I64(v) => v.len() * 8 * FOLDS,
        }
    }

    fn write(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1 << 16);
        match self {
            Data::F64(v) => {
                for chunk in v.chunks(1 << 13) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                    out.write_all(&buf)?;
                }
            }
            Data::U8(v) => out.write_all(v)?,
            Data::I64(v) => {
                for chunk in v.chunks(1 << 11) {
                    buf.clear();
                    buf.extend(chunk.iter().flatten().flat_map(|x| x.to_le_bytes()));
                    out.write_all(&buf)?;
                }
            }
        }
        Ok(())
    }
}

/// The header and the tensors of `part`, in file order.
fn encode(part: &PartialFile) -> Result<(Vec<u8>, Vec<(String, Vec<usize>, Data<'_>)>)> {
    use ::safetensors::tensor::{Metadata, TensorInfo};
    part.sums.check()?;
    let layout = part_layout(part.sums.form, &part.sums.layers)?;
    let mut tensors: Vec<(String, Vec<usize>, Data<'_>)> = Vec::new();
    for ((name, len), sum) in layout.iter().zip(&part.sums.parts) {
        tensors.push((format!("{name}.sum"), vec![*len], Data::F64(Cow::Owned(sum.values()))));
        tensors.push((format!("{name}.tops"), vec![*len], Data::U8(sum.tops())));
        tensors.push((format!("{name}.folds"), vec![*len, FOLDS], Data::I64(sum.folds())));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape, data) in &tensors {
        let bytes = data.byte_len();
        infos.push((name.clone(), TensorInfo { dtype: data.dtype(), shape: shape.clone(), data_offsets: (offset, offset + bytes) }));
        offset += bytes;
    }
    let header = Metadata::new(Some(metadata_of(part)), infos)
        .and_then(|m| crate::io::safetensors::header_json(&m).map_err(Into::into))
        .map_err(|e| FisherError::InvalidInput(format!("cannot build the safetensors header of a partial file: {e}")))?;
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok((header, tensors))
}

fn write_encoded(out: &mut dyn Write, header: &[u8], tensors: &[(String, Vec<usize>, Data<'_>)]) -> std::io::Result<()> {
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    for (_, _, data) in tensors {
        data.write(out)?;
    }
    Ok(())
}

/// Writes `part` to `path` atomically (a temporary file renamed into place). The caller
/// applied the output policy (inputs, `--force`) first.
pub fn write(path: &Path, part: &PartialFile) -> Result<()> {
    check_output_path(path)?;
    let (header, tensors) = encode(part)?;
    let target = Target::check(path, "the output", true, &[])?;
    target.write("", |out| write_encoded(out, &header, &tensors))
}

/// The bytes of the partial file of `part` (what [`write`] writes), e.g. to send to
/// another process.
pub fn to_bytes(part: &PartialFile) -> Result<Vec<u8>> {
    let (header, tensors) = encode(part)?;
    let mut bytes = Vec::new();
    write_encoded(&mut bytes, &header, &tensors).map_err(|e| FisherError::InvalidInput(format!("encoding a partial file: {e}")))?;
    Ok(bytes)
}

fn metadata_of(part: &PartialFile) -> HashMap<String, String> {
    let (i, n) = part.shard;
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("partial_version".to_string(), "1".to_string()),
        ("form".to_string(), part.sums.form.name().to_string()),
        ("shard".to_string(), format!("{i}/{n}")),
        ("samples".to_string(), part.sums.samples.to_string()),
        ("range".to_string(), format!("{}..{}", part.range.start, part.range.end)),
        ("total_samples".to_string(), part.total.to_string()),
        ("block_samples".to_string(), part.block.to_string()),
        ("fingerprint".to_string(), part.fingerprint.clone()),
        ("layers".to_string(), serde_json::to_string(&part.sums.layers).expect("plain data")),
        ("backend".to_string(), part.backend.clone()),
        ("result_metadata".to_string(), serde_json::to_string(&part.result_metadata).expect("plain data")),
    ])
}

/// `i/n` with i < n: a shard index of a count.
pub fn parse_shard(text: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("'{}' is not a shard i/n with 0 ≤ i < n (e.g. 0/4)", quote(text));
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Reads a partial file. Every error names the file: not safetensors, not a partial file,
/// a missing or malformed metadata key, a missing or misshapen tensor, a tensor of another
/// dtype, or exact sums that no shard can produce.
pub fn read(path: &Path) -> Result<PartialFile> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, format!("cannot read: {e}")))?;
    from_bytes(&bytes, path)
}

/// [`read`] on the bytes of a partial file; errors name `origin` (a file, or e.g. `rank 3`).
pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<PartialFile> {
    use ::safetensors::{Dtype, SafeTensors};
    let path = origin;
    let not_safetensors = |e: ::safetensors::SafeTensorError| io_error(path, format!("not a safetensors file ({})", quote(&e.to_string())));
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let bad = |message: String| io_error(path, message);
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a partial file of fisher-engine (no format \"{FORMAT}\" in its metadata; partial files are written by fisher compute --shard i/n --partial)"
        )));
    }
    let key = |k: &str| meta.get(k).ok_or_else(|| bad(format!("the metadata has no '{k}'")));
    let number = |k: &str| -> Result<usize> { key(k)?.parse().map_err(|_| bad(format!("metadata '{k}' is not a count: '{}'", quote(&meta[k])))) };
    if key("partial_version")? != "1" {
        return Err(bad(format!("partial_version '{}' is not supported (1)", quote(&meta["partial_version"]))));
    }
    let form: NetForm = key("form")?.parse().map_err(|e: FisherError| bad(e.to_string()))?;
    let shard = parse_shard(key("shard")?).map_err(|e| bad(format!("metadata 'shard': {e}")))?;
    let range = key("range")?
        .split_once("..")
        .and_then(|(a, b)| Some(a.parse::<usize>().ok()?..b.parse::<usize>().ok()?))
        .filter(|r| r.start <= r.end)
        .ok_or_else(|| bad(format!("metadata 'range' is not start..end: '{}'", quote(&meta["range"]))))?;
    let (samples, total, block) = (number("samples")?, number("total_samples")?, number("block_samples")?);
    if block == 0 || range.end > total || samples != range.len() {
        return Err(bad(format!("samples {samples}, range {range:?}, total {total} and block {block} do not agree")));
    }
    let layers: Vec<SumLayer> =
        serde_json::from_str(key("layers")?).map_err(|e| bad(format!("metadata 'layers': {}", quote(&e.to_string()))))?;
    let result_metadata: HashMap<String, String> = serde_json::from_str(key("result_metadata")?)
        .map_err(|e| bad(format!("metadata 'result_metadata': {}", quote(&e.to_string()))))?;
    let layout = part_layout(form, &layers).map_err(|e| bad(e.to_string()))?;

    let file = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<&[u8]> {
        let view = file.tensor(name).map_err(|_| bad(format!("tensor '{}' is missing", quote(name))))?;
        if view.dtype() != dtype || view.shape() != shape {
            return Err(bad(format!(
                "tensor '{}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                quote(name),
                view.dtype(),
                view.shape()
            )));
        }
        Ok(view.data())
    };
    let expected: usize = 3 * layout.len();
    if file.len() != expected {
        return Err(bad(format!("holds {} tensors, expected {expected} for the {} form", file.len(), form.name())));
    }
    let mut parts = Vec::with_capacity(layout.len());
    for (name, len) in &layout {
        let tops = tensor(&format!("{name}.tops"), Dtype::U8, &[*len])?.to_vec();
        let raw = tensor(&format!("{name}.folds"), Dtype::I64, &[*len, FOLDS])?;
        let folds = raw
            .chunks_exact(8 * FOLDS)
            .map(|c| std::array::from_fn(|k| i64::from_le_bytes(c[8 * k..8 * k + 8].try_into().expect("8 bytes"))))
            .collect();
        tensor(&format!("{name}.sum"), Dtype::F64, &[*len])?;
        parts.push(ExactSum::from_parts(tops, folds).map_err(|e| bad(format!("part {name}: {e}")))?);
    }
    Ok(PartialFile {
        sums: NetSums { form, layers, samples, parts },
        shard,
        range,
        total,
        block,
        fingerprint: key("fingerprint")?.clone(),
        backend: key("backend")?.clone(),
        result_metadata,
    })
}
