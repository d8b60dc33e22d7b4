//! Property-based fuzzing of every parser (proptest, stable Rust): `.npy` headers and data
//! (whole, streamed, and as labels), safetensors files (as tensors, as a model, as a Fisher
//! result), activation specs, form specs and the size arithmetic of the forms.
//!
//! Properties, for every generated input:
//! * no panic (proptest turns one into a failure with the shrunk input);
//! * no allocation larger than [`allocation_bound`] of the file (a header claiming 10¹²
//!   elements on a 100-byte file is refused before the values are allocated), measured by
//!   the counting allocator below;
//! * an error is one line of at most [`MAX_MESSAGE`] characters beyond the path, and names
//!   the file;
//! * what is accepted is consistent (a Fisher file that reads is symmetric with a
//!   non-negative diagonal; block sizes that validate sum to P exactly).
//!
//! The cases per parser are few enough for the suite (`CASES`); `examples/fuzz_parsers.rs`
//! runs the same kinds of inputs a million times per parser.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use fisher_engine::io::fisher_file::{self, Tensors};
use fisher_engine::io::{read_npy_matrix, read_safetensors, NpyRows};
use fisher_engine::model::{Activation, ActivationSpec, DataSource, Dataset, Likelihood, Mlp, NpyDataset};
use fisher_engine::{FisherError, Form};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::cli::{f32_bytes, write_raw_npy};

/// Cases per parser: ~0.5 s each in a debug build.
const CASES: u32 = 384;

/// The longest error message, beyond the path(s) it names.
const MAX_MESSAGE: usize = 640;

// ---- the largest allocation, per thread ------------------------------------------------

/// The system allocator, recording the largest single request of the current thread (a
/// `const` thread-local: no allocation, no lazy initialization inside the allocator).
struct LargestRequest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: forwards every call to `System` unchanged; only records the requested size.
unsafe impl GlobalAlloc for LargestRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestRequest = LargestRequest;

/// The largest single allocation a parser may make for a file of `file_len` bytes: its
/// buffers (a 1 MiB read buffer, 16 MiB of staging) plus 8 bytes per byte of the file
/// (int8 labels widen to i64), whatever the file claims.
fn allocation_bound(file_len: usize) -> usize {
    (20 << 20) + 8 * file_len
}

/// Runs `parse` on this thread and returns its result and its largest single allocation.
fn largest_allocation<T>(parse: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let result = parse();
    (result, LARGEST.with(Cell::get))
}

// ---- the properties --------------------------------------------------------------------

/// An error is one line, bounded, naming `file` (when given).
fn check_message(error: &FisherError, file: Option<&Path>) -> Result<(), TestCaseError> {
    let message = error.to_string();
    let path_len = file.map_or(0, |f| f.display().to_string().len());
    prop_assert!(!message.contains('\n') && !message.contains('\r'), "not one line: {message:?}");
    prop_assert!(
        message.chars().count() <= MAX_MESSAGE + 2 * path_len,
        "{} characters: {message:?}",
        message.chars().count()
    );
    if let Some(file) = file {
        let name = file.file_name().unwrap().to_string_lossy();
        prop_assert!(message.contains(&*name), "does not name {name}: {message:?}");
    }
    Ok(())
}

/// Runs a file parser on `bytes` written to `path`: no over-allocation, a checked error.
fn parse_file<T>(path: &Path, bytes: &[u8], parse: impl FnOnce(&Path) -> fisher_engine::Result<T>) -> Result<Option<T>, TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    let (result, largest) = largest_allocation(|| parse(path));
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "allocated {largest} bytes at once for a {}-byte file",
        bytes.len()
    );
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) => check_message(&error, Some(path)).map(|()| None),
    }
}

fn runner() -> TestRunner {
    // Deterministic: the same cases on every run and machine (a failure reproduces).
    TestRunner::new_with_rng(
        Config { cases: CASES, failure_persistence: None, ..Config::default() },
        proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    )
}

// ---- .npy ------------------------------------------------------------------------------

