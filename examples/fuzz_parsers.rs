//! The long fuzz run of every parser: `cargo run --release --example fuzz_parsers -- [CASES] [SEED]`
//! (default 1,000,000 cases per parser, seed 1).
//!
//! The same kinds of inputs as the property tests in `tests/suite/fuzz.rs`, from a seeded
//! generator (SplitMix64) so that a run is reproducible: `.npy` files (plausible headers
//! with hostile dtypes, shapes, orders, versions, lengths and nesting, then random byte
//! flips; and raw bytes) through `read_npy_matrix`, `NpyRows` and `Dataset::from_npy`;
//! safetensors files (hostile names, dtypes, shapes, offsets, metadata and lengths; and raw
//! bytes) through `read_safetensors`, `Mlp::from_safetensors` and `fisher_file::read`;
//! activation specs; form specs with `Form::validate` and `Form::result_len`.
//!
//! For every case: no panic (each parser call runs under `catch_unwind`, and the case that
//! panicked is written to `fuzz-failures/`), every error is one line of bounded length that
//! names the file, and nothing accepted is inconsistent. At the end it prints, per parser,
//! the cases run, how many were accepted, the failures and the rate; it exits 1 on any
//! failure.
//!
//! Files are written to a RAM-backed directory when there is one (`/dev/shm`), else to the
//! system's temporary directory.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fisher_engine::io::{fisher_file, read_npy_matrix, read_safetensors, NpyRows};
use fisher_engine::model::{Activation, ActivationSpec, Dataset, Likelihood, Mlp};
use fisher_engine::Form;

/// The longest error message, beyond the path it names (the suite's bound).
const MAX_MESSAGE: usize = 640;

/// SplitMix64: tiny, seedable, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn printable(&mut self, max: usize) -> String {
        let n = self.below(max + 1);
        (0..n).map(|_| (b' ' + self.below(95) as u8) as char).collect()
    }
    /// A random byte flip or two (or none).
    fn flip(&mut self, bytes: &mut [u8]) {
        if bytes.is_empty() {
            return;
        }
        for _ in 0..self.below(3) {
            let i = self.below(bytes.len());
            bytes[i] = self.next() as u8;
        }
    }
}

/// A dimension: usually small, sometimes hostile.
fn dim(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => u64::MAX.to_string(),
        1 => (1u64 << 40).to_string(),
        2 => (rng.next()).to_string(),
        3 => rng.pick(&["-1", "-0", "18446744073709551616", "(1, (2,))", "3L", "'3'", "None", "1_0"]).to_string(),
        _ => rng.below(5).to_string(),
    }
}

fn npy_file(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(5) {
        let mut bytes = if rng.chance(2) { b"\x93NUMPY\x01\x00".to_vec() } else { Vec::new() };
        bytes.extend(rng.bytes(300));
        return bytes;
    }
    let descr = match rng.below(20) {
        0 => format!("'{}'", rng.printable(12)),
        1 => "[('a', '<f4'), ('b', '<i8', (2, 3))]".to_string(),
        2 => "'<f99999999999999999999'".to_string(),
        3 => "'<f2305843009213693952'".to_string(),
        _ => rng
            .pick(&["'<f4'", "'<f8'", "'>f4'", "'>f8'", "'<i8'", "'>i2'", "'|u1'", "'<u8'", "'|i1'", "'<f2'", "'|b1'", "'|O'", "'<U7'", "'<M8[ns]'", "5"])
            .to_string(),
    };
    let dims: Vec<String> = (0..rng.below(4)).map(|_| dim(rng)).collect();
    let shape = match (rng.chance(6), dims.len()) {
        (true, _) => format!("[{}]", dims.join(", ")),
        (false, 1) => format!("({},)", dims[0]),
        (false, _) => format!("({})", dims.join(", ")),
    };
    let fortran = *rng.pick(&["False", "False", "False", "True", "0", "'no'"]);
    let mut dict = format!("{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, ");
    if rng.chance(10) {
        dict.push_str("'extra': 1, ");
    }
    dict.push('}');
    let nesting = match rng.below(10) {
        0 => rng.below(40),
        1 => 100 + rng.below(500),
        _ => 0,
    };
    let mut text = format!("{}{dict}{}\n", "[".repeat(nesting), "]".repeat(nesting)).into_bytes();
    let (major, minor) = match rng.below(13) {
        0..=7 => (1u8, 0u8),
        8 | 9 => (2, 0),
        10 | 11 => (3, 0),
        _ => (rng.next() as u8, rng.next() as u8),
    };
    let len = match rng.below(10) {
        0 => u32::MAX,
        1 => rng.next() as u32,
        _ => text.len() as u32,
    };
    let mut bytes = vec![0x93, b'N', b'U', b'M', b'P', b'Y', major, minor];
    if major == 1 {
        bytes.extend((len as u16).to_le_bytes());
    } else {
        bytes.extend(len.to_le_bytes());
    }
    bytes.append(&mut text);
    let data = if rng.chance(3) { rng.below(256) } else { 24 };
    bytes.extend((0..data).map(|k| (k as u8).wrapping_mul(37)));
    rng.flip(&mut bytes);
    bytes
}

