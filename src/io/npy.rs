//! numpy `.npy` files: C-order float32/float64 matrices in (whole, or streamed in chunks
//! of rows), float32 matrices and int64 labels out.
//!
//! The header is parsed here (`read_npy_header`, with `npyz` for the type string only), so
//! that every length it claims is checked against the file before anything is allocated;
//! the data is read as raw bytes, because `npyz`'s element-at-a-time iterator is an order of
//! magnitude slower than a bulk read plus a byte-order conversion. Every error is one line
//! naming the file it is about.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use npyz::{Endianness, TypeChar, TypeStr};

use crate::error::{FisherError, Result};
use crate::validate::quote;

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
pub(crate) fn numpy_dtype_name(dtype: &NpyDtype) -> String {
    let ts = match dtype {
        NpyDtype::Plain(ts) => ts,
        NpyDtype::Structured(descr) => return format!("structured dtype {}", quote(descr)),
    };
    // A size field beyond any real dtype (`<f99999999999`) is shown as written.
    let Some(bits) = ts.size_field().checked_mul(8) else { return format!("'{}'", quote(&ts.to_string())) };
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
        _ => format!("'{}'", quote(&ts.to_string())),
    }
}

/// numpy's spelling of a shape: `(5,)`, `(2, 3, 4)`.
pub(crate) fn numpy_shape(shape: &[u64]) -> String {
    let text = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
    };
    // A header may list thousands of dimensions; the message shows the start.
    quote(&text)
}

/// The longest `.npy` header read. numpy's own `np.load` refuses more than 10,000 bytes
/// unless told otherwise (`max_header_size`); a float matrix's header is ~120 bytes. The
/// header is read into memory whole, so this bounds that allocation whatever the file's
/// length field claims (up to 4 GiB in format versions 2 and 3).
pub const MAX_NPY_HEADER_BYTES: usize = 1 << 20;

/// The deepest nesting of tuples, lists and dicts accepted in a `.npy` header. A float
/// matrix's header nests 2 deep (the dict, the shape tuple); a structured dtype a few more.
/// The header parser is recursive, so this bounds its stack use.
pub const MAX_NPY_HEADER_DEPTH: usize = 16;

/// The dtype of a `.npy` header's `descr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NpyDtype {
    /// A scalar type string such as `<f4`, `>i8`, `|b1`.
    Plain(TypeStr),
    /// A structured (record) dtype, kept as its text for messages.
    Structured(String),
}

/// A checked `.npy` header: dtype, shape, order and where the data starts.
#[derive(Debug, Clone)]
pub(crate) struct NpyHeaderInfo {
    pub dtype: NpyDtype,
    pub shape: Vec<u64>,
    pub fortran_order: bool,
    /// Byte offset of the data (the header's length included).
    pub data_start: u64,
}

impl NpyHeaderInfo {
    /// Bytes of data the header claims (∏ shape × item size), `None` when that overflows
    /// u64 or the item size is variable (objects).
    pub fn data_bytes(&self, item_size: u64) -> Option<u64> {
        self.shape.iter().try_fold(item_size, |acc, &d| acc.checked_mul(d))
    }
}

