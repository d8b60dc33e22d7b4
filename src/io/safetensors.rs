//! safetensors files: what `safetensors.torch.load_file` reads, written atomically, and
//! read back (F32 and F64 tensors, and the metadata).

use std::borrow::Cow;
use std::collections::HashMap;

use std::path::Path;

use crate::error::{FisherError, Result};
use crate::validate::quote;

use super::io_error;
use super::output::{check_output_path, Target};

/// One named tensor to write: name, shape (row-major), values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Writes `tensors` (f32, little-endian, row-major) and `metadata` as a safetensors file.
///
/// The bytes go to a temporary file in the destination directory, which is flushed, synced
/// and then renamed onto `path`; on any failure the temporary file is removed, so `path`
/// either holds the complete new file or is as it was. A missing directory is refused
/// before anything is created, with an error naming the directory.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let refs: Vec<TensorRef<'_>> = tensors
        .iter()
        .map(|(name, shape, values)| (name.clone(), shape.clone(), Cow::Borrowed(values.as_slice())))
        .collect();
    write_tensor_refs(path, &refs, metadata)
}

/// The JSON header of a safetensors file with its keys sorted (tensor names, and the
/// metadata's keys): `Metadata` keeps the metadata in a `HashMap`, whose order changes from
/// run to run, so serializing it directly made two runs with equal results write different
/// bytes. Going through `serde_json::Value` (a `BTreeMap` object) makes outputs
/// byte-reproducible.
pub(crate) fn header_json(metadata: &::safetensors::tensor::Metadata) -> serde_json::Result<String> {
    serde_json::to_string(&serde_json::to_value(metadata)?)
}

/// A tensor to write: name, shape (row-major), values (borrowed where possible).
pub type TensorRef<'a> = (String, Vec<usize>, Cow<'a, [f32]>);

/// [`write_safetensors_atomic`] on borrowed values (no copy of a large result).
pub fn write_tensor_refs(
    path: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use ::safetensors::tensor::{Metadata, TensorInfo};

    check_output_path(path)?;
    let mut order: Vec<&TensorRef<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (name, shape, values) in &order {
        let elements: usize = shape.iter().product();
        if elements != values.len() {
            return Err(FisherError::InvalidInput(format!(
                "tensor '{name}' has shape {shape:?} ({elements} values) but {} values",
                values.len()
            )));
        }
        let bytes = values.len() * 4;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: ::safetensors::Dtype::F32,
                shape: shape.clone(),
                data_offsets: (offset, offset + bytes),
            },
        ));
        offset += bytes;
    }
    let header = Metadata::new(metadata, infos)
        .and_then(|m| header_json(&m).map_err(Into::into))
        .map_err(|e| io_error(path, format!("cannot build the safetensors header: {e}")))?;
    // The format pads the JSON header with spaces to a multiple of 8 bytes, so that the data
    // that follows is aligned.
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');

    // The command applied the output policy (force, inputs) before computing; here the
    // path is resolved again for the write itself: a regular file is written to a temporary
    // file renamed into place, a device or FIFO written through.
    let target = Target::check(path, "the output", true, &[])?;
    target.write("", |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut bytes = Vec::with_capacity(1 << 16);
        for (_, _, values) in &order {
            for block in values.chunks(1 << 14) {
                bytes.clear();
                bytes.extend(block.iter().flat_map(|v| v.to_le_bytes()));
                out.write_all(&bytes)?;
            }
        }
        Ok(())
    })
}

/// Reads a whole safetensors file: its tensors as `(name, shape, f32 values)` (F32 and F64
/// accepted, F64 rounded to f32), sorted by name, and its metadata (empty when it has none).
/// The reverse of [`write_safetensors_atomic`], for reading back stored results.
///
/// Errors: [`FisherError::Io`] when the file cannot be read or is not safetensors;
/// [`FisherError::InvalidInput`], naming the file and the tensor, for another dtype or a
/// non-finite value.
pub fn read_safetensors(path: &Path) -> Result<(Vec<NamedTensor>, HashMap<String, String>)> {
    use ::safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).map_err(|e| io_error(path, format!("cannot read: {e}")))?;
    // The crate's messages can quote the header (a tensor's name): bounded like all input.
    let not_safetensors = |e: ::safetensors::SafeTensorError| {
        io_error(path, format!("not a safetensors file ({})", quote(&e.to_string())))
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;
    let invalid = |message: String| FisherError::InvalidInput(format!("{}: {message}", path.display()));
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            other => {
                return Err(invalid(format!("tensor '{}' has dtype {other:?}; only F32 and F64 are read", quote(&name))))
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "tensor '{}' has a non-finite value {} at flat index {i}",
                quote(&name),
                values[i]
            )));
        }
        tensors.push((name, view.shape().to_vec(), values));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, metadata))
}
