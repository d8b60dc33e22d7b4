//! Loading and checking a network's data: inputs and labels or targets from `.npy` files.
//!
//! * Inputs: N×d, float32 or float64 (rounded to f32), C order (what `np.save` writes for a
//!   normal array).
//! * Categorical labels: class indices, int32 or int64 (any numpy integer type is accepted),
//!   shape (N,) or (N, 1).
//! * Gaussian targets: N×k, float32 or float64 (integers are accepted too), or (N,) read as N×1.
//!
//! Two ways to hold them, with the same checks:
//! * [`Dataset::from_npy`] reads both files whole into memory (a [`Dataset`]);
//! * [`NpyDataset::open`] checks both files and keeps them open; the network paths then read
//!   one micro-batch at a time ([`DataSource`]), so host memory does not grow with N.
//!
//! Either way the files are checked in one pass of chunks of a few MiB (whatever N), before
//! any computation: what can be checked without the model (file format, dtype, rank, N of
//! both files agreeing, negative labels, float64 values beyond the float32 range, NaN/±Inf). [`DataSource::validate`] checks the data
//! against a model (input width, label range, target width). Every error is one line naming
//! the file, or the row and column, at fault.

use std::borrow::Cow;
use std::path::Path;

use ndarray::{s, Array2, CowArray, Ix2};

use super::source::{check_rows, DataSource, TargetRows};
use super::{Dataset, Likelihood, Mlp, Targets};
use crate::error::{FisherError, Result};
use crate::io::npy_file::{NpyFile, NpyValues};
use crate::validate::check_matrix;

fn invalid(path: &Path, message: impl std::fmt::Display) -> FisherError {
    FisherError::InvalidInput(format!("{}: {message}", path.display()))
}

