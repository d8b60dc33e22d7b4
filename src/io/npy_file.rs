//! A `.npy` file kept open and read by ranges of elements, for data that is streamed a
//! micro-batch at a time rather than loaded whole (a network's inputs and labels, see
//! [`crate::model::NpyDataset`]).
//!
//! Opening checks the header ([`read_npy_header`]), the dtype and the file's length against
//! the shape (checked arithmetic), so that a read never goes past the data the header
//! claims and no buffer is ever sized by the header alone. Reads are positioned
//! (`pread`): nothing is memory-mapped, so the pages read are the kernel's page cache and
//! never count in the process's resident set, and a file truncated under a running
//! computation gives an error rather than a `SIGBUS`.
//!
//! Values are decoded per read, whatever the dtype and byte order: float32 and float64
//! ([`NpyValues::F32`], [`NpyValues::F64`]) and every integer type, widened to i64
//! ([`NpyValues::Int`]).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use npyz::{Endianness, TypeChar};

use super::io_error;
use super::npy::{numpy_dtype_name, numpy_shape, read_npy_header, NpyDtype};
use crate::error::{FisherError, Result};

/// Bytes of file data read per chunk by [`NpyFile::for_each_chunk`]: large enough that the
/// per-read overhead vanishes (10⁷ × 16 float32 inputs are 160 reads), small enough that
/// a whole-file check holds a few MiB whatever N is.
pub(crate) const CHUNK_BYTES: usize = 4 << 20;

/// The decoded values of one read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NpyValues {
    /// float32.
    F32(Vec<f32>),
    /// float64.
    F64(Vec<f64>),
    /// Any integer dtype, widened (class labels are often int64, int32 or uint8).
    Int(Vec<i64>),
}

impl NpyValues {
    /// The values as f32: float64 rounded, integers converted (exact below 2²⁴).
    pub(crate) fn into_f32(self) -> Vec<f32> {
        match self {
            NpyValues::F32(v) => v,
            NpyValues::F64(v) => v.into_iter().map(|x| x as f32).collect(),
            NpyValues::Int(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }
}

/// The element kinds read: numpy's type character, restricted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    Uint,
}

/// An open `.npy` file of float32/float64 or any integer dtype (either byte order), C order
/// where it has more than one dimension; read with [`NpyFile::read`].
#[derive(Debug)]
pub(crate) struct NpyFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    shape: Vec<usize>,
    /// Elements (∏ shape), all present in the file.
    len: usize,
    kind: Kind,
    /// Bytes per element: 1, 2, 4 or 8.
    size: usize,
    big_endian: bool,
    /// numpy's name of the dtype, for messages.
    dtype: String,
    /// Bytes per chunk of [`NpyFile::for_each_chunk`]: [`CHUNK_BYTES`], smaller in tests.
    chunk_bytes: usize,
}

