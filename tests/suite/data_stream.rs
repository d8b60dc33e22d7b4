//! Issue 11, item 1: network data streamed from disk. An [`NpyDataset`] (the `.npy` files
//! checked once, then read a micro-batch at a time) must give bit-identical results to the
//! same data in memory ([`Dataset::from_npy`]), whatever the dtypes and byte orders of the
//! files and wherever the micro-batches end, and must refuse bad files with the messages of
//! the in-memory loader. Each body runs on the CPU and on the GPU.

use std::path::{Path, PathBuf};

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::backend::gpu::{GpuBackend, GpuOptions};
use fisher_engine::fisher::{NetForm, Variant};
use fisher_engine::model::{Activation, DataSource, Dataset, Likelihood, Mlp, NpyDataset, TargetRows, Targets};
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::{Engine, FisherError};
use ndarray::{Array1, Array2};

use crate::common::cli::{assert_dir_holds, assert_fails, fisher, s, succeeds, write_raw_npy};
use crate::common::problems::{likelihood, seeded_dataset, seeded_mlp};
use crate::common::{backend_test, gpu_context_with};

/// Scratch per micro-batch of the small-batch engines: a few samples of the nets below, so
/// that 53 samples take many micro-batches (of sizes that do not divide 53).
const SMALL_BATCH_BYTES: u64 = 4096;

fn mlp(widths: &[usize], seed: u64) -> Mlp {
    let bias = vec![true; widths.len() - 1];
    seeded_mlp(widths, &vec![Activation::Tanh; widths.len() - 2], &bias, 1.5, 0.3, &mut SplitMix64::new(seed))
}

/// An engine like `engine` whose micro-batches hold a few samples.
fn small_batches(engine: &Engine) -> Engine {
    if engine.is_gpu() {
        let options = GpuOptions { micro_batch_bytes: Some(SMALL_BATCH_BYTES), ..Default::default() };
        let ctx = gpu_context_with("data_stream::small_batches", &options).expect("a GPU (the engine has one)");
        Engine::from_gpu_backend(GpuBackend::new(ctx, &options).expect("GPU backend"))
    } else {
        Engine::from_cpu_backend(CpuBackend::new().with_batch_bytes(SMALL_BATCH_BYTES))
    }
}

/// Raw bytes of `values` in the given width and byte order.
fn bytes<T: Copy>(values: &[T], to_bytes: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    values.iter().flat_map(|&v| to_bytes(v)).collect()
}

/// How the files of a data set are written.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// numpy type string of the inputs (`<f4`, `>f8`).
    inputs: &'static str,
    /// numpy type string of the labels (`|i1`, `>i4`, `<i8`, `|u1`) or targets (`<f4`, `>f8`, `<i2`).
    labels: &'static str,
    /// Labels of shape (N, 1) rather than (N,).
    column: bool,
}

/// Writes `data` as `.npy` files of `layout`, returning their paths.
fn write_files(dir: &Path, data: &Dataset, layout: Layout) -> (PathBuf, PathBuf) {
    let (n, d) = data.inputs.dim();
    let (x, y) = (dir.join("x.npy"), dir.join("y.npy"));
    let xs: Vec<f32> = data.inputs.iter().copied().collect();
    let x_bytes = match layout.inputs {
        "<f4" => bytes(&xs, |v| v.to_le_bytes().to_vec()),
        ">f4" => bytes(&xs, |v| v.to_be_bytes().to_vec()),
        "<f8" => bytes(&xs, |v| f64::from(v).to_le_bytes().to_vec()),
        ">f8" => bytes(&xs, |v| f64::from(v).to_be_bytes().to_vec()),
        other => panic!("inputs dtype {other}"),
    };
    write_raw_npy(&x, layout.inputs, false, &format!("({n}, {d})"), &x_bytes);
    match &data.targets {
        Targets::Classes(labels) => {
            let y_bytes = match layout.labels {
                "|i1" => bytes(labels, |v| (v as i8).to_le_bytes().to_vec()),
                "|u1" => bytes(labels, |v| (v as u8).to_le_bytes().to_vec()),
                ">i4" => bytes(labels, |v| (v as i32).to_be_bytes().to_vec()),
                "<i8" => bytes(labels, |v| i64::from(v).to_le_bytes().to_vec()),
                ">u8" => bytes(labels, |v| u64::from(v).to_be_bytes().to_vec()),
                other => panic!("labels dtype {other}"),
            };
            let shape = if layout.column { format!("({n}, 1)") } else { format!("({n},)") };
            write_raw_npy(&y, layout.labels, false, &shape, &y_bytes);
        }
        Targets::Values(values) => {
            let vs: Vec<f32> = values.iter().copied().collect();
            let y_bytes = match layout.labels {
                "<f4" => bytes(&vs, |v| v.to_le_bytes().to_vec()),
                ">f8" => bytes(&vs, |v| f64::from(v).to_be_bytes().to_vec()),
                other => panic!("targets dtype {other}"),
            };
            write_raw_npy(&y, layout.labels, false, &format!("({n}, {})", values.ncols()), &y_bytes);
        }
    }
    (x, y)
}