/// A `.npy` header's parts, each either plausible or hostile.
fn npy_file() -> impl Strategy<Value = Vec<u8>> {
    let descr = prop_oneof![
        Just("'<f4'".to_string()),
        Just("'<f8'".to_string()),
        Just("'>f4'".to_string()),
        Just("'>f8'".to_string()),
        Just("'<i8'".to_string()),
        Just("'>i2'".to_string()),
        Just("'|u1'".to_string()),
        Just("'<u8'".to_string()),
        Just("'|i1'".to_string()),
        Just("'<f2'".to_string()),
        Just("'|b1'".to_string()),
        Just("'|O'".to_string()),
        Just("'<U7'".to_string()),
        Just("'<M8[ns]'".to_string()),
        Just("'<f99999999999999999999'".to_string()),
        Just("'<f2305843009213693952'".to_string()),
        Just("[('a', '<f4'), ('b', '<i8', (2, 3))]".to_string()),
        Just("5".to_string()),
        "[ -~]{0,12}".prop_map(|s| format!("'{s}'")),
    ];
    let dim = prop_oneof![
        4 => 0u64..5,
        1 => Just(u32::MAX as u64),
        1 => Just(1u64 << 40),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
    .prop_map(|d| d.to_string());
    let odd_dim = prop_oneof![
        Just("-1".to_string()),
        Just("-0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999999999".to_string()),
        Just("(1, (2,))".to_string()),
        Just("3L".to_string()),
        Just("'3'".to_string()),
        Just("None".to_string()),
    ];
    let dims = prop::collection::vec(prop_oneof![8 => dim, 1 => odd_dim], 0..4);
    let shape = (dims, any::<bool>()).prop_map(|(dims, list)| {
        let inner = dims.join(", ");
        match (list, dims.len()) {
            (true, _) => format!("[{inner}]"),
            (false, 1) => format!("({inner},)"),
            (false, _) => format!("({inner})"),
        }
    });
    let fortran = prop_oneof![4 => Just("False"), 1 => Just("True"), 1 => Just("0"), 1 => Just("'no'")];
    let version = prop_oneof![8 => Just((1u8, 0u8)), 2 => Just((2, 0)), 2 => Just((3, 0)), 1 => any::<(u8, u8)>()];
    // Wrap the dict this deep in lists (a header that nests 10,000 levels is one of the
    // issue's inputs; a few hundred is enough to show the bound).
    let nesting = prop_oneof![8 => Just(0usize), 1 => 1usize..40, 1 => 100usize..600];
    let data_len = prop_oneof![4 => Just(None), 2 => (0usize..256).prop_map(Some)];
    let length_field = prop_oneof![8 => Just(None), 1 => Just(Some(u32::MAX)), 1 => any::<u32>().prop_map(Some)];
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3);
    (descr, shape, fortran, version, nesting, data_len, length_field, flips, any::<bool>()).prop_map(
        |(descr, shape, fortran, (major, minor), nesting, data_len, length_field, flips, extra_key)| {
            let mut dict = format!("{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, ");
            if extra_key {
                dict.push_str("'extra': 1, ");
            }
            dict.push('}');
            let dict = format!("{}{dict}{}", "[".repeat(nesting), "]".repeat(nesting));
            let mut text = dict.into_bytes();
            text.push(b'\n');
            let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', major, minor];
            let len = length_field.unwrap_or(text.len() as u32);
            if major == 1 {
                bytes.extend((len as u16).to_le_bytes());
            } else {
                bytes.extend(len.to_le_bytes());
            }
            bytes.extend(&text);
            // Data: what a small shape needs, or an arbitrary length.
            let n = data_len.unwrap_or(24);
            bytes.extend((0..n).map(|k| (k as u8).wrapping_mul(37)));
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            bytes
        },
    )
}

/// Bytes that start like a `.npy` file, or not at all.
fn raw_bytes(prefix: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(move |(with_prefix, tail)| {
        let mut bytes = if with_prefix { prefix.to_vec() } else { Vec::new() };
        bytes.extend(tail);
        bytes
    })
}