impl NpyFile {
    /// Opens `path` and checks its header, dtype, order and length.
    ///
    /// Errors name the file: [`FisherError::Io`] when it cannot be read, is not `.npy`, is in
    /// Fortran order, has a shape too large for this machine or is truncated;
    /// [`FisherError::InvalidInput`] for a dtype other than float32/float64/integers.
    pub(crate) fn open(path: &Path) -> Result<NpyFile> {
        let file = File::open(path).map_err(|e| io_error(path, format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| io_error(path, format!("cannot read: {e}")))?.len();
        let header = read_npy_header(path, &mut BufReader::new(&file), file_len)?;
        let dtype = numpy_dtype_name(&header.dtype);
        let too_large = || io_error(path, format!("shape {} is too large for this machine", numpy_shape(&header.shape)));
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
        let unsupported = || {
            FisherError::InvalidInput(format!(
                "{}: dtype {dtype} is not supported (float32, float64 or an integer type)",
                path.display()
            ))
        };
        let NpyDtype::Plain(ts) = &header.dtype else { return Err(unsupported()) };
        let kind = match (ts.type_char(), ts.size_field()) {
            (TypeChar::Float, 4 | 8) => Kind::Float,
            (TypeChar::Int, 1 | 2 | 4 | 8) => Kind::Int,
            (TypeChar::Uint, 1 | 2 | 4 | 8) => Kind::Uint,
            _ => return Err(unsupported()),
        };
        let size = ts.size_field() as usize;
        let expected = header.data_bytes(size as u64).ok_or_else(too_large)?;
        let present = file_len.saturating_sub(header.data_start);
        if present < expected {
            let shape_text = numpy_shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
            return Err(io_error(
                path,
                format!("is truncated: shape {shape_text} of {dtype} needs {expected} bytes of data but the file holds {present}"),
            ));
        }
        // ∏ shape fits: ∏ shape × size ≤ the file's length, which fits in u64, and usize
        // holds every dimension (checked above) — but not necessarily their product.
        let len = usize::try_from(expected / size as u64).map_err(|_| too_large())?;
        Ok(NpyFile {
            path: path.to_path_buf(),
            file,
            data_start: header.data_start,
            shape,
            len,
            kind,
            size,
            big_endian: ts.endianness() == Endianness::Big,
            dtype,
            chunk_bytes: CHUNK_BYTES,
        })
    }

    /// The same file walked in chunks of `bytes` (rounded down to whole elements, at least
    /// one): tests put chunk boundaries inside rows and values on both sides of them.
    #[cfg(test)]
    pub(crate) fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The shape the header declares.
    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// numpy's name of the dtype (`float32`, `int64`, …).
    pub(crate) fn dtype(&self) -> &str {
        &self.dtype
    }

    /// Whether the values are floats (float32 or float64) rather than integers.
    pub(crate) fn is_float(&self) -> bool {
        self.kind == Kind::Float
    }

    /// Whether the values are float64.
    pub(crate) fn is_f64(&self) -> bool {
        self.kind == Kind::Float && self.size == 8
    }

    /// Reads and decodes the elements `first .. first + count` (flat C order).
    ///
    /// Errors ([`FisherError::Io`], naming the file) when the range is past the data or the
    /// read fails (e.g. the file was truncated since it was opened); a uint64 value beyond
    /// the int64 range is [`FisherError::InvalidInput`].
    pub(crate) fn read(&self, first: usize, count: usize) -> Result<NpyValues> {
        if first.checked_add(count).is_none_or(|end| end > self.len) {
            return Err(io_error(
                &self.path,
                format!("cannot read elements {first}..{} of {}", first.saturating_add(count), self.len),
            ));
        }
        // In range: (first + count) × size ≤ the data's length, which fits in u64.
        let offset = self.data_start + (first as u64) * self.size as u64;
        let read_failed = |e: std::io::Error| io_error(&self.path, format!("cannot read the data: {e}"));
        // numpy's default, float32 on a little-endian machine, is read straight into the
        // result: no staging copy, no conversion pass.
        if cfg!(target_endian = "little") && self.kind == Kind::Float && self.size == 4 && !self.big_endian {
            let mut out = vec![0f32; count];
            read_exact_at(&self.file, bytemuck::cast_slice_mut(&mut out), offset).map_err(read_failed)?;
            return Ok(NpyValues::F32(out));
        }
        let mut bytes = vec![0u8; count * self.size];
        read_exact_at(&self.file, &mut bytes, offset).map_err(read_failed)?;
        self.decode(&bytes)
    }

    /// The values of raw little- or big-endian bytes (whole elements).
    fn decode(&self, bytes: &[u8]) -> Result<NpyValues> {
        let big = self.big_endian;
        // One element's bytes as an array of its width, for `from_{le,be}_bytes`.
        macro_rules! each {
            ($t:ty, $n:literal) => {
                bytes.chunks_exact($n).map(move |c| {
                    let word: [u8; $n] = c.try_into().expect("chunks_exact yields whole elements");
                    if big { <$t>::from_be_bytes(word) } else { <$t>::from_le_bytes(word) }
                })
            };
        }
        Ok(match (self.kind, self.size) {
            (Kind::Float, 4) => NpyValues::F32(each!(f32, 4).collect()),
            (Kind::Float, _) => NpyValues::F64(each!(f64, 8).collect()),
            (Kind::Int, 1) => NpyValues::Int(each!(i8, 1).map(i64::from).collect()),
            (Kind::Int, 2) => NpyValues::Int(each!(i16, 2).map(i64::from).collect()),
            (Kind::Int, 4) => NpyValues::Int(each!(i32, 4).map(i64::from).collect()),
            (Kind::Int, _) => NpyValues::Int(each!(i64, 8).collect()),
            (Kind::Uint, 1) => NpyValues::Int(each!(u8, 1).map(i64::from).collect()),
            (Kind::Uint, 2) => NpyValues::Int(each!(u16, 2).map(i64::from).collect()),
            (Kind::Uint, 4) => NpyValues::Int(each!(u32, 4).map(i64::from).collect()),
            (Kind::Uint, _) => NpyValues::Int(
                each!(u64, 8)
                    .map(i64::try_from)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| {
                        FisherError::InvalidInput(format!("{}: uint64 value beyond the int64 range", self.path.display()))
                    })?,
            ),
        })
    }