const FORMS: [NetForm; 6] = [NetForm::Diagonal, NetForm::Kfac, NetForm::Layer, NetForm::Full, NetForm::Norms, NetForm::Grads];

fn variants() -> [Variant; 3] {
    [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 0x5eed_0000_0011 }]
}

backend_test!(data_on_disk_gives_bit_identical_results, |engine| {
    let dir = tempfile::tempdir().unwrap();
    let widths = [5, 7, 4];
    let net = mlp(&widths, 1);
    let cases = [
        (false, Layout { inputs: "<f4", labels: "<i8", column: false }),
        (false, Layout { inputs: ">f8", labels: "|i1", column: true }),
        (false, Layout { inputs: ">f4", labels: ">i4", column: false }),
        (false, Layout { inputs: "<f8", labels: "|u1", column: false }),
        (true, Layout { inputs: "<f4", labels: "<f4", column: false }),
        (true, Layout { inputs: ">f8", labels: ">f8", column: false }),
    ];
    let small = small_batches(&engine);
    for (c, (gaussian, layout)) in cases.into_iter().enumerate() {
        // 53 samples: prime, so no micro-batch size divides it.
        let data = seeded_dataset(53, widths[0], widths[2], likelihood(gaussian), &mut SplitMix64::new(10 + c as u64));
        let (x, y) = write_files(dir.path(), &data, layout);
        let loaded = Dataset::from_npy(&x, &y, likelihood(gaussian)).unwrap();
        assert_eq!(loaded, data, "{layout:?}: the files hold the data exactly");
        let on_disk = NpyDataset::open(&x, &y, likelihood(gaussian)).unwrap();
        assert_eq!((on_disk.len(), on_disk.input_dim(), on_disk.likelihood()), (53, widths[0], likelihood(gaussian)));
        assert_eq!(*on_disk.to_dataset().unwrap(), data, "{layout:?}: read whole");
        for e in [&engine, &small] {
            for variant in variants() {
                for form in FORMS {
                    let want = e.fisher(&net, &data, variant, form).unwrap();
                    let got = e.fisher(&net, &on_disk, variant, form).unwrap();
                    assert_eq!(got, want, "{layout:?} {variant:?} {form:?}");
                }
                // The implicit products: one direction, and a block through the operator
                // (which on the CPU keeps the forward pass of the data between products).
                let v = Array1::from_shape_fn(net.num_params(), |i| ((i * 7 % 11) as f32 - 5.0) / 5.0);
                let want = e.fisher_vector_product(&net, &data, variant, v.view()).unwrap();
                let got = e.fisher_vector_product(&net, &on_disk, variant, v.view()).unwrap();
                assert_eq!((got.product, got.quadratic), (want.product, want.quadratic), "{layout:?} {variant:?} F·v");
                let block = Array2::from_shape_fn((3, net.num_params()), |(j, i)| ((i + 3 * j) % 5) as f32 - 2.0);
                let want = e.network_operator(&net, &data, variant).unwrap().apply(block.view(), true).unwrap();
                let got = e.network_operator(&net, &on_disk, variant).unwrap().apply(block.view(), true).unwrap();
                assert_eq!((got.products, got.quadratics), (want.products, want.quadratics), "{layout:?} {variant:?} F·V");
            }
        }
    }
});

