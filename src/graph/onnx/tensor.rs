//! Constant tensors at import: decoding a `TensorProto` (inline or external data) within
//! limits, and the values the constant evaluator works on.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use super::proto::{data_type as dt, TensorProto};

/// The most elements one tensor computed at import may hold (2²⁶ = 64 Mi; an initializer may
/// be larger, bounded by the bytes that hold it). Shape arithmetic never comes near it; a
/// folded tensor that does is a hostile or mistaken file.
pub const MAX_FOLDED_ELEMENTS: usize = 1 << 26;

/// Element type of a constant, as the evaluator tracks it (ONNX `Cast` and integer
/// arithmetic need to know it; floats are held as f32, integers as i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// FLOAT (and DOUBLE, held as f32).
    Float,
    /// Any integer type, held as i64.
    Int,
    /// BOOL, held as 0/1.
    Bool,
}

/// The values of a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Floating-point values.
    F(Vec<f32>),
    /// Integer or boolean values.
    I(Vec<i64>),
}

impl Data {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Data::F(v) => v.len(),
            Data::I(v) => v.len(),
        }
    }
}

/// Where a constant comes from, so that a trainable slot can tell a parameter (an
/// initializer, or `Transpose(initializer)` for PyTorch's `x @ W.T`) from a computed value.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Built from `Constant` nodes and shapes only.
    Pure,
    /// Initializer number `i` itself.
    Init(usize),
    /// The 2-D initializer number `i`, transposed.
    InitT(usize),
    /// Computed from these initializers.
    Derived(Vec<usize>),
}

impl Origin {
    /// The initializers a value depends on.
    pub fn inits(&self) -> Vec<usize> {
        match self {
            Origin::Pure => Vec::new(),
            Origin::Init(i) | Origin::InitT(i) => vec![*i],
            Origin::Derived(v) => v.clone(),
        }
    }

    /// The origin of a value computed from values of `origins`.
    pub fn derived<'a>(origins: impl IntoIterator<Item = &'a Origin>) -> Origin {
        let mut all: Vec<usize> = origins.into_iter().flat_map(Origin::inits).collect();
        all.sort_unstable();
        all.dedup();
        if all.is_empty() {
            Origin::Pure
        } else {
            Origin::Derived(all)
        }
    }
}

/// A constant tensor known at import: its full shape (no implicit batch axis), row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values (as many as the shape's product).
    pub data: Data,
    /// Provenance.
    pub origin: Origin,
}

impl Known {
    /// A pure float tensor.
    pub fn float(shape: Vec<usize>, v: Vec<f32>) -> Known {
        Known { dtype: DType::Float, shape, data: Data::F(v), origin: Origin::Pure }
    }