/// Reads and checks the header of the `.npy` file `path` (of `file_len` bytes) from
/// `reader`, which is left at the start of the data.
///
/// The format: the magic `\x93NUMPY`, a version (1.0, 2.0 or 3.0), the header's length
/// (u16 little-endian for 1.0, u32 for 2.0 and 3.0), then the header, a Python dict literal
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }` padded with spaces and a
/// newline. The header is parsed here rather than by `npyz`, whose parser allocates the
/// claimed length before reading, recurses without a depth limit and multiplies the shape
/// without overflow checks: every length is checked against the file before anything is
/// allocated, and every error is one line that quotes at most [`crate::validate::QUOTE_CHARS`]
/// characters of the input.
pub(crate) fn read_npy_header(path: &Path, reader: &mut impl Read, file_len: u64) -> Result<NpyHeaderInfo> {
    let not_npy = |why: String| io_error(path, format!("not a numpy .npy file ({why}); save it with np.save"));
    let mut prefix = [0u8; 8];
    reader.read_exact(&mut prefix).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => not_npy("magic not found for NPY file".into()),
        _ => io_error(path, format!("cannot read: {e}")),
    })?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err(not_npy("magic not found for NPY file".into()));
    }
    let (length_bytes, utf8) = match (prefix[6], prefix[7]) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        (major, minor) => return Err(not_npy(format!("unsupported version: ({major}, {minor})"))),
    };
    let mut length = [0u8; 4];
    reader
        .read_exact(&mut length[..length_bytes])
        .map_err(|_| not_npy("the file ends inside the header length".into()))?;
    let header_len = u32::from_le_bytes(length) as u64;
    let data_start = 8 + length_bytes as u64 + header_len;
    if data_start > file_len {
        return Err(not_npy(format!(
            "the header claims {header_len} bytes but the file holds {} after the header length",
            file_len.saturating_sub(8 + length_bytes as u64)
        )));
    }
    if header_len > MAX_NPY_HEADER_BYTES as u64 {
        return Err(not_npy(format!(
            "the header is {header_len} bytes, more than the {MAX_NPY_HEADER_BYTES} read"
        )));
    }
    let mut text = vec![0u8; header_len as usize];
    reader.read_exact(&mut text).map_err(|e| io_error(path, format!("cannot read the header: {e}")))?;
    // Versions 1 and 2 are latin-1 (ASCII in practice); version 3 is UTF-8.
    let text: String = if utf8 {
        String::from_utf8(text).map_err(|_| not_npy("the header is not UTF-8".into()))?
    } else {
        text.iter().map(|&b| b as char).collect()
    };
    let header = parse_npy_header(&text).map_err(not_npy)?;
    Ok(NpyHeaderInfo { data_start, ..header })
}

/// Parses the header dict (data_start left 0).
fn parse_npy_header(text: &str) -> std::result::Result<NpyHeaderInfo, String> {
    let mut parser = PyLiteral { text: text.as_bytes(), at: 0 };
    let value = parser.value(0)?;
    parser.skip_space();
    if parser.at != parser.text.len() {
        return Err(format!("unexpected text after the header dict at byte {}", parser.at));
    }
    let PyValue::Dict(entries) = value else { return Err("the header is not a Python dict".into()) };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, value) in entries {
        match key.as_str() {
            "descr" => descr = Some(value),
            "fortran_order" => fortran = Some(value),
            "shape" => shape = Some(value),
            other => return Err(format!("unexpected key '{}' in the header", quote(other))),
        }
    }
    let missing = |key: &str| format!("the header has no '{key}'");
    let dtype = match descr.ok_or_else(|| missing("descr"))? {
        PyValue::Str(s) => NpyDtype::Plain(
            s.parse::<TypeStr>().map_err(|e| format!("invalid type string '{}': {e}", quote(&s)))?,
        ),
        PyValue::List(_) => NpyDtype::Structured(parser_text_of(text, "descr")),
        _ => return Err("'descr' is neither a type string nor a list".into()),
    };
    let fortran_order = match fortran.ok_or_else(|| missing("fortran_order"))? {
        PyValue::Bool(b) => b,
        _ => return Err("'fortran_order' is not True or False".into()),
    };
    let shape = match shape.ok_or_else(|| missing("shape"))? {
        PyValue::Tuple(dims) | PyValue::List(dims) => dims
            .into_iter()
            .enumerate()
            .map(|(axis, dim)| match dim {
                PyValue::Int(digits) if digits.starts_with('-') && digits.trim_start_matches(['-', '0']).is_empty() => Ok(0),
                PyValue::Int(digits) if digits.starts_with('-') => {
                    Err(format!("dimension {axis} of the shape is negative ({})", quote(&digits)))
                }
                PyValue::Int(digits) => digits
                    .parse::<u64>()
                    .map_err(|_| format!("dimension {axis} of the shape ({}) is larger than u64", quote(&digits))),
                _ => Err(format!("dimension {axis} of the shape is not an integer")),
            })
            .collect::<std::result::Result<Vec<u64>, String>>()?,
        _ => return Err("'shape' is not a tuple".into()),
    };
    Ok(NpyHeaderInfo { dtype, shape, fortran_order, data_start: 0 })
}

/// The text after `'descr':` up to the next key, for naming a structured dtype (bounded by
/// the caller's [`quote`]).
fn parser_text_of(text: &str, key: &str) -> String {
    let after = text.find(&format!("'{key}'")).map_or("", |i| &text[i + key.len() + 2..]);
    let after = after.trim_start().trim_start_matches(':').trim_start();
    after.chars().take(crate::validate::QUOTE_CHARS + 1).collect()
}

/// The Python literals a `.npy` header uses.
#[derive(Debug)]
enum PyValue {
    Str(String),
    /// The digits with an optional leading `-` (kept as text: any length is valid Python).
    Int(String),
    Bool(bool),
    None,
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Dict(Vec<(String, PyValue)>),
}

/// A recursive-descent parser for the subset of Python literals `np.save` writes (what
/// numpy reads back with `ast.literal_eval`): strings, integers, True/False/None, tuples,
/// lists and dicts with string keys, nested at most [`MAX_NPY_HEADER_DEPTH`] deep.
struct PyLiteral<'a> {
    text: &'a [u8],
    at: usize,
}

impl PyLiteral<'_> {
    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> std::result::Result<(), String> {
        match self.peek() {
            Some(b) if b == byte => {
                self.at += 1;
                Ok(())
            }
            Some(b) => Err(format!("expected '{}' at byte {} but found '{}'", byte as char, self.at, quote(&(b as char).to_string()))),
            None => Err(format!("expected '{}' but the header ends", byte as char)),
        }
    }

    fn value(&mut self, depth: usize) -> std::result::Result<PyValue, String> {
        if depth > MAX_NPY_HEADER_DEPTH {
            return Err(format!("the header nests more than {MAX_NPY_HEADER_DEPTH} levels deep"));
        }
        match self.peek() {
            None => Err("the header ends where a value is expected".into()),
            Some(b'\'' | b'"') => self.string().map(PyValue::Str),
            Some(b'u' | b'b') if matches!(self.text.get(self.at + 1), Some(b'\'' | b'"')) => {
                self.at += 1;
                self.string().map(PyValue::Str)
            }
            Some(b'(') => {
                self.at += 1;
                let (items, trailing_comma) = self.items(b')', depth)?;
                // `(5)` is 5 in Python, `(5,)` a tuple.
                match (items.len(), trailing_comma) {
                    (1, false) => Ok(items.into_iter().next().expect("one item")),
                    _ => Ok(PyValue::Tuple(items)),
                }
            }
            Some(b'[') => {
                self.at += 1;
                self.items(b']', depth).map(|(items, _)| PyValue::List(items))
            }
            Some(b'{') => {
                self.at += 1;
                let mut entries = Vec::new();
                loop {
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                        return Ok(PyValue::Dict(entries));
                    }
                    let PyValue::Str(key) = self.value(depth + 1)? else {
                        return Err(format!("a key of the header dict at byte {} is not a string", self.at));
                    };
                    self.expect(b':')?;
                    let value = self.value(depth + 1)?;
                    entries.push((key, value));
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {}
                        _ => return Err(format!("expected ',' or '}}' at byte {}", self.at)),
                    }
                }
            }
            Some(b'-' | b'+' | b'0'..=b'9') => {
                let start = self.at;
                let negative = self.text[self.at] == b'-';
                if matches!(self.text[self.at], b'-' | b'+') {
                    self.at += 1;
                    self.skip_space();
                }
                let digits_start = self.at;
                while self.text.get(self.at).is_some_and(|b| b.is_ascii_digit() || *b == b'_') {
                    self.at += 1;
                }
                if self.at == digits_start {
                    return Err(format!("a sign without digits at byte {start}"));
                }
                let digits: String =
                    self.text[digits_start..self.at].iter().filter(|&&b| b != b'_').map(|&b| b as char).collect();
                // Python 2's long suffix, as old numpy wrote shapes: (3L, 4L).
                if matches!(self.text.get(self.at), Some(b'L' | b'l')) {
                    self.at += 1;
                }
                Ok(PyValue::Int(if negative { format!("-{digits}") } else { digits }))
            }
            Some(_) => {
                let start = self.at;
                while self.text.get(self.at).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
                    self.at += 1;
                }
                match &self.text[start..self.at] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    b"None" => Ok(PyValue::None),
                    _ => {
                        let end = (start + 1).max(self.at);
                        let found = String::from_utf8_lossy(&self.text[start..end.min(self.text.len())]);
                        Err(format!("unexpected '{}' at byte {start} of the header", quote(&found)))
                    }
                }
            }
        }
    }

    /// Comma-separated values up to `close`; whether a comma followed the last one.
    fn items(&mut self, close: u8, depth: usize) -> std::result::Result<(Vec<PyValue>, bool), String> {
        let mut items = Vec::new();
        let mut trailing_comma = false;
        loop {
            if self.peek() == Some(close) {
                self.at += 1;
                return Ok((items, trailing_comma));
            }
            items.push(self.value(depth + 1)?);
            trailing_comma = false;
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    trailing_comma = true;
                }
                Some(b) if b == close => {}
                _ => return Err(format!("expected ',' or '{}' at byte {}", close as char, self.at)),
            }
        }
    }

    /// A quoted string (the opening quote at `at`); backslash escapes keep the escaped
    /// character (dtype strings and keys never need more).
    fn string(&mut self) -> std::result::Result<String, String> {
        let quote_byte = self.text[self.at];
        let start = self.at;
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.text.get(self.at) {
                None => return Err(format!("the string at byte {start} is not closed")),
                Some(&b) if b == quote_byte => {
                    self.at += 1;
                    break;
                }
                Some(b'\\') => {
                    let Some(&escaped) = self.text.get(self.at + 1) else {
                        return Err(format!("the string at byte {start} is not closed"));
                    };
                    out.push(escaped);
                    self.at += 2;
                }
                Some(&b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
        // The bytes are chars (latin-1) or UTF-8 text cut only at ASCII quotes: either way the
        // text is valid once decoded as the header was.
        Ok(String::from_utf8(out.clone()).unwrap_or_else(|_| out.iter().map(|&b| b as char).collect()))
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
        let header = read_npy_header(path, &mut reader, file_len)?;

        let element = match &header.dtype {
            NpyDtype::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 4 => {
                Element::F32 { big_endian: ts.endianness() == Endianness::Big }
            }
            NpyDtype::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 8 => {
                Element::F64 { big_endian: ts.endianness() == Endianness::Big }
            }
            other => {
                return Err(io_error(
                    path,
                    format!(
                        "has dtype {}; float32 or float64 is required (convert with .astype(np.float32))",
                        numpy_dtype_name(other)
                    ),
                ))
            }
        };

        let shape = &header.shape;
        let &[rows, cols] = &shape[..] else {
            return Err(io_error(
                path,
                format!(
                    "has shape {} but must be 2-D (samples × parameters)",
                    numpy_shape(shape)
                ),
            ));
        };
        if header.fortran_order {
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

        // Check the length up front (with checked arithmetic: the header's shape is not to be
        // trusted), so that a truncated file fails before computing, not after most of it has
        // been read, and before a buffer is sized by the shape.
        let data_start = header.data_start;
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(element.size()))
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(too_large)?;
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
    fn headers_numpy_writes_parse_and_others_are_named() {
        let header = parse_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }").unwrap();
        assert_eq!((header.shape, header.fortran_order), (vec![3, 4], false));
        assert!(matches!(header.dtype, NpyDtype::Plain(ts) if ts.to_string() == "<f4"));
        // Python 2 era numpy: long suffixes, u'' strings; any key order; double quotes.
        let header = parse_npy_header("{u'shape': (3L,), \"fortran_order\": True, 'descr': u'>i8'}").unwrap();
        assert_eq!((header.shape, header.fortran_order), (vec![3], true));
        assert_eq!(parse_npy_header("{'descr': '<f8', 'fortran_order': False, 'shape': ()}").unwrap().shape, [0u64; 0]);
        for (text, why) in [
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (5)}", "'shape' is not a tuple"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3)}", "dimension 0 of the shape is negative (-2)"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 18446744073709551616)}", "dimension 1 of the shape (18446744073709551616) is larger than u64"),
            ("{'descr': '<f4', 'fortran_order': False}", "the header has no 'shape'"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", "unexpected key 'x' in the header"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} junk", "unexpected text after the header dict at byte 56"),
            ("{'descr': '<f4'", "expected ',' or '}' at byte 15"),
        ] {
            assert_eq!(parse_npy_header(text).unwrap_err(), why, "{text}");
        }
        let deep = format!("{}{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(parse_npy_header(&deep).unwrap_err(), "the header nests more than 16 levels deep");
    }

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
