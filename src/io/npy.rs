//! numpy `.npy` files: C-order float32/float64 matrices in (whole, or streamed in chunks
//! of rows), float32 matrices and int64 labels out.
//!
//! The header is parsed with `npyz`; the data is read as raw bytes, because `npyz`'s
//! element-at-a-time iterator is an order of magnitude slower than a bulk read plus a
//! byte-order conversion. Every error names the file it is about.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use npyz::{DType, Endianness, NpyHeader, Order, TypeChar};

use crate::error::{FisherError, Result};

use super::io_error;

/// Bytes of raw file data converted per read by [`read_npy_matrix`]: large enough that the
/// per-call overhead vanishes, small enough that the staging buffer is negligible next to
/// the matrix itself.
const READ_STAGING_BYTES: usize = 16 << 20;


/// The element types we read, with their byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    F32 { big_endian: bool },
    F64 { big_endian: bool },
}

impl Element {
    fn size(self) -> usize {
        match self {
            Element::F32 { .. } => 4,
            Element::F64 { .. } => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Element::F32 { big_endian: false } => "float32",
            Element::F32 { big_endian: true } => "float32 (big-endian)",
            Element::F64 { big_endian: false } => "float64",
            Element::F64 { big_endian: true } => "float64 (big-endian)",
        }
    }
}

/// numpy's name for a dtype (`int64`, `float16`, `bool`, ...), for error messages.
pub(crate) fn numpy_dtype_name(dtype: &DType) -> String {
    match dtype {
        DType::Plain(ts) => {
            let bits = ts.size_field() * 8;
            match ts.type_char() {
                TypeChar::Bool => "bool".into(),
                TypeChar::Int => format!("int{bits}"),
                TypeChar::Uint => format!("uint{bits}"),
                TypeChar::Float => format!("float{bits}"),
                TypeChar::Complex => format!("complex{bits}"),
                TypeChar::TimeDelta => "timedelta64".into(),
                TypeChar::DateTime => "datetime64".into(),
                TypeChar::ByteStr => "bytes".into(),
                TypeChar::UnicodeStr => "str".into(),
                TypeChar::Object => "object".into(),
                _ => format!("'{ts}'"),
            }
        }
        DType::Array(..) => format!("sub-array dtype {}", dtype.descr()),
        DType::Record(_) => format!("structured dtype {}", dtype.descr()),
    }
}

/// numpy's spelling of a shape: `(5,)`, `(2, 3, 4)`.
fn numpy_shape(shape: &[u64]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// A C-order N×P float `.npy` file, read in chunks of rows.
///
/// Opening it reads and checks the header only (dtype, rank, order, emptiness, file length),
/// so that every malformed input is refused before any computation starts. As an iterator
/// it yields `chunk_rows`-row `f32` matrices (the last one may be shorter); after an error
/// it yields nothing more.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("g.npy");
/// let g = fisher_engine::synthetic::normal_matrix(10, 3, 1);
/// fisher_engine::io::write_npy_matrix(&path, g.view())?;
/// let rows = fisher_engine::io::NpyRows::open(&path, 4)?;
/// assert_eq!((rows.rows(), rows.cols()), (10, 3));
/// let sizes: Vec<usize> = rows.map(|chunk| chunk.map(|c| c.nrows())).collect::<Result<_, _>>()?;
/// assert_eq!(sizes, [4, 4, 2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct NpyRows {
    path: PathBuf,
    reader: BufReader<File>,
    element: Element,
    rows: usize,
    cols: usize,
    chunk_rows: usize,
    next_row: usize,
    /// Raw bytes of the chunk being converted, reused across chunks.
    staging: Vec<u8>,
}

impl NpyRows {
    /// Opens `path` and checks its header; chunks will have `chunk_rows` rows (at least 1).
    pub fn open(path: &Path, chunk_rows: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| io_error(path, format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| io_error(path, format!("cannot read: {e}")))?
            .len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let header = NpyHeader::from_reader(&mut reader).map_err(|e| {
            io_error(path, format!("not a numpy .npy file ({e}); save it with np.save"))
        })?;

        let element = match header.dtype() {
            DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 4 => {
                Element::F32 { big_endian: ts.endianness() == Endianness::Big }
            }
            DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 8 => {
                Element::F64 { big_endian: ts.endianness() == Endianness::Big }
            }
            other => {
                return Err(io_error(
                    path,
                    format!(
                        "has dtype {}; float32 or float64 is required (convert with .astype(np.float32))",
                        numpy_dtype_name(&other)
                    ),
                ))
            }
        };

        let shape = header.shape();
        let &[rows, cols] = shape else {
            return Err(io_error(
                path,
                format!(
                    "has shape {} but must be 2-D (samples × parameters)",
                    numpy_shape(shape)
                ),
            ));
        };
        if header.order() == Order::Fortran {
            return Err(io_error(
                path,
                "is Fortran-ordered; save it with np.save(path, np.ascontiguousarray(g))",
            ));
        }
        let too_large = || io_error(path, format!("shape {} is too large", numpy_shape(shape)));
        let rows = usize::try_from(rows).map_err(|_| too_large())?;
        let cols = usize::try_from(cols).map_err(|_| too_large())?;
        if rows == 0 || cols == 0 {
            return Err(FisherError::Empty { what: path.display().to_string(), rows, cols });
        }

        // Check the length up front, so that a truncated file fails before computing, not
        // after most of it has been read.
        let data_start = reader
            .stream_position()
            .map_err(|e| io_error(path, format!("cannot read: {e}")))?;
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(element.size()))
            .ok_or_else(too_large)? as u64;
        let present = file_len.saturating_sub(data_start);
        if present < expected {
            return Err(io_error(
                path,
                format!(
                    "is truncated: shape ({rows}, {cols}) of {} needs {expected} bytes of data but the file holds {present}",
                    element.name()
                ),
            ));
        }

