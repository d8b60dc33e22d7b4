//! Loading and checking a network's data: inputs and labels or targets from `.npy` files.
//!
//! * Inputs: N×d, float32 or float64 (rounded to f32), C order (what `np.save` writes for a
//!   normal array).
//! * Categorical labels: class indices, int32 or int64 (any numpy integer type is accepted),
//!   shape (N,) or (N, 1).
//! * Gaussian targets: N×k, float32 or float64 (integers are accepted too), or (N,) read as N×1.
//!
//! [`Dataset::from_npy`] checks what can be checked without the model (file format, dtype,
//! rank, N of both files agreeing, negative labels, NaN/±Inf); [`Dataset::validate`] checks
//! the data against a model (input width, label range, target width). Every error is one
//! line naming the file, or the row and column, at fault.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use ndarray::Array2;
use npyz::{Endianness, TypeChar};

use super::{Dataset, Likelihood, Mlp, Targets};
use crate::error::{FisherError, Result};
use crate::validate::check_matrix;

/// The element types we read from `.npy` files.
enum NpyValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Any integer dtype, widened (class labels are often saved as int64, int32 or uint8).
    Int(Vec<i64>),
}

/// A whole `.npy` array: its shape, its values in C order and numpy's name for its dtype.
struct NpyArray {
    shape: Vec<usize>,
    values: NpyValues,
    dtype: String,
}

use crate::io::io_error;
use crate::io::npy::{read_npy_header, NpyDtype};

fn invalid(path: &Path, message: impl std::fmt::Display) -> FisherError {
    FisherError::InvalidInput(format!("{}: {message}", path.display()))
}

/// Reads a whole `.npy` file of float32/float64 or any integer dtype (either byte order) in
/// C order.
///
/// This is a private helper rather than `crate::io::read_npy_matrix` because labels need
/// integer dtypes and 1-D shapes, which that reader (float matrices only) refuses. The header
/// is checked by [`crate::io::npy::read_npy_header`], and the data length the shape claims
/// is checked against the file (with checked arithmetic) before the values are allocated.
fn read_npy(path: &Path) -> Result<NpyArray> {
    let file = File::open(path).map_err(|e| io_error(path, format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| io_error(path, format!("cannot read: {e}")))?.len();
    let mut reader = BufReader::new(file);
    let header = read_npy_header(path, &mut reader, file_len)?;
    let dtype_name = crate::io::numpy_dtype_name(&header.dtype);
    let too_large = || io_error(path, format!("shape {} is too large for this machine", numpy_shape_u64(&header.shape)));
    let shape = header
        .shape
        .iter()
        .map(|&n| usize::try_from(n))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| too_large())?;
    if shape.len() > 1 && header.fortran_order {
        return Err(io_error(
            path,
            "array is in Fortran order; save a C-order array (np.save(path, np.ascontiguousarray(x)))",
        ));
    }
    let unsupported =
        || invalid(path, format!("dtype {dtype_name} is not supported (float32, float64 or an integer type)"));
    let NpyDtype::Plain(ts) = &header.dtype else { return Err(unsupported()) };
    let kind = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4 | 8) => 'f',
        (TypeChar::Int, 1 | 2 | 4 | 8) => 'i',
        (TypeChar::Uint, 1 | 2 | 4 | 8) => 'u',
        _ => return Err(unsupported()),
    };
    let size = ts.size_field() as usize;
    let expected = header.data_bytes(size as u64).ok_or_else(too_large)?;
    let present = file_len.saturating_sub(header.data_start);
    if present < expected {
        return Err(io_error(
            path,
            format!(
                "is truncated: shape {} of {dtype_name} needs {expected} bytes of data but the file holds {present}",
                numpy_shape(&shape)
            ),
        ));
    }
    // Bounded by the file's length (checked above), not by the header's word.
    let mut bytes = vec![0u8; usize::try_from(expected).map_err(|_| too_large())?];
    reader.read_exact(&mut bytes).map_err(|e| io_error(path, format!("cannot read the data: {e}")))?;
    let big_endian = ts.endianness() == Endianness::Big;
    let word = |chunk: &[u8]| -> [u8; 8] {
        // Right-aligned in little-endian order, sign-extended below for signed integers.
        let mut le = [0u8; 8];
        for (k, &b) in chunk.iter().enumerate() {
            le[if big_endian { chunk.len() - 1 - k } else { k }] = b;
        }
        le
    };
    let values = match (kind, size) {
        ('f', 4) => NpyValues::F32(bytes.chunks_exact(4).map(|c| f32::from_bits(u64::from_le_bytes(word(c)) as u32)).collect()),
        ('f', _) => NpyValues::F64(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(word(c))).collect()),
        ('i', _) => {
            let shift = 64 - 8 * size as u32;
            NpyValues::Int(bytes.chunks_exact(size).map(|c| (i64::from_le_bytes(word(c)) << shift) >> shift).collect())
        }
        _ => {
            let wide = bytes.chunks_exact(size).map(|c| i64::try_from(u64::from_le_bytes(word(c))));
            NpyValues::Int(
                wide.collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| invalid(path, "uint64 value beyond the int64 range"))?,
            )
        }
    };
    Ok(NpyArray { shape, values, dtype: dtype_name })
}