/// Every reader of `.npy` files on one input: the whole-matrix reader, the streaming reader
/// (every chunk), and the data loaders (whole, and on disk then read whole) with the file as
/// inputs and as labels/targets.
fn all_npy_readers(dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = dir.join("fuzz.npy");
    if let Some(m) = parse_file(&path, bytes, read_npy_matrix)? {
        prop_assert!(m.nrows() > 0 && m.ncols() > 0);
        prop_assert!(m.len() * 4 <= bytes.len(), "{} values from {} bytes", m.len(), bytes.len());
    }
    parse_file(&path, bytes, |p| {
        let rows = NpyRows::open(p, 3)?;
        rows.collect::<fisher_engine::Result<Vec<_>>>()
    })?;
    let good = dir.join("good.npy");
    for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
        // As labels (with inputs of the right N when N is small) and as inputs.
        for n in [1usize, 2, 3, 4] {
            write_raw_npy(&good, "<f4", false, &format!("({n}, 1)"), &f32_bytes(&vec![0.5; n]));
            parse_file(&path, bytes, |p| Dataset::from_npy(&good, p, likelihood))?;
            parse_file(&path, bytes, |p| NpyDataset::open(&good, p, likelihood)?.to_dataset().map(|d| d.into_owned()))?;
        }
        write_raw_npy(&good, "<i8", false, "(2,)", &[0u8; 16]);
        parse_file(&path, bytes, |p| Dataset::from_npy(p, &good, likelihood))?;
        parse_file(&path, bytes, |p| NpyDataset::open(p, &good, likelihood)?.to_dataset().map(|d| d.into_owned()))?;
    }
    Ok(())
}

#[test]
fn npy_headers_never_panic_over_allocate_or_spill() {
    let dir = tempfile::tempdir().unwrap();
    runner().run(&npy_file(), |bytes| all_npy_readers(dir.path(), &bytes)).unwrap();
}

#[test]
fn npy_raw_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    runner().run(&raw_bytes(b"\x93NUMPY\x01\x00"), |bytes| all_npy_readers(dir.path(), &bytes)).unwrap();
}

/// A minimal `.npy` file from a header dict.
fn npy_with_header(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    bytes
}

#[test]
fn a_deeply_nested_npy_header_gives_a_short_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.npy");
    let depth = 10_000;
    let dict = format!("{}{{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }}{}", "[".repeat(depth), "]".repeat(depth));
    std::fs::write(&path, npy_with_header(&dict, &[0; 16])).unwrap();
    let message = read_npy_matrix(&path).unwrap_err().to_string();
    assert_eq!(
        message,
        format!("{}: not a numpy .npy file (the header nests more than 16 levels deep); save it with np.save", path.display())
    );
}

#[test]
fn a_header_claiming_more_than_the_file_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.npy");
    // 10¹² float32 values claimed, 100 bytes present.
    let bytes = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }\n", &[0; 100]);
    for read in [
        &(|p: &Path| read_npy_matrix(p).map(drop)) as &dyn Fn(&Path) -> fisher_engine::Result<()>,
        &|p: &Path| NpyRows::open(p, 1).map(drop),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let (result, largest) = largest_allocation(|| read(&path));
        let message = result.unwrap_err().to_string();
        assert!(largest < 2 << 20, "allocated {largest} bytes");
        assert!(message.contains("is truncated: shape (1000000, 1000000) of float32 needs 4000000000000 bytes"), "{message}");
    }
    // The same claim in the labels, as int8 (10¹² values widen to 8 TB of i64).
    let labels = dir.path().join("y.npy");
    std::fs::write(&labels, npy_with_header("{'descr': '|i1', 'fortran_order': False, 'shape': (1000000000000,), }\n", &[0; 100])).unwrap();
    let x = dir.path().join("x.npy");
    write_raw_npy(&x, "<f4", false, "(1, 1)", &f32_bytes(&[0.0]));
    let (result, largest) = largest_allocation(|| Dataset::from_npy(&x, &labels, Likelihood::Categorical));
    let message = result.unwrap_err().to_string();
    assert!(largest < 2 << 20, "allocated {largest} bytes");
    assert!(message.contains("y.npy") && message.contains("needs 1000000000000 bytes of data but the file holds 100"), "{message}");
    let (result, largest) = largest_allocation(|| NpyDataset::open(&x, &labels, Likelihood::Categorical));
    assert!(largest < 2 << 20, "allocated {largest} bytes");
    assert_eq!(result.unwrap_err().to_string(), message, "on disk as in memory");
    // A header length field of 4 GiB on a small file.
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend(u32::MAX.to_le_bytes());
    v2.extend([b' '; 50]);
    std::fs::write(&path, &v2).unwrap();
    let (result, largest) = largest_allocation(|| read_npy_matrix(&path));
    assert!(largest < 2 << 20, "allocated {largest} bytes");
    assert!(result.unwrap_err().to_string().contains("the header claims 4294967295 bytes but the file holds 50"));
    // Shapes whose product overflows u64.
    std::fs::write(&path, npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }\n", &[0; 8])).unwrap();
    assert!(read_npy_matrix(&path).unwrap_err().to_string().contains("is too large"));
}

// ---- safetensors -----------------------------------------------------------------------

