//! Running the `fisher` binary in CLI tests, and the assertions every such test makes: the
//! exit status, the single `fisher: error:` line, and that nothing was left behind; and the
//! files tests write and read independently of the crate's own writers (raw `.npy`,
//! safetensors through the safetensors crate).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use ndarray::{Array1, Array2};

/// The binary under test.
pub const FISHER: &str = env!("CARGO_BIN_EXE_fisher");

/// The first bytes of every PNG file.
pub const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The outcome of one run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `fisher args…` (with `FISHER_ADAPTER` removed, so the test picks the adapter).
pub fn fisher(args: &[&str]) -> Run {
    let Output { status, stdout, stderr } =
        Command::new(FISHER).args(args).env_remove("FISHER_ADAPTER").output().expect("run fisher");
    Run {
        code: status.code().expect("fisher exited by a signal"),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A path as the `&str` argument the CLI takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A fresh temporary directory.
pub fn temp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Asserts exit status 0, showing both streams otherwise.
#[track_caller]
pub fn succeeds(run: &Run) {
    assert_eq!(run.code, 0, "stderr:\n{}\nstdout:\n{}", run.stderr, run.stdout);
}

/// The one JSON line a successful `--json` run printed.
#[track_caller]
pub fn json(run: &Run) -> serde_json::Value {
    succeeds(run);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one line: {}", run.stdout);
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// The single `fisher: error:` line of a failed run. Other stderr lines may come from
/// drivers (Mesa prints its own complaints while adapters are enumerated).
#[track_caller]
pub fn error_line(run: &Run) -> String {
    let lines: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("fisher:")).collect();
    assert_eq!(lines.len(), 1, "expected one `fisher:` line on stderr, got:\n{}", run.stderr);
    assert!(lines[0].starts_with("fisher: error: "), "{}", lines[0]);
    lines[0].to_string()
}

/// Asserts a failure with `code` whose one-line message contains every one of `needles`,
/// and that nothing was printed to stdout.
#[track_caller]
pub fn assert_fails(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, code, "exit status; stderr:\n{}\nstdout:\n{}", run.stderr, run.stdout);
    let line = error_line(run);
    for needle in needles {
        assert!(line.contains(needle), "message {line:?} does not mention {needle:?}");
    }
    assert!(run.stdout.is_empty(), "a failed run printed to stdout: {}", run.stdout);
}

/// The file names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Asserts that `dir` holds exactly `names` (no output, no temporary file left behind).
#[track_caller]
pub fn assert_dir_holds(dir: &Path, names: &[&str]) {
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(names_in(dir), expected, "files in {}", dir.display());
}

/// A shape as numpy spells it in a `.npy` header: `(5,)`, `(2, 3)`.
pub fn npy_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes of f64 values.
pub fn f64_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A `.npy` file written byte by byte from a header dict, independently of the crate's
/// writer, so that malformed and unusual files (dtypes, ranks, Fortran order) can be made.
pub fn write_raw_npy(path: &Path, descr: &str, fortran: bool, shape: &str, data: &[u8]) {
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// A tensor to write raw: key, dtype, shape, little-endian bytes.
pub type RawTensor<'a> = (&'a str, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Writes `tensors` with the safetensors crate directly (what
/// `safetensors.torch.save_file(model.state_dict(), path)` writes), in the given order and
/// with any dtype, so that malformed models (NaN, extra and missing keys) can be made.
pub fn write_raw_safetensors(path: &Path, tensors: &[RawTensor<'_>]) {
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(key, dtype, shape, bytes)| {
            (*key, safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The tensors and metadata of a safetensors file, as f32 values.
pub struct Saved {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file written by `fisher` (every tensor F32), with the safetensors
/// crate rather than the crate's own writer.
pub fn read_safetensors(path: &Path) -> Saved {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    Saved { tensors, metadata: header.metadata().clone().unwrap_or_default() }
}

impl Saved {
    /// The 2-D tensor `name`.
    #[track_caller]
    pub fn matrix(&self, name: &str) -> Array2<f32> {
        let (shape, values) = self.tensor(name);
        assert_eq!(shape.len(), 2, "{name} has shape {shape:?}");
        Array2::from_shape_vec((shape[0], shape[1]), values.clone()).unwrap()
    }

    /// The 1-D tensor `name`.
    #[track_caller]
    pub fn vector(&self, name: &str) -> Array1<f32> {
        let (shape, values) = self.tensor(name);
        assert_eq!(shape.len(), 1, "{name} has shape {shape:?}");
        Array1::from(values.clone())
    }

    #[track_caller]
    fn tensor(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors.get(name).unwrap_or_else(|| panic!("tensor {name} missing: {:?}", self.names()))
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}