fn numpy_shape_u64(shape: &[u64]) -> String {
    crate::io::npy::numpy_shape(shape)
}

/// numpy's spelling of a shape: `(5,)`, `(2, 3)`.
fn numpy_shape(shape: &[usize]) -> String {
    numpy_shape_u64(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

/// Converts floats (or, when `allow_int`, integers) to an `rows × cols` f32 matrix; `what`
/// names the data in errors. f64 values beyond the f32 range are refused rather than
/// silently becoming ±inf.
fn to_f32_matrix(
    path: &Path,
    what: &str,
    array: NpyArray,
    (rows, cols): (usize, usize),
    allow_int: bool,
) -> Result<Array2<f32>> {
    let NpyArray { values, dtype, .. } = array;
    let values: Vec<f32> = match values {
        NpyValues::F32(v) => v,
        NpyValues::F64(v) => {
            if let Some(flat) = v.iter().position(|x| x.is_finite() && !(*x as f32).is_finite()) {
                return Err(invalid(
                    path,
                    format!(
                        "{what} value {:e} at row {}, column {} is beyond the float32 range",
                        v[flat],
                        flat / cols,
                        flat % cols
                    ),
                ));
            }
            v.into_iter().map(|x| x as f32).collect()
        }
        NpyValues::Int(v) if allow_int => v.into_iter().map(|x| x as f32).collect(),
        NpyValues::Int(_) => {
            return Err(invalid(path, format!("{what} have dtype {dtype}; expected float32 or float64")))
        }
    };
    Array2::from_shape_vec((rows, cols), values).map_err(|e| invalid(path, format!("{what}: {e}")))
}


/// Reads the labels (categorical) or targets (Gaussian) of `n` inputs (see
/// [`Dataset::from_npy`]).
fn read_targets(inputs: &Path, labels: &Path, n: usize, likelihood: Likelihood) -> Result<Targets> {
        let y = read_npy(labels)?;
        let label_rows = y.shape.first().copied().unwrap_or(0);
        if label_rows != n || y.shape.is_empty() {
            return Err(FisherError::InvalidInput(format!(
                "inputs {} have {n} rows but labels {} have {} (shape {})",
                inputs.display(),
                labels.display(),
                if y.shape.is_empty() { "none".to_string() } else { label_rows.to_string() },
                numpy_shape(&y.shape)
            )));
        }
        let targets = match likelihood {
            Likelihood::Categorical => {
                if !matches!(y.shape[..], [_] | [_, 1]) {
                    return Err(invalid(
                        labels,
                        format!(
                            "labels have shape {}; the categorical likelihood needs class indices of shape ({n},) or ({n}, 1)",
                            numpy_shape(&y.shape)
                        ),
                    ));
                }
                let wide: Vec<i64> = match y.values {
                    NpyValues::Int(v) => v,
                    NpyValues::F32(_) | NpyValues::F64(_) => {
                        return Err(invalid(
                            labels,
                            format!(
                                "labels have dtype {} but the categorical likelihood needs integer class \
                                 indices (int32 or int64; use --likelihood gaussian for real-valued targets)",
                                y.dtype
                            ),
                        ))
                    }
                };
                let classes = wide
                    .iter()
                    .enumerate()
                    .map(|(row, &label)| {
                        if label < 0 {
                            Err(invalid(
                                labels,
                                format!("label {label} at row {row} is negative; class indices start at 0"),
                            ))
                        } else {
                            u32::try_from(label).map_err(|_| {
                                invalid(
                                    labels,
                                    format!("label {label} at row {row} is too large for a class index"),
                                )
                            })
                        }
                    })
                    .collect::<Result<Vec<u32>>>()?;
                Targets::Classes(classes)
            }
            Likelihood::Gaussian => {
                let k = match y.shape[..] {
                    [_] => 1,
                    [_, k] => k,
                    _ => {
                        return Err(invalid(
                            labels,
                            format!(
                                "targets have shape {}; the Gaussian likelihood needs an N×k array",
                                numpy_shape(&y.shape)
                            ),
                        ))
                    }
                };
                if k == 0 {
                    return Err(FisherError::Empty {
                        what: format!("targets {}", labels.display()),
                        rows: n,
                        cols: 0,
                    });
                }
                let values = to_f32_matrix(labels, "targets", y, (n, k), true)?;
                check_matrix(&format!("targets {}", labels.display()), values.view(), 0)?;
                Targets::Values(values)
            }
        };
        Ok(targets)
}

impl Dataset {
    /// Reads inputs (N×d float32/float64) and labels (categorical: int32/int64 class indices
    /// of shape (N,) or (N, 1); Gaussian: N×k float targets, or (N,) read as N×1) from `.npy`
    /// files.
    ///
    /// Errors: [`FisherError::Io`] when a file cannot be read, is not `.npy` or is in Fortran
    /// order; [`FisherError::InvalidInput`] naming the file for another dtype or rank, N that
    /// differ between the files, and a negative label (with its row);
    /// [`FisherError::Empty`] for no samples or no columns; [`FisherError::NonFinite`] (row
    /// and column) for NaN/±Inf. Checks against the model are in [`Dataset::validate`].
    pub fn from_npy(inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<Dataset> {
        let x = read_npy(inputs)?;
        let (n, d) = match x.shape[..] {
            [n, d] => (n, d),
            _ => {
                return Err(invalid(
                    inputs,
                    format!(
                        "inputs have shape {}; expected a 2-D N×d array (use x.reshape(len(x), -1))",
                        numpy_shape(&x.shape)
                    ),
                ))
            }
        };
        if n == 0 || d == 0 {
            return Err(FisherError::Empty {
                what: format!("inputs {}", inputs.display()),
                rows: n,
                cols: d,
            });
        }
        let x = to_f32_matrix(inputs, "inputs", x, (n, d), false)?;
        check_matrix(&format!("inputs {}", inputs.display()), x.view(), 0)?;

        let targets = read_targets(inputs, labels, n, likelihood)?;
        Ok(Dataset { inputs: x, targets })
    }

    /// Reads inputs of any rank for a graph model: N × (per-sample shape), float32/float64
    /// features or integer token indices (stored as f32, so below 2²⁴ in magnitude), and the
    /// labels or targets as in [`Dataset::from_npy`]. Returns the data with the inputs
    /// flattened row-major per sample, the per-sample shape, and whether the inputs are
    /// integers.
    pub fn from_npy_any_rank(inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<(Dataset, Vec<usize>, bool)> {
        let x = read_npy(inputs)?;
        let Some((&n, rest)) = x.shape.split_first().filter(|(_, rest)| !rest.is_empty()) else {
            return Err(invalid(
                inputs,
                format!("inputs have shape {}; expected N × the model's input shape", numpy_shape(&x.shape)),
            ));
        };
        let per_sample = rest.to_vec();
        let d: usize = per_sample.iter().product();
        if n == 0 || d == 0 {
            return Err(FisherError::Empty { what: format!("inputs {}", inputs.display()), rows: n, cols: d });
        }
        let integer = matches!(x.values, NpyValues::Int(_));
        let x = match x.values {
            NpyValues::Int(v) => {
                if let Some((at, &bad)) = v.iter().enumerate().find(|(_, &t)| t.unsigned_abs() >= 1 << 24) {
                    return Err(invalid(
                        inputs,
                        format!("token {bad} at sample {}, position {} is beyond 2^24 (integer inputs are token indices)", at / d, at % d),
                    ));
                }
                Array2::from_shape_vec((n, d), v.into_iter().map(|t| t as f32).collect())
                    .map_err(|e| invalid(inputs, format!("inputs: {e}")))?
            }
            values => to_f32_matrix(inputs, "inputs", NpyArray { shape: vec![n, d], values, dtype: x.dtype }, (n, d), false)?,
        };
        check_matrix(&format!("inputs {}", inputs.display()), x.view(), 0)?;
        let targets = read_targets(inputs, labels, n, likelihood)?;
        Ok((Dataset { inputs: x, targets }, per_sample, integer))
    }

    /// Checks the data against `mlp` and `likelihood`: at least one sample and one column,
    /// as many targets as inputs, targets of the likelihood's kind, input width = the model's
    /// input width, finite inputs and targets, class labels below the number of outputs, and
    /// Gaussian target width = the number of outputs.
    pub fn validate(&self, mlp: &Mlp, likelihood: Likelihood) -> Result<()> {
        let (n, d) = self.inputs.dim();
        check_matrix("inputs", self.inputs.view(), 0)?;
        let label_rows = match &self.targets {
            Targets::Classes(c) => c.len(),
            Targets::Values(v) => v.nrows(),
        };
        if label_rows != n {
            return Err(FisherError::InvalidInput(format!(
                "the dataset has {n} inputs but {label_rows} labels"
            )));
        }
        let first = mlp.layers.first().map_or(0, |l| l.index);
        if d != mlp.input_dim() {
            return Err(FisherError::InvalidInput(format!(
                "inputs have {d} columns but the model's first layer ({first}.weight) expects {} inputs",
                mlp.input_dim()
            )));
        }
        let outputs = mlp.output_dim();
        match (&self.targets, likelihood) {
            (Targets::Classes(classes), Likelihood::Categorical) => {
                if let Some((row, &label)) = classes.iter().enumerate().find(|(_, &c)| c as usize >= outputs)
                {
                    return Err(FisherError::InvalidInput(format!(
                        "label {label} at row {row} is out of range: the model has {outputs} classes \
                         (outputs), so labels must be in 0..={}",
                        outputs.saturating_sub(1)
                    )));
                }
            }
            (Targets::Values(values), Likelihood::Gaussian) => {
                check_matrix("targets", values.view(), 0)?;
                if values.ncols() != outputs {
                    return Err(FisherError::InvalidInput(format!(
                        "targets have {} columns but the model has {outputs} outputs",
                        values.ncols()
                    )));
                }
            }
            (Targets::Values(_), Likelihood::Categorical) => {
                return Err(FisherError::InvalidInput(
                    "the categorical likelihood needs class labels, but the dataset has real-valued targets"
                        .into(),
                ))
            }
            (Targets::Classes(_), Likelihood::Gaussian) => {
                return Err(FisherError::InvalidInput(
                    "the Gaussian likelihood needs real-valued N×k targets, but the dataset has class labels"
                        .into(),
                ))
            }
        }
        Ok(())
    }
}