/// One tensor entry of a generated safetensors header.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    /// None: the offsets that the shape and dtype need; Some: these.
    offsets: Option<(u64, u64)>,
}

fn entry() -> impl Strategy<Value = Entry> {
    let name = prop_oneof![
        Just("0.weight".to_string()),
        Just("0.bias".to_string()),
        Just("1.weight".to_string()),
        Just("2.weight".to_string()),
        Just("2.bias".to_string()),
        Just("model.0.weight".to_string()),
        Just("fisher".to_string()),
        Just("diag".to_string()),
        Just("gram".to_string()),
        Just("grads".to_string()),
        Just("norms".to_string()),
        Just("block.0".to_string()),
        Just("block.00".to_string()),
        Just("kfac.0.A".to_string()),
        Just("kfac.0.G".to_string()),
        Just("kfac.0.X.A".to_string()),
        "[ -~]{0,10}",
        Just(format!("{}\n.weight", "k".repeat(500))),
    ];
    let dtype = prop_oneof![
        6 => Just("F32".to_string()),
        2 => Just("F64".to_string()),
        1 => Just("F16".to_string()),
        1 => Just("I64".to_string()),
        1 => Just("BOOL".to_string()),
        1 => Just("X9".to_string()),
    ];
    let dim = prop_oneof![8 => 0u64..5, 1 => Just(1u64 << 32), 1 => Just(u64::MAX), 1 => Just(1u64 << 62)];
    let shape = prop::collection::vec(dim, 0..4);
    let offsets = prop_oneof![6 => Just(None), 1 => (0u64..64, 0u64..64).prop_map(Some), 1 => Just(Some((0, u64::MAX)))];
    (name, dtype, shape, offsets).prop_map(|(name, dtype, shape, offsets)| Entry { name, dtype, shape, offsets })
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" => 8,
        "F16" => 2,
        "BOOL" => 1,
        _ => 4,
    }
}

/// A safetensors file from entries and metadata, with data of the right length (values
/// from `values`, cycled) unless `data_delta` changes it.
fn safetensors_bytes(entries: &[Entry], metadata: &[(String, String)], values: &[f32], data_delta: i64) -> Vec<u8> {
    let mut header = String::from("{");
    let mut offset = 0u64;
    if !metadata.is_empty() {
        let meta: HashMap<&str, &str> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        write!(header, "\"__metadata__\":{},", serde_json::to_string(&meta).unwrap()).unwrap();
    }
    let mut data = Vec::new();
    for e in entries {
        let bytes = e.shape.iter().try_fold(dtype_size(&e.dtype), |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
        let (start, end) = e.offsets.unwrap_or((offset, offset.saturating_add(bytes)));
        if e.offsets.is_none() && bytes <= 4096 {
            for k in 0..bytes as usize / 4 {
                data.extend(values.get(k % values.len().max(1)).copied().unwrap_or(0.5).to_le_bytes());
            }
            data.extend(std::iter::repeat_n(0u8, bytes as usize % 4));
            offset = end;
        }
        write!(
            header,
            "{}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{start},{end}]}},",
            serde_json::to_string(&e.name).unwrap(),
            e.dtype,
            e.shape
        )
        .unwrap();
    }
    if header.ends_with(',') {
        header.pop();
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    let len = (data.len() as i64 + data_delta).max(0) as usize;
    data.resize(len, 0);
    bytes.extend(data);
    bytes
}

fn metadata() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![Just("form"), Just("parameters"), Just("samples"), Just("rows_per_sample"), Just("other")];
    let value = prop_oneof![
        Just("full".to_string()),
        Just("diag".to_string()),
        Just("gram".to_string()),
        Just("norms".to_string()),
        Just("grads".to_string()),
        Just("layer".to_string()),
        Just("kfac".to_string()),
        Just("blocks:1,2".to_string()),
        Just("blocks:18446744073709551615,11".to_string()),
        (0u64..10).prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-3".to_string()),
        Just("x".repeat(5000)),
    ];
    prop::collection::vec((key.prop_map(str::to_string), value), 0..4)
}

fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let values = prop::collection::vec(prop_oneof![8 => -2.0f32..2.0, 1 => Just(f32::NAN), 1 => Just(-1e30f32)], 0..20);
    (prop::collection::vec(entry(), 0..4), metadata(), values, prop_oneof![8 => Just(0i64), 1 => -8i64..8]).prop_map(
        |(entries, metadata, values, delta)| safetensors_bytes(&entries, &metadata, &values, delta),
    )
}