        Ok(NpyRows {
            path: path.to_path_buf(),
            reader,
            element,
            rows,
            cols,
            chunk_rows: chunk_rows.max(1),
            next_row: 0,
            staging: Vec::new(),
        })
    }

    /// Number of rows (samples, N).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (parameters, P).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The file's element type as numpy names it (`float32`, `float64`, with the byte
    /// order when it is big-endian).
    pub fn dtype(&self) -> &'static str {
        self.element.name()
    }

    /// Changes the number of rows of the following chunks (at least 1), e.g. once
    /// [`NpyRows::cols`] is known and a chunk can be sized in bytes.
    pub fn set_chunk_rows(&mut self, chunk_rows: usize) {
        self.chunk_rows = chunk_rows.max(1);
    }

    /// Index of the first row of the next chunk (= rows read so far).
    pub fn next_row(&self) -> usize {
        self.next_row
    }

    /// Reads the next `out.len() / cols` rows into `out` as `f32`.
    fn read_rows_into(&mut self, out: &mut [f32]) -> Result<()> {
        let first_row = self.next_row;
        let count = out.len();
        let read_failed = |rows: &mut Self, e: std::io::Error| {
            // Stop iterating: the stream position is unknown now.
            rows.next_row = rows.rows;
            io_error(&rows.path, format!("cannot read rows from {first_row}: {e}"))
        };
        // The common case, numpy's default float32 on a little-endian machine, is read
        // straight into the destination: no staging copy, no conversion pass.
        if cfg!(target_endian = "little") && self.element == (Element::F32 { big_endian: false }) {
            if let Err(e) = self.reader.read_exact(bytemuck::cast_slice_mut(out)) {
                return Err(read_failed(self, e));
            }
            self.next_row += count / self.cols;
            return Ok(());
        }
        let size = self.element.size();
        self.staging.resize(count * size, 0);
        if let Err(e) = self.reader.read_exact(&mut self.staging) {
            return Err(read_failed(self, e));
        }
        let bytes = &self.staging;
        match self.element {
            Element::F32 { big_endian } => {
                let convert = if big_endian { f32::from_be_bytes } else { f32::from_le_bytes };
                for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *dst = convert(src.try_into().expect("chunks_exact(4) yields 4 bytes"));
                }
            }
            Element::F64 { big_endian } => {
                let convert = if big_endian { f64::from_be_bytes } else { f64::from_le_bytes };
                for (i, (dst, src)) in out.iter_mut().zip(bytes.chunks_exact(8)).enumerate() {
                    let wide = convert(src.try_into().expect("chunks_exact(8) yields 8 bytes"));
                    let narrow = wide as f32;
                    // A finite float64 beyond ±3.4e38 would silently become ±inf and then be
                    // reported as an infinite gradient, which the file does not contain.
                    if wide.is_finite() && !narrow.is_finite() {
                        self.next_row = self.rows;
                        return Err(io_error(
                            &self.path,
                            format!(
                                "value {wide:e} at row {}, column {} does not fit in float32",
                                first_row + i / self.cols,
                                i % self.cols
                            ),
                        ));
                    }
                    *dst = narrow;
                }
            }
        }
        self.next_row += count / self.cols;
        Ok(())
    }
}

impl Iterator for NpyRows {
    type Item = Result<Array2<f32>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_row >= self.rows {
            return None;
        }
        let rows = self.chunk_rows.min(self.rows - self.next_row);
        let mut values = vec![0.0f32; rows * self.cols];
        Some(self.read_rows_into(&mut values).map(|()| {
            Array2::from_shape_vec((rows, self.cols), values).expect("rows × cols values")
        }))
    }
}

/// Reads a whole 2-D float32/float64 C-order `.npy` file as an `f32` matrix.
///
/// Errors ([`FisherError::Io`] or [`FisherError::Empty`], naming the file) on a missing or
/// unreadable file, a file that is not `.npy`, another dtype, another rank, Fortran order,
/// zero rows or columns, truncated data, and float64 values beyond the float32 range.
/// Finiteness is not checked here (see [`crate::validate::check_matrix`]).
pub fn read_npy_matrix(path: &Path) -> Result<Array2<f32>> {
    let mut rows = NpyRows::open(path, 1)?;
    let (n, p) = (rows.rows(), rows.cols());
    let mut values = vec![0.0f32; n * p];
    let rows_per_read = (READ_STAGING_BYTES / (p * rows.element.size())).max(1);
    for block in values.chunks_mut(rows_per_read * p) {
        rows.read_rows_into(block)?;
    }
    Ok(Array2::from_shape_vec((n, p), values).expect("n × p values"))
}