fn safetensors_file(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(5) {
        let mut bytes = if rng.chance(2) {
            b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":\"F32\",\"shape\":[".to_vec()
        } else {
            Vec::new()
        };
        bytes.extend(rng.bytes(300));
        return bytes;
    }
    let names = [
        "0.weight", "0.bias", "1.weight", "2.weight", "2.bias", "model.0.weight", "fisher", "diag", "gram", "grads", "norms",
        "block.0", "block.00", "block.2", "kfac.0.A", "kfac.0.G", "kfac.0.X.A",
    ];
    let mut header = String::from("{");
    if rng.chance(2) {
        let mut meta = serde_json::Map::new();
        for _ in 0..rng.below(4) {
            let key = *rng.pick(&["form", "parameters", "samples", "rows_per_sample", "other"]);
            let value = match rng.below(14) {
                0 => "x".repeat(5000),
                1..=4 => rng.below(12).to_string(),
                _ => rng
                    .pick(&["full", "diag", "gram", "norms", "grads", "layer", "kfac", "blocks:1,2", "blocks:18446744073709551615,11", "-3", "18446744073709551616"])
                    .to_string(),
            };
            meta.insert(key.into(), value.into());
        }
        header.push_str(&format!("\"__metadata__\":{},", serde_json::Value::Object(meta)));
    }
    let mut data = Vec::new();
    let mut offset = 0u64;
    for _ in 0..rng.below(4) {
        let name = match rng.below(12) {
            0 => rng.printable(10),
            1 => format!("{}\n.weight", "k".repeat(500)),
            _ => rng.pick(&names).to_string(),
        };
        let (dtype, size) = *rng.pick(&[("F32", 4u64), ("F32", 4), ("F32", 4), ("F64", 8), ("F16", 2), ("I64", 8), ("BOOL", 1), ("X9", 4)]);
        let shape: Vec<u64> = (0..rng.below(4))
            .map(|_| match rng.below(12) {
                0 => 1 << 32,
                1 => u64::MAX,
                2 => 1 << 62,
                _ => rng.below(5) as u64,
            })
            .collect();
        let bytes = shape.iter().try_fold(size, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
        let (start, end) = match rng.below(10) {
            0 => (rng.below(64) as u64, rng.below(64) as u64),
            1 => (0, u64::MAX),
            _ => (offset, offset.saturating_add(bytes)),
        };
        if end == offset.saturating_add(bytes) && bytes <= 4096 {
            for _ in 0..bytes / 4 {
                let v = match rng.below(20) {
                    0 => f32::NAN,
                    1 => -1e30,
                    _ => (rng.next() % 4000) as f32 / 1000.0 - 2.0,
                };
                data.extend(v.to_le_bytes());
            }
            data.extend(std::iter::repeat_n(0u8, (bytes % 4) as usize));
            offset = end;
        }
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{end}]}},",
            serde_json::Value::String(name)
        ));
    }
    if header.ends_with(',') {
        header.pop();
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    if rng.chance(8) {
        let len = data.len().saturating_sub(8) + rng.below(16);
        data.resize(len, 0);
    }
    bytes.extend(data);
    if rng.chance(4) {
        rng.flip(&mut bytes);
    }
    bytes
}

fn spec_text(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => rng.printable(40),
        1 => String::from_utf8_lossy(&rng.bytes(40)).into_owned(),
        2 => {
            let items: Vec<&str> = (0..rng.below(5)).map(|_| *rng.pick(&["\"tanh\"", "\"relu\"", "3", "null", "[\"x\"]", "\"GELU\""])).collect();
            format!("[{}]", items.join(","))
        }
        3 => {
            let depth = 1 + rng.below(400);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        }
        4 => format!("{{\"activations\": [\"tanh\", \"{}\"]}}", rng.printable(20)),
        5 => format!("[\"{}\"]", "s".repeat(rng.below(5000))),
        6 => format!("{{\"{}\": 1}}", "k\n".repeat(rng.below(3000))),
        _ => rng.pick(&["tanh", " RELU ", "identity", "swish", "\"gelu\"", "[]"]).to_string(),
    }
}