/// Every reader of safetensors files on one input; what the Fisher reader accepts is a
/// possible Fisher matrix.
fn all_safetensors_readers(dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = dir.join("fuzz.safetensors");
    parse_file(&path, bytes, read_safetensors)?;
    for spec in [ActivationSpec::Uniform(Activation::Tanh), ActivationSpec::PerGap(vec![Activation::Relu])] {
        if let Some(mlp) = parse_file(&path, bytes, |p| Mlp::from_safetensors(p, &spec))? {
            prop_assert!(mlp.validate().is_ok());
        }
    }
    if let Some(file) = parse_file(&path, bytes, fisher_file::read)? {
        prop_assert!(fisher_file::check_consistent(&file).is_ok());
        prop_assert!(file.trace().is_finite());
    }
    Ok(())
}

#[test]
fn safetensors_headers_never_panic_over_allocate_or_spill() {
    let dir = tempfile::tempdir().unwrap();
    runner().run(&safetensors_file(), |bytes| all_safetensors_readers(dir.path(), &bytes)).unwrap();
}

#[test]
fn safetensors_raw_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let prefix: &'static [u8] = b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":\"F32\",\"shape\":[";
    runner().run(&raw_bytes(prefix), |bytes| all_safetensors_readers(dir.path(), &bytes)).unwrap();
}

/// A Fisher file of one of the forms, with symmetric or perturbed values.
fn fisher_like() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let form = prop_oneof![Just("full"), Just("layer"), Just("kfac"), Just("diag"), Just("gram"), Just("norms"), Just("blocks:2,1")];
    let side = 1usize..5;
    let perturbation = prop_oneof![4 => Just(None), 1 => (any::<prop::sample::Index>(), -3.0f32..3.0).prop_map(Some)];
    let with_parameters = prop_oneof![2 => Just(None), 1 => (0usize..12).prop_map(Some)];
    (form, side, prop::collection::vec(-1.0f32..1.0, 16), perturbation, with_parameters).prop_map(
        |(form, side, seed_values, perturbation, parameters)| {
            // B·Bᵀ: symmetric with a non-negative diagonal, as any Fisher matrix.
            let psd = |side: usize| {
                let b = |i: usize, j: usize| seed_values[(i * 4 + j) % 16];
                (0..side * side).map(|k| (0..side).map(|m| b(k / side, m) * b(k % side, m)).sum::<f32>()).collect::<Vec<f32>>()
            };
            let matrix = |name: &str, side: usize| (name.to_string(), vec![side, side], psd(side));
            let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = match form {
                "full" => vec![matrix("fisher", side)],
                "gram" => vec![matrix("gram", side)],
                "layer" => vec![matrix("block.0", side), matrix("block.2", 2)],
                "blocks:2,1" => vec![matrix("block.0", 2), matrix("block.1", 1)],
                "kfac" => vec![matrix("kfac.0.A", side), matrix("kfac.0.G", 2)],
                name => vec![(name.to_string(), vec![side], psd(side).into_iter().step_by(side + 1).collect())],
            };
            let mut perturbed = false;
            if let Some((at, delta)) = perturbation {
                let values = &mut tensors[0].2;
                let i = at.index(values.len());
                values[i] += delta;
                perturbed = delta != 0.0;
            }
            let mut metadata = vec![("form".to_string(), form.to_string())];
            if let Some(p) = parameters {
                metadata.push(("parameters".to_string(), p.to_string()));
            }
            let entries: Vec<Entry> = tensors
                .iter()
                .map(|(name, shape, _)| Entry {
                    name: name.clone(),
                    dtype: "F32".into(),
                    shape: shape.iter().map(|&d| d as u64).collect(),
                    offsets: None,
                })
                .collect();
            let values: Vec<f32> = tensors.iter().flat_map(|t| t.2.iter().copied()).collect();
            // `safetensors_bytes` cycles one value list per tensor: write each tensor's own.
            let mut bytes = safetensors_bytes(&entries, &metadata, &[], 0);
            let data_start = bytes.len() - values.len() * 4;
            bytes.truncate(data_start);
            bytes.extend(f32_bytes(&values));
            (bytes, perturbed)
        },
    )
}