#[test]
fn micro_batches_read_exactly_the_rows_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let data = seeded_dataset(11, 3, 4, Likelihood::Categorical, &mut SplitMix64::new(5));
    let (x, y) = write_files(dir.path(), &data, Layout { inputs: ">f8", labels: ">u8", column: true });
    let on_disk = NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap();
    let Targets::Classes(labels) = &data.targets else { unreachable!() };
    for (s0, m) in [(0, 11), (0, 1), (3, 5), (10, 1), (4, 0)] {
        assert_eq!(on_disk.inputs(s0, m).unwrap(), data.inputs.slice(ndarray::s![s0..s0 + m, ..]), "inputs {s0}+{m}");
        match on_disk.targets(s0, m).unwrap() {
            TargetRows::Classes(c) => assert_eq!(&c[..], &labels[s0..s0 + m], "labels {s0}+{m}"),
            other => panic!("{other:?}"),
        }
    }
    // Past the end: an error, not a panic, on either kind of data.
    for source in [&on_disk as &dyn DataSource, &data] {
        for (s0, m) in [(10, 2), (12, 0), (usize::MAX, 2)] {
            assert!(matches!(source.inputs(s0, m), Err(FisherError::InvalidInput(_))), "{s0}+{m}");
            assert!(matches!(source.targets(s0, m), Err(FisherError::InvalidInput(_))), "{s0}+{m}");
        }
    }
}

/// The error of opening `x`, `y` on disk, which must be the in-memory loader's, word for word.
#[track_caller]
fn same_error(x: &Path, y: &Path, likelihood: Likelihood) -> FisherError {
    let streamed = NpyDataset::open(x, y, likelihood).expect_err("bad data opened");
    let whole = Dataset::from_npy(x, y, likelihood).expect_err("bad data loaded");
    assert_eq!(streamed.to_string(), whole.to_string());
    assert!(!streamed.to_string().contains('\n'), "one line: {streamed}");
    streamed
}

#[test]
fn bad_files_are_refused_with_the_in_memory_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.npy");
    let y = d.join("y.npy");
    let values: Vec<f64> = (0..30).map(|k| k as f64 / 7.0).collect();
    let labels: Vec<i64> = (0..10).map(|k| k % 3).collect();
    let write_x = |v: &[f64]| write_raw_npy(&x, ">f8", false, "(10, 3)", &bytes(v, |v| v.to_be_bytes().to_vec()));
    let write_y = |l: &[i64]| write_raw_npy(&y, "<i8", false, &format!("({},)", l.len()), &bytes(l, |v| v.to_le_bytes().to_vec()));
    write_x(&values);
    write_y(&labels);
    NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap();

    // NaN at row 6, column 1.
    let mut nan = values.clone();
    nan[6 * 3 + 1] = f64::NAN;
    write_x(&nan);
    match same_error(&x, &y, Likelihood::Categorical) {
        FisherError::NonFinite { row: 6, col: 1, what, .. } => assert!(what.contains("x.npy"), "{what}"),
        other => panic!("expected NonFinite at (6, 1), got {other}"),
    }
    // ... and a float64 beyond float32 at row 8 is reported before it.
    nan[8 * 3] = 1e300;
    write_x(&nan);
    assert!(same_error(&x, &y, Likelihood::Categorical).to_string().contains("value 1e300 at row 8, column 0 is beyond the float32 range"));
    write_x(&values);

    // A negative label at row 7, a wrong N, a truncated file.
    let mut negative = labels.clone();
    negative[7] = -1;
    write_y(&negative);
    assert!(same_error(&x, &y, Likelihood::Categorical).to_string().contains("label -1 at row 7 is negative"));
    write_y(&labels[..9]);
    assert!(same_error(&x, &y, Likelihood::Categorical).to_string().contains("have 10 rows but labels"));
    write_y(&labels);
    let full = std::fs::read(&y).unwrap();
    std::fs::write(&y, &full[..full.len() - 3]).unwrap();
    assert!(same_error(&x, &y, Likelihood::Categorical)
        .to_string()
        .contains("is truncated: shape (10,) of int64 needs 80 bytes of data but the file holds 77"));
    write_y(&labels);
    // Float labels; Gaussian targets of the wrong kind and with an Inf at row 2.
    write_raw_npy(&y, "<f4", false, "(10,)", &[0u8; 40]);
    assert!(same_error(&x, &y, Likelihood::Categorical).to_string().contains("integer class indices"));
    let mut targets = vec![0.5f32; 20];
    targets[2 * 2 + 1] = f32::INFINITY;
    write_raw_npy(&y, "<f4", false, "(10, 2)", &bytes(&targets, |v| v.to_le_bytes().to_vec()));
    assert!(matches!(same_error(&x, &y, Likelihood::Gaussian), FisherError::NonFinite { row: 2, col: 1, .. }));

    // Against the model: a label out of range at row 4 (3 classes), found by a second pass.
    let mut out_of_range = labels.clone();
    out_of_range[4] = 3;
    out_of_range[9] = 5;
    write_y(&out_of_range);
    let net = mlp(&[3, 4, 3], 2);
    let streamed = NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap().validate(&net, Likelihood::Categorical).unwrap_err();
    let whole = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap().validate(&net, Likelihood::Categorical).unwrap_err();
    assert_eq!(streamed.to_string(), whole.to_string());
    assert!(streamed.to_string().contains("label 3 at row 4 is out of range"), "{streamed}");
    let wide = mlp(&[2, 4, 6], 2);
    let streamed = NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap().validate(&wide, Likelihood::Categorical).unwrap_err();
    assert!(streamed.to_string().contains("inputs have 3 columns"), "{streamed}");
}