    /// A pure int64 tensor.
    pub fn int(shape: Vec<usize>, v: Vec<i64>) -> Known {
        Known { dtype: DType::Int, shape, data: Data::I(v), origin: Origin::Pure }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The values as integers (floats truncated toward zero, as `Cast` does).
    pub fn ints(&self) -> Vec<i64> {
        match &self.data {
            Data::I(v) => v.clone(),
            Data::F(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }

    /// The values as floats.
    pub fn floats(&self) -> Vec<f32> {
        match &self.data {
            Data::F(v) => v.clone(),
            Data::I(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The single value of a one-element tensor, as f64.
    pub fn scalar(&self) -> Option<f64> {
        if self.len() != 1 {
            return None;
        }
        Some(match &self.data {
            Data::F(v) => f64::from(v[0]),
            Data::I(v) => v[0] as f64,
        })
    }
}

/// The product of `dims`, refused when negative or when it overflows.
pub fn element_count(dims: &[i64]) -> Result<(Vec<usize>, usize), String> {
    let mut shape = Vec::with_capacity(dims.len().min(64));
    let mut count: usize = 1;
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| format!("negative dimension {d} in {dims:?}"))?;
        count = count.checked_mul(d).ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
        shape.push(d);
    }
    Ok((shape, count))
}

/// Decodes `t` (an initializer or a `Constant` attribute) of the model in `model_dir`.
/// `Err` is a message without the file or tensor name (the caller adds them).
pub fn decode(t: &TensorProto, model_dir: &Path) -> Result<Known, String> {
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    if t.dims.len() > 64 {
        return Err(format!("rank {} is beyond any network tensor", t.dims.len()));
    }
    let (shape, count) = element_count(&t.dims)?;
    let (dtype, width) = match t.data_type {
        dt::FLOAT => (DType::Float, 4),
        dt::DOUBLE => (DType::Float, 8),
        dt::INT64 | dt::UINT64 => (DType::Int, 8),
        dt::INT32 | dt::UINT32 => (DType::Int, 4),
        dt::INT16 | dt::UINT16 => (DType::Int, 2),
        dt::INT8 | dt::UINT8 => (DType::Int, 1),
        dt::BOOL => (DType::Bool, 1),
        other => return Err(format!("data type {} is not supported", dt::name(other))),
    };
    let external = t.data_location == 1 || !t.external_data.is_empty();
    let raw: Option<Vec<u8>> = if external {
        Some(read_external(t, model_dir, count, width)?)
    } else if !t.raw_data.is_empty() || count == 0 {
        Some(t.raw_data.clone())
    } else {
        None
    };
    let data = match raw {
        Some(bytes) => {
            let expected = count.checked_mul(width).ok_or("tensor size overflows")?;
            if bytes.len() != expected {
                return Err(format!("holds {} bytes; shape {shape:?} needs {expected}", bytes.len()));
            }
            from_le_bytes(t.data_type, &bytes)
        }
        None => {
            let (n, data) = match t.data_type {
                dt::FLOAT => (t.float_data.len(), Data::F(t.float_data.clone())),
                dt::DOUBLE => (t.double_data.len(), Data::F(t.double_data.iter().map(|&x| x as f32).collect())),
                dt::INT64 => (t.int64_data.len(), Data::I(t.int64_data.clone())),
                dt::UINT32 | dt::UINT64 => {
                    (t.uint64_data.len(), Data::I(t.uint64_data.iter().map(|&x| x.min(i64::MAX as u64) as i64).collect()))
                }
                _ => (t.int32_data.len(), Data::I(t.int32_data.iter().map(|&x| i64::from(x)).collect())),
            };
            if n != count {
                return Err(format!("holds {n} values; shape {shape:?} needs {count}"));
            }
            data
        }
    };
    let data = match (dtype, data) {
        (DType::Bool, Data::I(v)) => Data::I(v.into_iter().map(|x| i64::from(x != 0)).collect()),
        (_, d) => d,
    };
    Ok(Known { dtype, shape, data, origin: Origin::Pure })
}

/// Little-endian fixed-width values (`raw_data` and external data) to [`Data`].
fn from_le_bytes(data_type: i32, b: &[u8]) -> Data {
    fn chunks<const W: usize>(b: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
        // Exact: the caller checked that the length is a multiple of W.
        b.chunks_exact(W).map(|c| {
            let mut a = [0u8; W];
            a.copy_from_slice(c);
            a
        })
    }
    match data_type {
        dt::FLOAT => Data::F(chunks::<4>(b).map(f32::from_le_bytes).collect()),
        dt::DOUBLE => Data::F(chunks::<8>(b).map(|a| f64::from_le_bytes(a) as f32).collect()),
        dt::INT64 => Data::I(chunks::<8>(b).map(i64::from_le_bytes).collect()),
        dt::UINT64 => Data::I(chunks::<8>(b).map(|a| u64::from_le_bytes(a).min(i64::MAX as u64) as i64).collect()),
        dt::INT32 => Data::I(chunks::<4>(b).map(|a| i64::from(i32::from_le_bytes(a))).collect()),
        dt::UINT32 => Data::I(chunks::<4>(b).map(|a| i64::from(u32::from_le_bytes(a))).collect()),
        dt::INT16 => Data::I(chunks::<2>(b).map(|a| i64::from(i16::from_le_bytes(a))).collect()),
        dt::UINT16 => Data::I(chunks::<2>(b).map(|a| i64::from(u16::from_le_bytes(a))).collect()),
        dt::INT8 => Data::I(b.iter().map(|&x| i64::from(x as i8)).collect()),
        // UINT8 and BOOL.
        _ => Data::I(b.iter().map(|&x| i64::from(x)).collect()),
    }
}

/// The bytes of an externally stored tensor: `location` is relative to the model's
/// directory and may not leave it (no absolute path, no `..`), and `offset` + `length` must
/// lie inside the data file, whose size is checked before anything is read.
///
/// The check is lexical: a symbolic link inside the model's directory is followed (model
/// caches such as Hugging Face's link their files to a blob store); what a hostile *file*
/// cannot do is name a path outside the directory it was given in.
fn read_external(t: &TensorProto, model_dir: &Path, count: usize, width: usize) -> Result<Vec<u8>, String> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for kv in &t.external_data {
        match kv.key.as_str() {
            "location" => location = Some(kv.value.as_str()),
            "offset" => offset = kv.value.parse().map_err(|_| format!("external data offset {:?} is not a number", kv.value))?,
            "length" => {
                length = Some(kv.value.parse().map_err(|_| format!("external data length {:?} is not a number", kv.value))?)
            }
            // "checksum" and future keys do not change where the bytes are.
            _ => {}
        }
    }
    let location = location.filter(|l| !l.is_empty()).ok_or("external data without a location")?;
    let rel = Path::new(location);
    if rel.is_absolute() || location.starts_with('/') || location.starts_with('\\') {
        return Err(format!("external data location {location:?} is an absolute path; it must be relative to the model's directory"));
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("external data location {location:?} leaves the model's directory"));
    }
    let path = model_dir.join(rel);
    let mut file = File::open(&path).map_err(|e| format!("cannot open external data {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat external data {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("external data {} is not a regular file", path.display()));
    }
    let file_len = meta.len();
    let expected = (count as u64).checked_mul(width as u64).ok_or("tensor size overflows")?;
    let length = length.unwrap_or(expected);
    if length != expected {
        return Err(format!("external data length {length} bytes; the shape needs {expected}"));
    }
    let end = offset.checked_add(length).ok_or("external data offset + length overflows")?;
    if end > file_len {
        return Err(format!(
            "external data bytes {offset}..{end} lie beyond the end of {} ({file_len} bytes)",
            path.display()
        ));
    }
    let len = usize::try_from(length).map_err(|_| "external data too large for this machine".to_string())?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(bytes)
}