#[test]
fn fisher_files_that_read_are_possible_fisher_matrices() {
    let dir = tempfile::tempdir().unwrap();
    runner()
        .run(&fisher_like(), |(bytes, _)| {
            let path = dir.path().join("F.safetensors");
            if let Some(file) = parse_file(&path, &bytes, fisher_file::read)? {
                prop_assert!(fisher_file::check_consistent(&file).is_ok());
            }
            Ok(())
        })
        .unwrap();
}

/// Writes `tensors` (F32) with `metadata` as a Fisher file and returns the reader's error.
fn fisher_error(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], metadata: &[(&str, &str)]) -> String {
    let path = dir.join("F.safetensors");
    let owned: Vec<(String, Vec<usize>, Vec<f32>)> = tensors.iter().map(|(n, s, v)| (n.to_string(), s.clone(), v.clone())).collect();
    let meta = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    fisher_engine::io::write_safetensors_atomic(&path, &owned, Some(meta)).unwrap();
    let message = fisher_file::read(&path).unwrap_err().to_string();
    assert!(!message.contains('\n') && message.contains("F.safetensors"), "{message}");
    message
}

#[test]
fn impossible_fisher_matrices_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = d.join("F.safetensors").display().to_string();
    let identity = |n: usize| (0..n * n).map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 }).collect::<Vec<f32>>();

    // A `fisher` tensor whose shape disagrees with its metadata.
    assert_eq!(
        fisher_error(d, &[("fisher", vec![10, 10], identity(10))], &[("form", "full"), ("parameters", "75")]),
        format!("{path}: tensor 'fisher' has shape [10, 10] but the metadata says parameters = 75")
    );
    // A negative diagonal entry, in each form that has a diagonal.
    let mut negative = identity(3);
    negative[4] = -0.5;
    assert_eq!(
        fisher_error(d, &[("fisher", vec![3, 3], negative.clone())], &[("form", "full")]),
        format!(
            "{path}: tensor 'fisher' has a negative diagonal entry -0.5 at [1, 1], impossible for a Fisher matrix \
             (positive semi-definite; tolerance 1e-5)"
        )
    );
    assert!(fisher_error(d, &[("diag", vec![3], vec![1.0, -0.5, 2.0])], &[("form", "diag")])
        .contains("tensor 'diag' has a negative entry -0.5 at index 1"));
    assert!(fisher_error(d, &[("block.0", vec![3, 3], negative.clone())], &[("form", "blocks:3")])
        .contains("tensor 'block.0' has a negative diagonal entry"));
    assert!(fisher_error(d, &[("kfac.0.A", vec![1, 1], vec![1.0]), ("kfac.0.G", vec![3, 3], negative)], &[("form", "kfac")])
        .contains("tensor 'kfac.0.G' has a negative diagonal entry"));
    // Not symmetric beyond rounding; within rounding it reads.
    let mut skew = identity(3);
    skew[1] = 0.25;
    assert!(fisher_error(d, &[("fisher", vec![3, 3], skew.clone())], &[("form", "full")])
        .contains("tensor 'fisher' is not symmetric: [1, 0] = 0 but [0, 1] = 0.25"));
    skew[1] = 1e-6;
    let path_buf = d.join("F.safetensors");
    fisher_engine::io::write_safetensors_atomic(&path_buf, &[("fisher".into(), vec![3, 3], skew)], None).unwrap();
    assert!(fisher_file::read(&path_buf).is_ok());
    // Block sizes that disagree with the form, and KFAC factors with the parameters.
    assert!(fisher_error(d, &[("block.0", vec![2, 2], identity(2))], &[("form", "blocks:3")])
        .contains("tensor 'block.0' has shape [2, 2] but the form blocks:3 gives it size 3"));
    assert!(fisher_error(
        d,
        &[("kfac.0.A", vec![2, 2], identity(2)), ("kfac.0.G", vec![3, 3], identity(3))],
        &[("form", "kfac"), ("parameters", "7")]
    )
    .contains("the KFAC factors cover 6 parameters"));
    // Two spellings of one block, and empty or impossible grads.
    assert!(fisher_error(d, &[("block.1", vec![1, 1], vec![1.0]), ("block.01", vec![1, 1], vec![1.0])], &[])
        .contains("unexpected tensor 'block.01'"));
    assert!(fisher_error(d, &[("grads", vec![0, 3], vec![])], &[]).contains("tensor 'grads' is empty"));
    assert!(fisher_error(d, &[("grads", vec![2, 3], vec![0.0; 6])], &[("samples", "4"), ("rows_per_sample", "1")])
        .contains("samples = 4 with rows_per_sample = 1"));
    // A 10 KB form name is quoted short.
    let long = "q".repeat(10_000);
    let message = fisher_error(d, &[("fisher", vec![1, 1], vec![1.0])], &[("form", &long)]);
    assert!(message.len() < 300 && message.contains('…'), "{message}");
}