#[test]
fn a_file_changed_under_a_run_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let net = mlp(&[3, 4, 3], 3);
    let data = seeded_dataset(40, 3, 3, Likelihood::Categorical, &mut SplitMix64::new(7));
    let (x, y) = write_files(dir.path(), &data, Layout { inputs: "<f4", labels: "<i8", column: false });
    let engine = Engine::cpu();

    // A label beyond the model's outputs written after the checks (same file, in place).
    let on_disk = NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap();
    let Targets::Classes(labels) = &data.targets else { unreachable!() };
    let mut changed: Vec<i64> = labels.iter().map(|&c| i64::from(c)).collect();
    changed[17] = 99;
    write_raw_npy(&y, "<i8", false, "(40,)", &bytes(&changed, |v| v.to_le_bytes().to_vec()));
    let e = engine.fisher(&net, &on_disk, Variant::Empirical, NetForm::Diagonal).unwrap_err().to_string();
    assert!(e.contains("y.npy") && e.contains("label 99 at row 17 changed since the file was checked"), "{e}");

    // The inputs truncated after the checks.
    write_files(dir.path(), &data, Layout { inputs: "<f4", labels: "<i8", column: false });
    let on_disk = NpyDataset::open(&x, &y, Likelihood::Categorical).unwrap();
    std::fs::OpenOptions::new().write(true).open(&x).unwrap().set_len(200).unwrap();
    let e = engine.fisher(&net, &on_disk, Variant::True, NetForm::Kfac).unwrap_err().to_string();
    assert!(e.contains("x.npy") && e.contains("cannot read the data"), "{e}");
}

#[test]
fn compute_reads_npy_data_from_disk_and_refuses_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let net = mlp(&[4, 5, 3], 4);
    let data = seeded_dataset(29, 4, 3, Likelihood::Categorical, &mut SplitMix64::new(8));
    let weights = d.join("m.safetensors");
    net.to_safetensors(&weights).unwrap();
    let (x, y) = write_files(d, &data, Layout { inputs: ">f8", labels: "|i1", column: false });
    let out = d.join("F.safetensors");
    let run = fisher(&[
        "compute", "--weights", s(&weights), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y), "--form", "kfac",
        "--backend", "cpu", "--out", s(&out), "--verify",
    ]);
    succeeds(&run);

    // NaN at row 21 of the inputs: refused before any output, naming the file, row and column.
    let mut values: Vec<f64> = data.inputs.iter().map(|&v| f64::from(v)).collect();
    values[21 * 4 + 3] = f64::NAN;
    write_raw_npy(&x, ">f8", false, "(29, 4)", &bytes(&values, |v| v.to_be_bytes().to_vec()));
    std::fs::remove_file(&out).unwrap();
    let run = fisher(&[
        "compute", "--weights", s(&weights), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y), "--form", "diag",
        "--backend", "cpu", "--out", s(&out),
    ]);
    assert_fails(&run, 2, &["x.npy", "NaN", "row 21, column 3"]);
    assert_dir_holds(d, &["m.safetensors", "x.npy", "y.npy"]);
}