fn form_text(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => rng.printable(30),
        1 => format!("blocks:{}", "1,".repeat(rng.below(5000))),
        2 => rng.pick(&["full", "diag", "diagonal", "gram", "norms", "blocks:", "blocks:,"]).to_string(),
        _ => {
            let sizes: Vec<String> = (0..rng.below(5))
                .map(|_| match rng.below(12) {
                    0 => u64::MAX.to_string(),
                    1 => (u64::MAX / 2 + 1).to_string(),
                    2 => "18446744073709551616".into(),
                    3 => "-1".into(),
                    4 => String::new(),
                    5 => rng.printable(6),
                    _ => rng.below(20).to_string(),
                })
                .collect();
            format!("blocks:{}", sizes.join(","))
        }
    }
}

fn size(rng: &mut Rng) -> usize {
    match rng.below(8) {
        0 => usize::MAX,
        1 => 1 << 32,
        2 => rng.next() as usize,
        _ => rng.below(30),
    }
}

/// Per parser: cases, accepted, failures.
#[derive(Default)]
struct Tally {
    cases: u64,
    accepted: u64,
    failures: u64,
    seconds: f64,
}

struct Fuzzer {
    dir: PathBuf,
    failures_dir: PathBuf,
    tallies: BTreeMap<&'static str, Tally>,
}

impl Fuzzer {
    /// Runs `check` (Ok(true) accepted, Ok(false) refused properly, Err(why) a failure)
    /// under catch_unwind, saving the input of a failure.
    fn case(&mut self, parser: &'static str, input: &[u8], check: impl FnOnce() -> Result<bool, String>) {
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(check)).unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("panic: {}", what.unwrap_or_default()))
        });
        let tally = self.tallies.entry(parser).or_default();
        tally.cases += 1;
        tally.seconds += start.elapsed().as_secs_f64();
        match outcome {
            Ok(accepted) => tally.accepted += accepted as u64,
            Err(why) => {
                tally.failures += 1;
                if tally.failures <= 5 {
                    std::fs::create_dir_all(&self.failures_dir).unwrap();
                    let saved = self.failures_dir.join(format!("{parser}-{}.bin", tally.cases));
                    std::fs::write(&saved, input).unwrap();
                    eprintln!("FAILURE {parser} (input saved as {}): {}", saved.display(), why.chars().take(500).collect::<String>());
                }
            }
        }
    }
}

/// One line, bounded, naming `file`.
fn message_ok(error: &fisher_engine::FisherError, file: Option<&Path>) -> Result<bool, String> {
    let message = error.to_string();
    let path_len = file.map_or(0, |f| f.display().to_string().len());
    if message.contains('\n') || message.contains('\r') {
        return Err(format!("not one line: {message:?}"));
    }
    if message.chars().count() > MAX_MESSAGE + 2 * path_len {
        return Err(format!("{} characters: {}", message.chars().count(), message.chars().take(300).collect::<String>()));
    }
    if let Some(file) = file {
        if !message.contains(&*file.file_name().unwrap().to_string_lossy()) {
            return Err(format!("does not name the file: {message}"));
        }
    }
    Ok(false)
}

