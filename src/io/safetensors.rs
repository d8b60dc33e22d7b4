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

/// The header of a safetensors file of f32 `tensors` (name, shape) and `metadata`: the
/// 8-byte length and the JSON, padded with spaces to a multiple of 8 bytes so that the data
/// after it is aligned; and for each tensor (in the order given) the byte range of its data
/// after the header. The data are stored in the order of the names.
fn layout(path: &Path, tensors: &[(&str, &[usize])], metadata: Option<HashMap<String, String>>) -> Result<(Vec<u8>, Vec<std::ops::Range<u64>>)> {
    use ::safetensors::tensor::{Metadata, TensorInfo};

    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(tensors[b].0));
    let overflow = || FisherError::InvalidInput(format!("the tensors to write to {} overflow the address space", path.display()));
    let mut infos = Vec::with_capacity(order.len());
    let mut ranges = vec![0..0; tensors.len()];
    let mut offset = 0usize;
    for &k in &order {
        let (name, shape) = tensors[k];
        let bytes = shape.iter().try_fold(4usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)?;
        let end = offset.checked_add(bytes).ok_or_else(overflow)?;
        infos.push((name.to_string(), TensorInfo { dtype: ::safetensors::Dtype::F32, shape: shape.to_vec(), data_offsets: (offset, end) }));
        ranges[k] = offset as u64..end as u64;
        offset = end;
    }
    let header = Metadata::new(metadata, infos)
        .and_then(|m| header_json(&m).map_err(Into::into))
        .map_err(|e| io_error(path, format!("cannot build the safetensors header: {e}")))?;
    let mut json = header.into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok((out, ranges))
}

/// [`write_safetensors_atomic`] on borrowed values (no copy of a large result).
pub fn write_tensor_refs(
    path: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    check_output_path(path)?;
    for (name, shape, values) in tensors {
        let elements: usize = shape.iter().product();
        if elements != values.len() {
            return Err(FisherError::InvalidInput(format!(
                "tensor '{name}' has shape {shape:?} ({elements} values) but {} values",
                values.len()
            )));
        }
    }
    let names: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect();
    let (header, ranges) = layout(path, &names, metadata)?;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&k| ranges[k].start);

    // The command applied the output policy (force, inputs) before computing; here the
    // path is resolved again for the write itself: a regular file is written to a temporary
    // file renamed into place, a device or FIFO written through.
    let target = Target::check(path, "the output", true, &[])?;
    target.write("", |out| {
        out.write_all(&header)?;
        let mut bytes = Vec::with_capacity(1 << 16);
        for &k in &order {
            for block in tensors[k].2.chunks(1 << 14) {
                bytes.clear();
                bytes.extend(block.iter().flat_map(|v| v.to_le_bytes()));
                out.write_all(&bytes)?;
            }
        }
        Ok(())
    })
}

/// A safetensors file written piece by piece, at the offsets of its tensors, by a
/// computation that never holds a whole result (see [`crate::fisher::ResultSink`]): the
/// header is known before any value (names, shapes, metadata), so it is written first and
/// every value goes to its place with a positioned write.
///
/// The output policy is that of [`write_tensor_refs`], whose bytes this writes for the same
/// tensors: a temporary file beside the destination, renamed into place by
/// [`SafetensorsStream::commit`] only once every value has been put; dropped before that
/// (an error, a panic), the temporary file is removed and the destination is untouched.
/// Only regular files can be written this way: [`SafetensorsStream::create`] gives `None`
/// for a device, FIFO or socket, which takes the whole result in order.
pub struct SafetensorsStream {
    path: std::path::PathBuf,
    #[cfg(unix)]
    mode: Option<u32>,
    temp: Option<tempfile::NamedTempFile>,
    data_start: u64,
    ranges: Vec<std::ops::Range<u64>>,
    /// Values put so far per tensor, to check at the end that each was put once.
    put: Vec<u64>,
    bytes: Vec<u8>,
}

impl SafetensorsStream {
    /// Starts the file `path` of f32 `tensors` (name, shape; numbered in this order for
    /// [`SafetensorsStream::put`]) and `metadata`. Its size is reserved (sparsely) at once.
    pub fn create(path: &Path, tensors: &[(String, Vec<usize>)], metadata: Option<HashMap<String, String>>) -> Result<Option<Self>> {
        check_output_path(path)?;
        let target = Target::check(path, "the output", true, &[])?;
        let (path, mode) = match target {
            Target::Stream { .. } => return Ok(None),
            #[cfg(unix)]
            Target::File { path, mode } => (path, mode),
            #[cfg(not(unix))]
            Target::File { path } => (path, None::<u32>),
        };
        let names: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        let (header, ranges) = layout(&path, &names, metadata)?;
        let fail = |e: std::io::Error| io_error(&path, format!("cannot write: {e}"));
        let temp = super::output::output_temp_file(super::output::output_dir(&path), "").map_err(fail)?;
        let data_start = header.len() as u64;
        let total = data_start + ranges.iter().map(|r| r.end).max().unwrap_or(0);
        {
            use std::io::Write;
            let mut file = temp.as_file();
            file.write_all(&header).map_err(fail)?;
            temp.as_file().set_len(total).map_err(fail)?;
        }
        Ok(Some(SafetensorsStream {
            path,
            #[cfg(unix)]
            mode,
            temp: Some(temp),
            data_start,
            put: vec![0; ranges.len()],
            ranges,
            bytes: Vec::new(),
        }))
    }