/// Writes the `.npy` header (format version 1.0) for a C-order array.
fn write_npy_header(out: &mut dyn Write, descr: &str, shape: &[usize]) -> std::io::Result<()> {
    let shape_text = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // The format pads the header with spaces and a final newline so that the data starts on
    // a 64-byte boundary (magic 6 + version 2 + length 2 = 10 bytes precede the dict).
    let total = (10 + dict.len() + 1).next_multiple_of(64);
    dict.push_str(&" ".repeat(total - 10 - dict.len() - 1));
    dict.push('\n');
    let header_len = u16::try_from(dict.len())
        .map_err(|_| std::io::Error::other("npy header longer than 65535 bytes"))?;
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&header_len.to_le_bytes())?;
    out.write_all(dict.as_bytes())
}

fn write_npy<T: Copy>(
    path: &Path,
    descr: &str,
    m: ArrayView2<'_, T>,
    to_le: impl Fn(T) -> Vec<u8>,
) -> Result<()> {
    // `iter()` walks logical row-major order whatever the view's strides are.
    write_npy_values(path, descr, &[m.nrows(), m.ncols()], m.iter().copied(), to_le)
}

/// Writes `values` (C order) under a header for `shape`.
fn write_npy_values<T>(
    path: &Path,
    descr: &str,
    shape: &[usize],
    values: impl Iterator<Item = T>,
    to_le: impl Fn(T) -> Vec<u8>,
) -> Result<()> {
    // Atomic like every output: a full disk or a signal leaves no truncated file.
    let target = super::output::Target::check(path, "the output", true, &[])?;
    target.write(".npy", |out| {
        write_npy_header(out, descr, shape)?;
        for v in values {
            out.write_all(&to_le(v))?;
        }
        Ok(())
    })
}

/// Writes class labels as a little-endian int64 `.npy` vector of shape (N,), what
/// `np.save(path, y)` writes for a default integer array (and what PyTorch's
/// `torch.from_numpy(...).long()` expects).
pub fn write_npy_labels(path: &Path, labels: &[u32]) -> Result<()> {
    write_npy_values(path, "<i8", &[labels.len()], labels.iter().map(|&c| i64::from(c)), |v| {
        v.to_le_bytes().to_vec()
    })
}

/// Writes `m` as a little-endian float32 C-order `.npy` file (what `np.save` writes for a
/// contiguous float32 array).
pub fn write_npy_matrix(path: &Path, m: ArrayView2<'_, f32>) -> Result<()> {
    write_npy(path, "<f4", m, |v| v.to_le_bytes().to_vec())
}

/// Writes `m` as a little-endian float64 C-order `.npy` file.
pub fn write_npy_matrix_f64(path: &Path, m: ArrayView2<'_, f64>) -> Result<()> {
    write_npy(path, "<f8", m, |v| v.to_le_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn npy_round_trip_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.npy");
        let g = crate::synthetic::normal_matrix(7, 3, 5);
        write_npy_matrix(&path, g.view()).unwrap();
        assert_eq!(read_npy_matrix(&path).unwrap(), g);
        let chunks: Vec<_> = NpyRows::open(&path, 3).unwrap().map(Result::unwrap).collect();
        assert_eq!(chunks.iter().map(|c| c.nrows()).collect::<Vec<_>>(), [3, 3, 1]);
        let joined = ndarray::concatenate(
            ndarray::Axis(0),
            &chunks.iter().map(|c| c.view()).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(joined, g);
    }

    #[test]
    fn f64_is_narrowed_and_overflow_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.npy");
        let mut g = Array2::<f64>::from_elem((2, 3), 0.25);
        write_npy_matrix_f64(&path, g.view()).unwrap();
        assert_eq!(read_npy_matrix(&path).unwrap(), Array2::from_elem((2, 3), 0.25f32));
        g[[1, 2]] = 1e300;
        write_npy_matrix_f64(&path, g.view()).unwrap();
        let err = read_npy_matrix(&path).unwrap_err().to_string();
        assert!(err.contains("row 1, column 2") && err.contains("float32"), "{err}");
    }

    #[test]
    fn labels_are_written_as_int64_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
        write_npy_matrix(&x, crate::synthetic::normal_matrix(3, 2, 1).view()).unwrap();
        write_npy_labels(&y, &[2, 0, u32::MAX]).unwrap();
        let bytes = std::fs::read(&y).unwrap();
        let header = String::from_utf8_lossy(&bytes[10..bytes.len() - 3 * 8]);
        assert!(header.contains("'descr': '<i8'") && header.contains("'shape': (3,)"), "{header}");
        let data = crate::model::Dataset::from_npy(&x, &y, crate::model::Likelihood::Categorical).unwrap();
        assert_eq!(data.targets, crate::model::Targets::Classes(vec![2, 0, u32::MAX]));
    }
}