fn judge<T>(result: fisher_engine::Result<T>, file: Option<&Path>, accepted: impl FnOnce(T) -> Result<(), String>) -> Result<bool, String> {
    match result {
        Ok(value) => accepted(value).map(|()| true),
        Err(e) => message_ok(&e, file),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let cases: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("CASES is a count"));
    let seed: u64 = args.next().map_or(1, |a| a.parse().expect("SEED is a number"));
    // Panics are counted and saved, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    let mut fuzzer = Fuzzer { dir: dir.path().to_path_buf(), failures_dir: PathBuf::from("fuzz-failures"), tallies: BTreeMap::new() };
    let mut rng = Rng(seed);
    let npy = fuzzer.dir.join("fuzz.npy");
    let st = fuzzer.dir.join("fuzz.safetensors");
    let good_x = fuzzer.dir.join("x.npy");
    let good_y = fuzzer.dir.join("y.npy");
    fisher_engine::io::write_npy_matrix(&good_x, ndarray::Array2::from_elem((2, 1), 0.5f32).view()).unwrap();
    fisher_engine::io::write_npy_labels(&good_y, &[0, 1]).unwrap();
    let start = Instant::now();
    let mut last_report = Instant::now();
    for case in 0..cases {
        let bytes = npy_file(&mut rng);
        std::fs::write(&npy, &bytes).unwrap();
        fuzzer.case("npy: read_npy_matrix", &bytes, || {
            judge(read_npy_matrix(&npy), Some(&npy), |m| {
                if m.len() * 4 > bytes.len() {
                    return Err(format!("{} values from {} bytes", m.len(), bytes.len()));
                }
                Ok(())
            })
        });
        fuzzer.case("npy: NpyRows", &bytes, || {
            let rows = NpyRows::open(&npy, 3).and_then(|rows| rows.collect::<fisher_engine::Result<Vec<_>>>());
            judge(rows, Some(&npy), |_| Ok(()))
        });
        fuzzer.case("npy: Dataset::from_npy (labels)", &bytes, || {
            let categorical = judge(Dataset::from_npy(&good_x, &npy, Likelihood::Categorical), Some(&npy), |_| Ok(()))?;
            let gaussian = judge(Dataset::from_npy(&good_x, &npy, Likelihood::Gaussian), Some(&npy), |_| Ok(()))?;
            let inputs = judge(Dataset::from_npy(&npy, &good_y, Likelihood::Categorical), Some(&npy), |_| Ok(()))?;
            Ok(categorical || gaussian || inputs)
        });

        let bytes = safetensors_file(&mut rng);
        std::fs::write(&st, &bytes).unwrap();
        fuzzer.case("safetensors: read_safetensors", &bytes, || judge(read_safetensors(&st), Some(&st), |_| Ok(())));
        fuzzer.case("safetensors: Mlp::from_safetensors", &bytes, || {
            let spec = if case % 2 == 0 { ActivationSpec::Uniform(Activation::Tanh) } else { ActivationSpec::PerGap(vec![Activation::Relu]) };
            judge(Mlp::from_safetensors(&st, &spec), Some(&st), |mlp| mlp.validate().map_err(|e| e.to_string()))
        });
        fuzzer.case("safetensors: fisher_file::read", &bytes, || {
            judge(fisher_file::read(&st), Some(&st), |file| {
                fisher_file::check_consistent(&file)?;
                if !file.trace().is_finite() {
                    return Err("a non-finite trace".into());
                }
                Ok(())
            })
        });

        let text = spec_text(&mut rng);
        fuzzer.case("ActivationSpec::parse", text.as_bytes(), || {
            judge(ActivationSpec::parse(&text), None, |spec| {
                if let Err(e) = spec.for_layer_indices(&[0, 1, 3, 4, 7]) {
                    message_ok(&e, None)?;
                }
                Ok(())
            })
        });

        let text = form_text(&mut rng);
        let (n, p) = (size(&mut rng), size(&mut rng));
        fuzzer.case("Form::parse/validate/result_len", text.as_bytes(), || {
            judge(Form::parse(&text), None, |form| {
                if let Err(e) = form.validate(p) {
                    message_ok(&e, None)?;
                } else if let Form::BlockDiagonal(sizes) = &form {
                    if sizes.iter().map(|&s| s as u128).sum::<u128>() != p as u128 {
                        return Err(format!("{text} validated for P = {p}"));
                    }
                }
                // In u128, where a sum of two usize::MAX² overflows too (u128::MAX).
                let exact: u128 = match &form {
                    Form::Full => p as u128 * p as u128,
                    Form::Diagonal => p as u128,
                    Form::Gram => n as u128 * n as u128,
                    Form::SampleNorms => n as u128,
                    Form::BlockDiagonal(sizes) => {
                        sizes.iter().try_fold(0u128, |acc, &s| acc.checked_add(s as u128 * s as u128)).unwrap_or(u128::MAX)
                    }
                };
                match form.result_len(n, p) {
                    Ok(len) if len as u128 != exact => Err(format!("{text}: result_len {len}, exactly {exact}")),
                    Ok(_) => Ok(()),
                    Err(e) if exact <= isize::MAX as u128 / 4 => Err(format!("{text}: refused {exact} values: {e}")),
                    Err(e) => message_ok(&e, None).map(drop),
                }
            })
        });

        if last_report.elapsed().as_secs() >= 30 {
            eprintln!("{} of {cases} cases, {:.0} s", case + 1, start.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    let total = start.elapsed().as_secs_f64();
    println!("{:<40} {:>10} {:>10} {:>8} {:>12}", "parser", "cases", "accepted", "failures", "cases/s");
    let mut failures = 0;
    for (parser, t) in &fuzzer.tallies {
        println!("{parser:<40} {:>10} {:>10} {:>8} {:>12.0}", t.cases, t.accepted, t.failures, t.cases as f64 / t.seconds.max(1e-9));
        failures += t.failures;
    }
    println!("seed {seed}, {cases} cases per parser, {total:.1} s wall, {failures} failures");
    if failures > 0 {
        std::process::exit(1);
    }
}