    /// Writes `values` into tensor `tensor` from its flat (row-major) index `at` on.
    pub fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> Result<()> {
        let range = self.ranges.get(tensor).cloned().ok_or_else(|| FisherError::InvalidInput(format!("no tensor {tensor} in {}", self.path.display())))?;
        let start = (at as u64).checked_mul(4).map(|b| range.start + b);
        let end = start.and_then(|s| s.checked_add(values.len() as u64 * 4));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(FisherError::InvalidInput(format!("values {at}+{} overflow tensor {tensor}", values.len())));
        };
        if end > range.end {
            return Err(FisherError::InvalidInput(format!("values {at}+{} outside tensor {tensor} of {}", values.len(), self.path.display())));
        }
        self.bytes.clear();
        self.bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let file = self.temp.as_ref().expect("open until commit").as_file();
        write_all_at(file, &self.bytes, self.data_start + start).map_err(|e| io_error(&self.path, format!("cannot write: {e}")))?;
        self.put[tensor] += values.len() as u64;
        Ok(())
    }

    /// Checks that every value was put, syncs the file and renames it into place.
    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp.take().expect("open until commit");
        for (k, (range, &count)) in self.ranges.iter().zip(&self.put).enumerate() {
            if count * 4 != range.end - range.start {
                return Err(FisherError::InvalidInput(format!(
                    "tensor {k} of {} got {count} of its {} values; nothing was written",
                    self.path.display(),
                    (range.end - range.start) / 4
                )));
            }
        }
        let fail = |e: std::io::Error| io_error(&self.path, format!("cannot write: {e}"));
        temp.as_file().sync_all().map_err(fail)?;
        #[cfg(unix)]
        if let Some(mode) = self.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        }
        super::output::persist(temp, &self.path).map_err(fail)
    }
}

impl Drop for SafetensorsStream {
    fn drop(&mut self) {
        // Not committed: the temporary file goes (tempfile removes it) and off the registry.
        if let Some(temp) = self.temp.take() {
            let path = temp.path().to_path_buf();
            drop(temp);
            super::output::forget(&path);
        }
    }
}

impl crate::fisher::ResultSink for SafetensorsStream {
    fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> Result<()> {
        SafetensorsStream::put(self, tensor, at, values)
    }
}

#[cfg(unix)]
fn write_all_at(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_all_at(mut file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        // Names out of order: the file stores them sorted, the stream numbers them as given.
        vec![
            ("zeta".to_string(), vec![3, 3], (0..9).map(|v| v as f32 * 0.5).collect()),
            ("alpha".to_string(), vec![5], vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 7.0]),
            ("empty".to_string(), vec![0, 4], Vec::new()),
        ]
    }

    fn metadata() -> Option<HashMap<String, String>> {
        Some(HashMap::from([("form".to_string(), "full".to_string()), ("b".to_string(), "2".to_string())]))
    }

    fn left_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn a_stream_writes_the_bytes_of_the_whole_writer_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let (whole, pieces) = (dir.path().join("whole.safetensors"), dir.path().join("pieces.safetensors"));
        write_safetensors_atomic(&whole, &tensors(), metadata()).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        let mut stream = SafetensorsStream::create(&pieces, &shapes, metadata()).unwrap().expect("a regular file");
        // Backwards, in runs of two values.
        for (k, (_, _, values)) in tensors().iter().enumerate().rev() {
            for (c, run) in values.chunks(2).enumerate().rev() {
                stream.put(k, 2 * c, run).unwrap();
            }
        }
        assert!(!pieces.exists(), "nothing at the destination before commit");
        stream.commit().unwrap();
        assert_eq!(std::fs::read(&pieces).unwrap(), std::fs::read(&whole).unwrap());
        let (read, meta) = read_safetensors(&pieces).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(meta.get("b").map(String::as_str), Some("2"));
    }

    #[test]
    fn an_unfinished_or_dropped_stream_leaves_nothing_and_bad_puts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let shapes: Vec<(String, Vec<usize>)> = tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        // A value short: commit refuses, names the tensor, and leaves no file.
        let mut stream = SafetensorsStream::create(&path, &shapes, None).unwrap().unwrap();
        stream.put(0, 0, &[0.0; 9]).unwrap();
        stream.put(1, 0, &[0.0; 4]).unwrap();
        let err = stream.commit().unwrap_err().to_string();
        assert!(err.contains("tensor 1") && err.contains("4 of its 5"), "{err}");
        assert!(left_in(dir.path()).is_empty(), "{:?}", left_in(dir.path()));
        // Out of range, past the end, another tensor: errors; then dropped mid-way.
        let mut stream = SafetensorsStream::create(&path, &shapes, None).unwrap().unwrap();
        assert!(stream.put(1, 4, &[1.0, 2.0]).is_err());
        assert!(stream.put(3, 0, &[1.0]).is_err());
        assert!(stream.put(0, usize::MAX / 2, &[1.0]).is_err());
        stream.put(0, 0, &[1.0; 9]).unwrap();
        drop(stream);
        assert!(left_in(dir.path()).is_empty(), "{:?}", left_in(dir.path()));
        // An existing file is replaced only on commit.
        std::fs::write(&path, b"old").unwrap();
        let stream = SafetensorsStream::create(&path, &shapes, None).unwrap().unwrap();
        drop(stream);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // A device is not a regular file: the caller writes the whole result through it.
        assert!(SafetensorsStream::create(Path::new("/dev/null"), &shapes, None).unwrap().is_none());
    }
}