#[test]
fn grads_of_a_zero_by_huge_shape_are_refused() {
    // [0, 2⁶²] passes the safetensors crate (0 bytes) but is no matrix ndarray can hold.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("F.safetensors");
    let entry = Entry { name: "grads".into(), dtype: "F32".into(), shape: vec![0, 1 << 62], offsets: None };
    std::fs::write(&path, safetensors_bytes(&[entry], &[], &[], 0)).unwrap();
    let message = fisher_file::read(&path).unwrap_err().to_string();
    assert!(message.contains("tensor 'grads' is empty"), "{message}");
}

// ---- models: adjacent Sequential indices -------------------------------------------------

#[test]
fn adjacent_linear_layers_have_no_activation_between_them() {
    use fisher_engine::reference::network::pre_activations_at;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    // nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)): keys 0.* and 1.*, nothing between.
    let w1 = [1.5f32, -2.0, 0.5, 3.0, -1.0, 2.5];
    let w2 = [2.0f32, -1.0, 0.5, 1.0, 3.0, -2.0];
    let tensors = vec![
        ("0.weight".to_string(), vec![3, 2], w1.to_vec()),
        ("0.bias".to_string(), vec![3], vec![0.5, -0.5, 1.0]),
        ("1.weight".to_string(), vec![2, 3], w2.to_vec()),
        ("1.bias".to_string(), vec![2], vec![0.25, -0.25]),
    ];
    fisher_engine::io::write_safetensors_atomic(&path, &tensors, None).unwrap();
    for spec in [ActivationSpec::Uniform(Activation::Tanh), ActivationSpec::PerGap(vec![]), ActivationSpec::PerGap(vec![Activation::Identity])] {
        let mlp = Mlp::from_safetensors(&path, &spec).unwrap();
        assert_eq!(mlp.activations, [Activation::Identity], "{spec:?}");
        // A linear map: z = W2 (W1 x + b1) + b2, far from what tanh would give.
        let x = ndarray::array![0.75f32, -1.25];
        let theta = mlp.parameters().mapv(f64::from);
        let z = pre_activations_at(&mlp, theta.view(), x.view()).unwrap().pop().unwrap();
        let h: Vec<f64> = (0..3)
            .map(|o| f64::from(w1[2 * o]) * 0.75 + f64::from(w1[2 * o + 1]) * -1.25 + [0.5, -0.5, 1.0][o])
            .collect();
        for o in 0..2 {
            let expected = (0..3).map(|i| f64::from(w2[3 * o + i]) * h[i]).sum::<f64>() + [0.25, -0.25][o];
            assert!((z[o] - expected).abs() < 1e-5, "output {o}: {} vs {expected}", z[o]);
        }
    }
    // A per-gap spec naming a real activation at the adjacent gap is refused, naming it.
    let message = Mlp::from_safetensors(&path, &ActivationSpec::PerGap(vec![Activation::Relu])).unwrap_err().to_string();
    assert_eq!(
        message,
        format!(
            "invalid input: {}: activation 0 of the spec is relu but layers 0 and 1 are adjacent in the nn.Sequential, \
             with no activation module between them (use identity there, or list only the 0 activation module(s))",
            path.display()
        )
    );

    // Linear, Linear, Tanh, Linear (0, 1, 3): identity, then the activation.
    let tensors = vec![
        ("0.weight".to_string(), vec![3, 2], w1.to_vec()),
        ("1.weight".to_string(), vec![2, 3], w2.to_vec()),
        ("3.weight".to_string(), vec![1, 2], vec![1.0, 1.0]),
    ];
    fisher_engine::io::write_safetensors_atomic(&path, &tensors, None).unwrap();
    let mlp = Mlp::from_safetensors(&path, &ActivationSpec::Uniform(Activation::Tanh)).unwrap();
    assert_eq!(mlp.activations, [Activation::Identity, Activation::Tanh]);
    let mlp = Mlp::from_safetensors(&path, &ActivationSpec::PerGap(vec![Activation::Gelu])).unwrap();
    assert_eq!(mlp.activations, [Activation::Identity, Activation::Gelu]);
    let message = Mlp::from_safetensors(&path, &ActivationSpec::PerGap(vec![Activation::Gelu; 3])).unwrap_err().to_string();
    assert!(message.contains("lists 3 activation(s)") && message.contains("layers 0 and 1 are adjacent"), "{message}");
}