    /// Calls `visit(first, values)` for the whole data in order, in chunks of at most
    /// [`CHUNK_BYTES`] (at least one element), `first` being the flat index of the chunk's
    /// first value; stops at the first error. Memory: one chunk, whatever the file's size.
    pub(crate) fn for_each_chunk(&self, mut visit: impl FnMut(usize, NpyValues) -> Result<()>) -> Result<()> {
        let per_chunk = (self.chunk_bytes / self.size).max(1);
        let mut first = 0;
        while first < self.len {
            let count = per_chunk.min(self.len - first);
            visit(first, self.read(first, count)?)?;
            first += count;
        }
        Ok(())
    }
}

/// Fills `buf` from `file` at `offset`, without moving a shared file position, so that
/// reads are independent of each other (positioned reads: `pread` on Unix, `ReadFile` with
/// an offset on Windows).
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    // Windows' `seek_read` may return fewer bytes than asked, like `read`.
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    // No positioned reads: seek the shared position. Reads of one file are made one at a
    // time (a micro-batch after another), so they do not interleave.
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// A `.npy` file (format 1.0) `dir/name` of `descr` and `shape` (numpy's spelling) holding
/// the raw `data`, for the tests of the readers.
#[cfg(test)]
pub(crate) fn test_npy(dir: &Path, name: &str, descr: &str, shape: &str, data: &[u8]) -> PathBuf {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::test_npy as npy;
    use super::*;

    /// Every read range, including ones that cross the chunk size, gives the same values
    /// as the whole read.
    #[test]
    fn reads_any_range_of_every_dtype_and_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let values: Vec<i64> = (0..37).map(|k| k * 3 - 50).collect();
        let cases: Vec<(&str, Vec<u8>, NpyValues)> = vec![
            ("<f4", values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(), NpyValues::F32(values.iter().map(|&v| v as f32).collect())),
            (">f4", values.iter().flat_map(|&v| (v as f32).to_be_bytes()).collect(), NpyValues::F32(values.iter().map(|&v| v as f32).collect())),
            ("<f8", values.iter().flat_map(|&v| (v as f64 + 0.5).to_le_bytes()).collect(), NpyValues::F64(values.iter().map(|&v| v as f64 + 0.5).collect())),
            (">f8", values.iter().flat_map(|&v| (v as f64).to_be_bytes()).collect(), NpyValues::F64(values.iter().map(|&v| v as f64).collect())),
            ("|i1", values.iter().flat_map(|&v| (v as i8).to_le_bytes()).collect(), NpyValues::Int(values.clone())),
            ("<i2", values.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect(), NpyValues::Int(values.clone())),
            (">i4", values.iter().flat_map(|&v| (v as i32).to_be_bytes()).collect(), NpyValues::Int(values.clone())),
            (">i8", values.iter().flat_map(|&v| v.to_be_bytes()).collect(), NpyValues::Int(values.clone())),
            ("|u1", values.iter().flat_map(|&v| ((v + 50) as u8).to_le_bytes()).collect(), NpyValues::Int(values.iter().map(|&v| v + 50).collect())),
            (">u2", values.iter().flat_map(|&v| ((v + 50) as u16).to_be_bytes()).collect(), NpyValues::Int(values.iter().map(|&v| v + 50).collect())),
            ("<u8", values.iter().flat_map(|&v| ((v + 50) as u64).to_le_bytes()).collect(), NpyValues::Int(values.iter().map(|&v| v + 50).collect())),
        ];
        for (descr, bytes, want) in cases {
            let path = npy(dir, "a.npy", descr, "(37,)", &bytes);
            let file = NpyFile::open(&path).unwrap();
            assert_eq!(file.read(0, 37).unwrap(), want, "{descr}");
            let slice = |v: &NpyValues, a: usize, b: usize| match v {
                NpyValues::F32(x) => NpyValues::F32(x[a..b].to_vec()),
                NpyValues::F64(x) => NpyValues::F64(x[a..b].to_vec()),
                NpyValues::Int(x) => NpyValues::Int(x[a..b].to_vec()),
            };
            for (a, b) in [(0, 1), (5, 18), (36, 37), (13, 13), (1, 36)] {
                assert_eq!(file.read(a, b - a).unwrap(), slice(&want, a, b), "{descr} {a}..{b}");
            }
            assert!(file.read(30, 8).is_err(), "past the end");
            assert!(file.read(usize::MAX, 2).is_err(), "overflowing range");
        }
    }

    #[test]
    fn chunks_cover_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // One past a chunk of int8, so the last chunk holds one value.
        let n = CHUNK_BYTES + 1;
        let data: Vec<u8> = (0..n).map(|k| (k % 251) as u8).collect();
        let path = npy(dir.path(), "y.npy", "|i1", &format!("({n},)"), &data);
        let chunks = |file: &NpyFile| {
            let mut seen = Vec::new();
            file.for_each_chunk(|first, values| {
                let NpyValues::Int(v) = values else { panic!("integers") };
                assert_eq!(first, seen.iter().sum::<usize>());
                assert!(v.iter().enumerate().all(|(k, &x)| x == i64::from(data[first + k] as i8)));
                seen.push(v.len());
                Ok(())
            })
            .unwrap();
            seen
        };
        assert_eq!(chunks(&NpyFile::open(&path).unwrap()), [CHUNK_BYTES, 1]);
        // float64 in chunks of 20 bytes: 2 values each (whole elements), the last one alone.
        let path = npy(dir.path(), "x.npy", ">f8", "(5,)", &[1.0f64, 2.0, 3.0, 4.0, 5.0].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>());
        let mut seen = Vec::new();
        NpyFile::open(&path).unwrap().with_chunk_bytes(20).for_each_chunk(|first, values| {
            seen.push((first, values));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0, NpyValues::F64(vec![1.0, 2.0])), (2, NpyValues::F64(vec![3.0, 4.0])), (4, NpyValues::F64(vec![5.0]))]);
        // A chunk smaller than one element still makes progress.
        let mut count = 0;
        NpyFile::open(&path).unwrap().with_chunk_bytes(1).for_each_chunk(|_, _| {
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 5);
    }

    #[test]
    fn refuses_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let short = npy(dir, "short.npy", "<f4", "(4, 2)", &[0u8; 31]);
        let e = NpyFile::open(&short).unwrap_err().to_string();
        assert!(e.contains("short.npy") && e.contains("is truncated") && e.contains("needs 32 bytes"), "{e}");
        let huge = npy(dir, "huge.npy", "<f8", "(18446744073709551615, 3)", &[]);
        let e = NpyFile::open(&huge).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        let half = npy(dir, "half.npy", "<f2", "(1,)", &[0u8; 2]);
        let e = NpyFile::open(&half).unwrap_err().to_string();
        assert!(e.contains("float16 is not supported"), "{e}");
        let big = npy(dir, "big.npy", "<u8", "(1,)", &u64::MAX.to_le_bytes());
        let e = NpyFile::open(&big).unwrap().read(0, 1).unwrap_err().to_string();
        assert!(e.contains("uint64 value beyond the int64 range"), "{e}");
    }
}