/// numpy's spelling of a shape: `(5,)`, `(2, 3)`.
fn numpy_shape(shape: &[usize]) -> String {
    crate::io::npy::numpy_shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

/// Checks every value of a float (or integer, for Gaussian targets) file read as `cols`
/// columns, in one pass of chunks, and appends them as f32 to `keep` when given (loading).
///
/// Two checks, reported in this order whatever their positions, as when the whole array was
/// checked at once: a float64 value beyond the float32 range (it would silently become ±inf),
/// then the first NaN/±Inf ([`FisherError::NonFinite`], named `"{what} {path}"`). `what`
/// names the data in messages (`inputs`, `targets`).
fn check_floats(file: &NpyFile, what: &str, cols: usize, mut keep: Option<&mut Vec<f32>>) -> Result<()> {
    let path = file.path();
    let cols = cols.max(1);
    let non_finite_error = |flat: usize, value: f32| FisherError::NonFinite {
        what: format!("{what} {}", path.display()),
        row: flat / cols,
        col: flat % cols,
        value,
    };
    // Only float64 can hold a range error, so elsewhere the first NaN/±Inf ends the scan.
    let may_overflow = file.is_f64();
    let mut non_finite: Option<(usize, f32)> = None;
    file.for_each_chunk(|first, values| {
        if let NpyValues::F64(v) = &values {
            if let Some(k) = v.iter().position(|x| x.is_finite() && !(*x as f32).is_finite()) {
                let flat = first + k;
                return Err(invalid(
                    path,
                    format!("{what} value {:e} at row {}, column {} is beyond the float32 range", v[k], flat / cols, flat % cols),
                ));
            }
        }
        let v = values.into_f32();
        if non_finite.is_none() {
            if let Some(k) = v.iter().position(|x| !x.is_finite()) {
                if !may_overflow {
                    return Err(non_finite_error(first + k, v[k]));
                }
                non_finite = Some((first + k, v[k]));
            }
        }
        if let Some(out) = keep.as_deref_mut() {
            out.extend_from_slice(&v);
        }
        Ok(())
    })?;
    match non_finite {
        Some((flat, value)) => Err(non_finite_error(flat, value)),
        None => Ok(()),
    }
}

/// Checks the integer inputs of a graph model (token indices, below 2²⁴ in magnitude so that
/// f32 holds them exactly) and appends them as f32 to `keep`.
fn check_tokens(file: &NpyFile, per_sample: usize, keep: &mut Vec<f32>) -> Result<()> {
    let path = file.path();
    file.for_each_chunk(|first, values| {
        if let NpyValues::Int(v) = &values {
            if let Some((k, &bad)) = v.iter().enumerate().find(|(_, &t)| t.unsigned_abs() >= 1 << 24) {
                let at = first + k;
                return Err(invalid(
                    path,
                    format!(
                        "token {bad} at sample {}, position {} is beyond 2^24 (integer inputs are token indices)",
                        at / per_sample,
                        at % per_sample
                    ),
                ));
            }
        }
        keep.extend(values.into_f32());
        Ok(())
    })
}

/// The error for float labels under the categorical likelihood.
fn float_labels(file: &NpyFile) -> FisherError {
    invalid(
        file.path(),
        format!(
            "labels have dtype {} but the categorical likelihood needs integer class \
             indices (int32 or int64; use --likelihood gaussian for real-valued targets)",
            file.dtype()
        ),
    )
}

/// Checks every class label (non-negative, within u32) in one pass of chunks, appends them
/// to `keep` when given (loading), and returns the largest.
fn check_labels(file: &NpyFile, mut keep: Option<&mut Vec<u32>>) -> Result<u32> {
    let path = file.path();
    let mut largest = 0u32;
    file.for_each_chunk(|first, values| {
        let NpyValues::Int(v) = values else { return Err(float_labels(file)) };
        for (k, &label) in v.iter().enumerate() {
            let row = first + k;
            if label < 0 {
                return Err(invalid(path, format!("label {label} at row {row} is negative; class indices start at 0")));
            }
            let class = u32::try_from(label)
                .map_err(|_| invalid(path, format!("label {label} at row {row} is too large for a class index")))?;
            largest = largest.max(class);
            if let Some(out) = keep.as_deref_mut() {
                out.push(class);
            }
        }
        Ok(())
    })?;
    Ok(largest)
}

/// The first label at or above `bound`, with its row, by one pass over the labels (only
/// when [`check_labels`] found the largest there: an error is being reported).
fn first_label_from(file: &NpyFile, bound: u32) -> Result<Option<(usize, u32)>> {
    let mut found = None;
    file.for_each_chunk(|first, values| {
        if found.is_none() {
            if let NpyValues::Int(v) = values {
                found = v.iter().position(|&y| y >= i64::from(bound)).map(|k| (first + k, v[k] as u32));
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// The inputs file of an MLP, opened and its header checked: N×d float32/float64, N, d ≥ 1.
fn open_inputs(path: &Path) -> Result<(NpyFile, usize, usize)> {
    let file = NpyFile::open(path)?;
    let (n, d) = match file.shape()[..] {
        [n, d] => (n, d),
        _ => {
            return Err(invalid(
                path,
                format!(
                    "inputs have shape {}; expected a 2-D N×d array (use x.reshape(len(x), -1))",
                    numpy_shape(file.shape())
                ),
            ))
        }
    };
    if n == 0 || d == 0 {
        return Err(FisherError::Empty { what: format!("inputs {}", path.display()), rows: n, cols: d });
    }
    if !file.is_float() {
        return Err(invalid(path, format!("inputs have dtype {}; expected float32 or float64", file.dtype())));
    }
    Ok((file, n, d))
}

/// How the targets file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetsLayout {
    /// Class indices, one per sample.
    Classes,
    /// k real values per sample.
    Values { cols: usize },
}

/// The labels (categorical) or targets (Gaussian) file of `n` inputs, opened and its header
/// checked against N and the likelihood (see [`Dataset::from_npy`]).
fn open_targets(inputs: &Path, labels: &Path, n: usize, likelihood: Likelihood) -> Result<(NpyFile, TargetsLayout)> {
    let y = NpyFile::open(labels)?;
    let shape = y.shape();
    let label_rows = shape.first().copied().unwrap_or(0);
    if label_rows != n || shape.is_empty() {
        return Err(FisherError::InvalidInput(format!(
            "inputs {} have {n} rows but labels {} have {} (shape {})",
            inputs.display(),
            labels.display(),
            if shape.is_empty() { "none".to_string() } else { label_rows.to_string() },
            numpy_shape(shape)
        )));
    }
    let layout = match likelihood {
        Likelihood::Categorical => {
            if !matches!(shape[..], [_] | [_, 1]) {
                return Err(invalid(
                    labels,
                    format!(
                        "labels have shape {}; the categorical likelihood needs class indices of shape ({n},) or ({n}, 1)",
                        numpy_shape(shape)
                    ),
                ));
            }
            if y.is_float() {
                return Err(float_labels(&y));
            }
            TargetsLayout::Classes
        }
        Likelihood::Gaussian => {
            let k = match shape[..] {
                [_] => 1,
                [_, k] => k,
                _ => {
                    return Err(invalid(
                        labels,
                        format!("targets have shape {}; the Gaussian likelihood needs an N×k array", numpy_shape(shape)),
                    ))
                }
            };
            if k == 0 {
                return Err(FisherError::Empty { what: format!("targets {}", labels.display()), rows: n, cols: 0 });
            }
            TargetsLayout::Values { cols: k }
        }
    };
    Ok((y, layout))
}

/// Reads the checked targets file whole (checking it on the way).
fn load_targets(y: &NpyFile, layout: TargetsLayout, n: usize) -> Result<Targets> {
    Ok(match layout {
        TargetsLayout::Classes => {
            // n labels are present in the file (its length was checked against its shape).
            let mut classes = Vec::with_capacity(n);
            check_labels(y, Some(&mut classes))?;
            Targets::Classes(classes)
        }
        TargetsLayout::Values { cols } => {
            let mut values = Vec::with_capacity(n * cols);
            check_floats(y, "targets", cols, Some(&mut values))?;
            Targets::Values(Array2::from_shape_vec((n, cols), values).map_err(|e| invalid(y.path(), format!("targets: {e}")))?)
        }
    })
}

/// The data's input width against the model's.
fn check_width(d: usize, mlp: &Mlp) -> Result<()> {
    if d != mlp.input_dim() {
        let first = mlp.layers.first().map_or(0, |l| l.index);
        return Err(FisherError::InvalidInput(format!(
            "inputs have {d} columns but the model's first layer ({first}.weight) expects {} inputs",
            mlp.input_dim()
        )));
    }
    Ok(())
}

fn label_out_of_range(label: u32, row: usize, outputs: usize) -> FisherError {
    FisherError::InvalidInput(format!(
        "label {label} at row {row} is out of range: the model has {outputs} classes \
         (outputs), so labels must be in 0..={}",
        outputs.saturating_sub(1)
    ))
}

fn check_target_width(cols: usize, outputs: usize) -> Result<()> {
    if cols != outputs {
        return Err(FisherError::InvalidInput(format!("targets have {cols} columns but the model has {outputs} outputs")));
    }
    Ok(())
}

/// The error when the data's targets are not of the kind `likelihood` needs.
fn wrong_targets(likelihood: Likelihood) -> FisherError {
    FisherError::InvalidInput(match likelihood {
        Likelihood::Categorical => {
            "the categorical likelihood needs class labels, but the dataset has real-valued targets".into()
        }
        Likelihood::Gaussian => {
            "the Gaussian likelihood needs real-valued N×k targets, but the dataset has class labels".into()
        }
    })
}

impl Dataset {
    /// Reads inputs (N×d float32/float64) and labels (categorical: int32/int64 class indices
    /// of shape (N,) or (N, 1); Gaussian: N×k float targets, or (N,) read as N×1) from `.npy`
    /// files, whole, into memory ([`NpyDataset::open`] reads them a micro-batch at a time).
    ///
    /// Errors: [`FisherError::Io`] when a file cannot be read, is not `.npy` or is in Fortran
    /// order; [`FisherError::InvalidInput`] naming the file for another dtype or rank, N that
    /// differ between the files, and a negative label (with its row);
    /// [`FisherError::Empty`] for no samples or no columns; [`FisherError::NonFinite`] (row
    /// and column) for NaN/±Inf. Checks against the model are in [`Dataset::validate`].
    pub fn from_npy(inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<Dataset> {
        let (x_file, n, d) = open_inputs(inputs)?;
        // n × d values are present in the file (its length was checked against its shape).
        let mut x = Vec::with_capacity(n * d);
        check_floats(&x_file, "inputs", d, Some(&mut x))?;
        let x = Array2::from_shape_vec((n, d), x).map_err(|e| invalid(inputs, format!("inputs: {e}")))?;
        let (y, layout) = open_targets(inputs, labels, n, likelihood)?;
        let targets = load_targets(&y, layout, n)?;
        Ok(Dataset { inputs: x, targets })
    }

    /// Reads inputs of any rank for a graph model: N × (per-sample shape), float32/float64
    /// features or integer token indices (stored as f32, so below 2²⁴ in magnitude), and the
    /// labels or targets as in [`Dataset::from_npy`]. Returns the data with the inputs
    /// flattened row-major per sample, the per-sample shape, and whether the inputs are
    /// integers.
    pub fn from_npy_any_rank(inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<(Dataset, Vec<usize>, bool)> {
        let x = NpyFile::open(inputs)?;
        let Some((&n, rest)) = x.shape().split_first().filter(|(_, rest)| !rest.is_empty()) else {
            return Err(invalid(
                inputs,
                format!("inputs have shape {}; expected N × the model's input shape", numpy_shape(x.shape())),
            ));
        };
        let per_sample = rest.to_vec();
        // With N = 0 the file holds nothing, so the per-sample shape is bounded by nothing.
        let d = per_sample.iter().try_fold(1usize, |acc, &k| acc.checked_mul(k)).ok_or_else(|| {
            crate::io::io_error(inputs, format!("shape {} is too large for this machine", numpy_shape(x.shape())))
        })?;
        if n == 0 || d == 0 {
            return Err(FisherError::Empty { what: format!("inputs {}", inputs.display()), rows: n, cols: d });
        }
        let integer = !x.is_float();
        let mut values = Vec::with_capacity(n * d);
        if integer {
            check_tokens(&x, d, &mut values)?;
        } else {
            check_floats(&x, "inputs", d, Some(&mut values))?;
        }
        let values = Array2::from_shape_vec((n, d), values).map_err(|e| invalid(inputs, format!("inputs: {e}")))?;
        let (y, layout) = open_targets(inputs, labels, n, likelihood)?;
        let targets = load_targets(&y, layout, n)?;
        Ok((Dataset { inputs: values, targets }, per_sample, integer))
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
        check_width(d, mlp)?;
        let outputs = mlp.output_dim();
        match (&self.targets, likelihood) {
            (Targets::Classes(classes), Likelihood::Categorical) => {
                if let Some((row, &label)) = classes.iter().enumerate().find(|(_, &c)| c as usize >= outputs) {
                    return Err(label_out_of_range(label, row, outputs));
                }
            }
            (Targets::Values(values), Likelihood::Gaussian) => {
                check_matrix("targets", values.view(), 0)?;
                check_target_width(values.ncols(), outputs)?;
            }
            (_, likelihood) => return Err(wrong_targets(likelihood)),
        }
        Ok(())
    }
}

/// What the targets file of an [`NpyDataset`] holds, as its one pass found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetsFound {
    /// Class indices, the largest being `largest`.
    Classes { largest: u32 },
    /// k = `cols` real values per sample.
    Values { cols: usize },
}

/// A network's data on disk: the inputs and labels (or targets) `.npy` files, checked once
/// and read a micro-batch at a time, so that host memory does not grow with N.
///
/// [`NpyDataset::open`] makes every check [`Dataset::from_npy`] makes, with the same
/// messages, in one pass over each file in chunks of a few MiB; afterwards
/// [`DataSource::inputs`] and [`DataSource::targets`] read and decode (float64 → f32,
/// integers → u32, either byte order) just the rows asked for, by positioned reads into a
/// fresh micro-batch buffer. Nothing is mapped or kept: the pages read are the kernel's page
/// cache, not the process's memory.
///
/// ```
/// # use fisher_engine::model::{DataSource, Likelihood, NpyDataset};
/// # let dir = tempfile::tempdir()?;
/// # let (x, y) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
/// fisher_engine::io::write_npy_matrix(&x, ndarray::array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]].view())?;
/// fisher_engine::io::write_npy_labels(&y, &[0, 2, 1])?;
/// let data = NpyDataset::open(&x, &y, Likelihood::Categorical)?;
/// assert_eq!((data.len(), data.input_dim()), (3, 2));
/// assert_eq!(data.inputs(1, 2)?, ndarray::array![[3.0f32, 4.0], [5.0, 6.0]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct NpyDataset {
    inputs: NpyFile,
    labels: NpyFile,
    n: usize,
    d: usize,
    targets: TargetsFound,
}

impl NpyDataset {
    /// Opens and checks inputs and labels (see [`Dataset::from_npy`] for the formats and
    /// every error), reading each file once in chunks; nothing is kept but the open files.
    pub fn open(inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<NpyDataset> {
        let (x, n, d) = open_inputs(inputs)?;
        check_floats(&x, "inputs", d, None)?;
        let (y, layout) = open_targets(inputs, labels, n, likelihood)?;
        let targets = match layout {
            TargetsLayout::Classes => TargetsFound::Classes { largest: check_labels(&y, None)? },
            TargetsLayout::Values { cols } => {
                check_floats(&y, "targets", cols, None)?;
                TargetsFound::Values { cols }
            }
        };
        Ok(NpyDataset { inputs: x, labels: y, n, d, targets })
    }
}

impl DataSource for NpyDataset {
    fn len(&self) -> usize {
        self.n
    }

    fn input_dim(&self) -> usize {
        self.d
    }

    fn likelihood(&self) -> Likelihood {
        match self.targets {
            TargetsFound::Classes { .. } => Likelihood::Categorical,
            TargetsFound::Values { .. } => Likelihood::Gaussian,
        }
    }

    fn inputs(&self, s0: usize, m: usize) -> Result<CowArray<'_, f32, Ix2>> {
        check_rows(s0, m, self.n)?;
        // Checked at open: float32, or float64 within the float32 range.
        let values = self.inputs.read(s0 * self.d, m * self.d)?.into_f32();
        let x = Array2::from_shape_vec((m, self.d), values).map_err(|e| invalid(self.inputs.path(), format!("inputs: {e}")))?;
        Ok(CowArray::from(x))
    }

    fn targets(&self, s0: usize, m: usize) -> Result<TargetRows<'_>> {
        check_rows(s0, m, self.n)?;
        match self.targets {
            TargetsFound::Classes { largest } => {
                let NpyValues::Int(wide) = self.labels.read(s0, m)? else { return Err(float_labels(&self.labels)) };
                // Every label was checked at open; one that is not in 0..=largest now means
                // the file changed since, and would index past the model's outputs.
                let classes = wide
                    .iter()
                    .enumerate()
                    .map(|(k, &y)| {
                        u32::try_from(y).ok().filter(|&c| c <= largest).ok_or_else(|| {
                            invalid(self.labels.path(), format!("label {y} at row {} changed since the file was checked", s0 + k))
                        })
                    })
                    .collect::<Result<Vec<u32>>>()?;
                Ok(TargetRows::Classes(Cow::Owned(classes)))
            }
            TargetsFound::Values { cols } => {
                let values = self.labels.read(s0 * cols, m * cols)?.into_f32();
                let t = Array2::from_shape_vec((m, cols), values).map_err(|e| invalid(self.labels.path(), format!("targets: {e}")))?;
                Ok(TargetRows::Values(CowArray::from(t)))
            }
        }
    }

    fn validate(&self, mlp: &Mlp, likelihood: Likelihood) -> Result<()> {
        // Counts, emptiness and finiteness were checked at open; the rest needs the model.
        check_width(self.d, mlp)?;
        let outputs = mlp.output_dim();
        match (self.targets, likelihood) {
            (TargetsFound::Classes { largest }, Likelihood::Categorical) => {
                if largest as usize >= outputs {
                    let bound = u32::try_from(outputs).unwrap_or(u32::MAX);
                    let (row, label) = first_label_from(&self.labels, bound)?.unwrap_or((0, largest));
                    return Err(label_out_of_range(label, row, outputs));
                }
            }
            (TargetsFound::Values { cols }, Likelihood::Gaussian) => check_target_width(cols, outputs)?,
            (_, likelihood) => return Err(wrong_targets(likelihood)),
        }
        Ok(())
    }

    fn to_dataset(&self) -> Result<Cow<'_, Dataset>> {
        let x = self.inputs(0, self.n)?.into_owned();
        let targets = match self.targets(0, self.n)? {
            TargetRows::Classes(c) => Targets::Classes(c.into_owned()),
            TargetRows::Values(v) => Targets::Values(v.into_owned()),
        };
        Ok(Cow::Owned(Dataset { inputs: x, targets }))
    }
}

impl DataSource for Dataset {
    fn len(&self) -> usize {
        Dataset::len(self)
    }

    fn input_dim(&self) -> usize {
        self.inputs.ncols()
    }

    fn likelihood(&self) -> Likelihood {
        Dataset::likelihood(self)
    }

    fn inputs(&self, s0: usize, m: usize) -> Result<CowArray<'_, f32, Ix2>> {
        check_rows(s0, m, self.inputs.nrows())?;
        Ok(CowArray::from(self.inputs.slice(s![s0..s0 + m, ..])))
    }

    fn targets(&self, s0: usize, m: usize) -> Result<TargetRows<'_>> {
        match &self.targets {
            Targets::Classes(labels) => {
                check_rows(s0, m, labels.len())?;
                Ok(TargetRows::Classes(Cow::Borrowed(&labels[s0..s0 + m])))
            }
            Targets::Values(values) => {
                check_rows(s0, m, values.nrows())?;
                Ok(TargetRows::Values(CowArray::from(values.slice(s![s0..s0 + m, ..]))))
            }
        }
    }

    fn validate(&self, mlp: &Mlp, likelihood: Likelihood) -> Result<()> {
        Dataset::validate(self, mlp, likelihood)
    }

    fn to_dataset(&self) -> Result<Cow<'_, Dataset>> {
        Ok(Cow::Borrowed(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy_file::test_npy;

    fn f64_be(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    /// The checks of one file in chunks of every size from one element to the whole file:
    /// the values kept and the error reported do not depend on where the chunks end.
    #[track_caller]
    fn same_for_every_chunk_size<T: PartialEq + std::fmt::Debug>(path: &Path, check: impl Fn(&NpyFile) -> T) -> T {
        let whole = check(&NpyFile::open(path).unwrap());
        for bytes in 1..=64 {
            assert_eq!(check(&NpyFile::open(path).unwrap().with_chunk_bytes(bytes)), whole, "chunks of {bytes} bytes");
        }
        whole
    }

    fn floats(file: &NpyFile, cols: usize) -> std::result::Result<Vec<f32>, String> {
        let mut kept = Vec::new();
        check_floats(file, "inputs", cols, Some(&mut kept)).map(|()| kept).map_err(|e| e.to_string())
    }

    #[test]
    fn float_checks_do_not_depend_on_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        // 7 × 3 big-endian float64: chunks of 1..64 bytes end inside rows and between them.
        let mut values: Vec<f64> = (0..21).map(|k| k as f64 * 0.5 - 3.0).collect();
        let ok = test_npy(dir, "ok.npy", ">f8", "(7, 3)", &f64_be(&values));
        let kept = same_for_every_chunk_size(&ok, |f| floats(f, 3)).unwrap();
        assert_eq!(kept, values.iter().map(|&v| v as f32).collect::<Vec<_>>());

        // NaN at row 4, column 2.
        values[4 * 3 + 2] = f64::NAN;
        let nan = test_npy(dir, "nan.npy", ">f8", "(7, 3)", &f64_be(&values));
        let e = same_for_every_chunk_size(&nan, |f| floats(f, 3)).unwrap_err();
        assert!(e.contains("non-finite value NaN in inputs") && e.contains("nan.npy at row 4, column 2"), "{e}");

        // A value beyond float32 after the NaN (a later chunk) is reported first, as when the
        // whole array was checked at once.
        values[5 * 3 + 1] = -1e300;
        let big = test_npy(dir, "big.npy", ">f8", "(7, 3)", &f64_be(&values));
        let e = same_for_every_chunk_size(&big, |f| floats(f, 3)).unwrap_err();
        assert!(e.ends_with("inputs value -1e300 at row 5, column 1 is beyond the float32 range"), "{e}");

        // float32 (little-endian): the first ±Inf ends the scan wherever it is.
        let mut v32: Vec<f32> = (0..21).map(|k| k as f32).collect();
        v32[3 * 3 + 1] = f32::NEG_INFINITY;
        v32[6 * 3] = f32::NAN;
        let inf = test_npy(dir, "inf.npy", "<f4", "(7, 3)", &v32.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        let e = same_for_every_chunk_size(&inf, |f| floats(f, 3)).unwrap_err();
        assert!(e.contains("-inf") && e.ends_with("at row 3, column 1"), "{e}");
    }

    #[test]
    fn label_checks_do_not_depend_on_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let labels = |file: &NpyFile| {
            let mut kept = Vec::new();
            check_labels(file, Some(&mut kept)).map(|largest| (kept, largest)).map_err(|e| e.to_string())
        };
        // int8, one byte per label: chunks of 1..64 labels.
        let y: Vec<i8> = (0..23).map(|k| (k * 5 % 9) as i8).collect();
        let ok = test_npy(dir, "y8.npy", "|i1", "(23,)", &y.iter().map(|&v| v as u8).collect::<Vec<_>>());
        let (kept, largest) = same_for_every_chunk_size(&ok, labels).unwrap();
        assert_eq!(kept, y.iter().map(|&v| v as u32).collect::<Vec<_>>());
        assert_eq!(largest, 8);
        // The first label at or above a bound, wherever the chunks end.
        for bound in [1, 5, 8] {
            let want = y.iter().position(|&v| i64::from(v) >= bound).map(|row| (row, y[row] as u32));
            assert_eq!(same_for_every_chunk_size(&ok, |f| first_label_from(f, bound as u32).unwrap()), want);
        }
        assert_eq!(first_label_from(&NpyFile::open(&ok).unwrap(), 9).unwrap(), None);

        // Big-endian int32 of shape (N, 1) with a negative label at row 13.
        let mut y32: Vec<i32> = (0..17).collect();
        y32[13] = -2;
        let neg = test_npy(dir, "neg.npy", ">i4", "(17, 1)", &y32.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>());
        let e = same_for_every_chunk_size(&neg, labels).unwrap_err();
        assert!(e.ends_with("neg.npy: label -2 at row 13 is negative; class indices start at 0"), "{e}");

        // int64 beyond u32 at row 2.
        let wide = test_npy(dir, "wide.npy", "<i8", "(4,)", &[0i64, 1, 1 << 40, 3].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        let e = same_for_every_chunk_size(&wide, labels).unwrap_err();
        assert!(e.ends_with("label 1099511627776 at row 2 is too large for a class index"), "{e}");
    }
}