// ---- specs -------------------------------------------------------------------------------

fn spec_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        ".{0,40}",
        prop::collection::vec(prop_oneof![Just("\"tanh\""), Just("\"relu\""), Just("3"), Just("null"), Just("[\"x\"]")], 0..5)
            .prop_map(|items| format!("[{}]", items.join(","))),
        (1usize..400).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        Just(format!("[\"{}\"]", "s".repeat(5000))),
        Just(format!("{{\"{}\": 1}}", "k\n".repeat(3000))),
        Just(format!("{}\n{}", "x".repeat(3000), "y".repeat(3000))),
    ]
}

#[test]
fn activation_specs_never_panic_or_spill() {
    runner()
        .run(&spec_text(), |text| {
            match ActivationSpec::parse(&text) {
                Ok(spec) => {
                    // What parses serves any model or says why not.
                    for gaps in [0, 1, 3] {
                        if let Err(e) = spec.for_gaps(gaps) {
                            check_message(&e, None)?;
                        }
                    }
                    if let Err(e) = spec.for_layer_indices(&[0, 1, 3, 4, 7]) {
                        check_message(&e, None)?;
                    }
                }
                Err(e) => check_message(&e, None)?,
            }
            Ok(())
        })
        .unwrap();
}

fn form_text() -> impl Strategy<Value = String> {
    let size = prop_oneof![
        4 => (0u64..20).prop_map(|s| s.to_string()),
        1 => Just(u64::MAX.to_string()),
        1 => Just((u64::MAX / 2 + 1).to_string()),
        1 => Just("18446744073709551616".to_string()),
        1 => Just("-1".to_string()),
        1 => Just(String::new()),
        1 => "[ -~]{0,6}",
    ];
    prop_oneof![
        4 => prop::collection::vec(size, 0..5).prop_map(|sizes| format!("blocks:{}", sizes.join(","))),
        1 => "[ -~]{0,30}",
        1 => Just(format!("blocks:{}", "1,".repeat(5000))),
        1 => Just("full".to_string()),
        1 => Just("gram".to_string()),
    ]
}

#[test]
fn form_specs_and_their_sizes_never_panic_or_wrap() {
    let dims = prop_oneof![4 => 0usize..30, 1 => Just(usize::MAX), 1 => Just(1usize << 32), 1 => any::<usize>()];
    runner()
        .run(&(form_text(), dims.clone(), dims), |(text, n, p)| {
            let form = match Form::parse(&text) {
                Ok(form) => form,
                Err(e) => return check_message(&e, None),
            };
            let starts = form.block_starts();
            prop_assert!(starts.windows(2).all(|w| w[0] <= w[1]));
            match form.validate(p) {
                Ok(()) => {
                    if let Form::BlockDiagonal(sizes) = &form {
                        prop_assert_eq!(sizes.iter().map(|&s| s as u128).sum::<u128>(), p as u128);
                    }
                }
                Err(e) => check_message(&e, None)?,
            }
            // The result's size is exact or refused, never wrapped.
            // In u128, where a sum of two usize::MAX² overflows too (None).
            let exact: Option<u128> = match &form {
                Form::Full => Some(p as u128 * p as u128),
                Form::Diagonal => Some(p as u128),
                Form::Gram => Some(n as u128 * n as u128),
                Form::SampleNorms => Some(n as u128),
                Form::BlockDiagonal(sizes) => sizes.iter().try_fold(0u128, |acc, &s| acc.checked_add(s as u128 * s as u128)),
            };
            match form.result_len(n, p) {
                Ok(len) => prop_assert_eq!(Some(len as u128), exact),
                Err(e) => {
                    prop_assert!(exact.is_none_or(|e| e > (isize::MAX as u128) / 4));
                    check_message(&e, None)?;
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn tensors_of_each_form_read_back_as_that_form() {
    // The property test above only accepts; this pins that the reader still reads each form.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("F.safetensors");
    fisher_engine::io::write_safetensors_atomic(&path, &[("norms".into(), vec![2], vec![1.0, 2.0])], None).unwrap();
    assert!(matches!(fisher_file::read(&path).unwrap().tensors, Tensors::Norms(_)));
}
