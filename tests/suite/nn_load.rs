//! Loading models (PyTorch-style safetensors) and data (`.npy`), and every bad input giving
//! its specific, one-line error that names the key, file or row.

use std::path::{Path, PathBuf};

use fisher_engine::model::{Activation, ActivationSpec, Dataset, Likelihood, Linear, Mlp, Targets};
use fisher_engine::FisherError;
use ndarray::{array, Array1, Array2};
use safetensors::Dtype;

use crate::common::cli::{f32_bytes, f64_bytes, npy_shape, write_raw_npy, write_raw_safetensors, RawTensor};

/// A tensor to write: key, dtype, shape, raw little-endian bytes.
type Raw = RawTensor<'static>;

/// An F32 tensor with values 0.1·(k + 1) + offset, distinct so that misplaced values show.
fn tensor(key: &'static str, shape: &[usize], offset: f32) -> Raw {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|k| 0.1 * (k as f32 + 1.0) + offset).collect();
    (key, Dtype::F32, shape.to_vec(), f32_bytes(&values))
}

/// Writes what `safetensors.torch.save_file(model.state_dict(), path)` writes, as `dir/name`.
fn write_tensors(dir: &Path, name: &str, tensors: &[Raw]) -> PathBuf {
    let path = dir.join(name);
    write_raw_safetensors(&path, tensors);
    path
}

/// The tensors of a 3-4-2 `nn.Sequential(Linear(3, 4), Tanh(), Linear(4, 2))`.
fn sequential_3_4_2() -> Vec<Raw> {
    vec![
        tensor("0.weight", &[4, 3], 0.0),
        tensor("0.bias", &[4], 10.0),
        tensor("2.weight", &[2, 4], 20.0),
        tensor("2.bias", &[2], 30.0),
    ]
}

#[track_caller]
fn load_error(dir: &Path, tensors: &[Raw], spec: &ActivationSpec) -> String {
    let path = write_tensors(dir, "m.safetensors", tensors);
    match Mlp::from_safetensors(&path, spec) {
        Ok(mlp) => panic!("loaded a bad model: {mlp:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("m.safetensors"), "error does not name the file: {message}");
            assert!(!message.contains('\n'), "error is not one line: {message}");
            message
        }
    }
}

#[track_caller]
fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "'{message}' does not mention '{part}'");
    }
}

fn tanh() -> ActivationSpec {
    ActivationSpec::Uniform(Activation::Tanh)
}

#[test]
fn loads_a_pytorch_sequential() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tensors(dir.path(), "m.safetensors", &sequential_3_4_2());
    let mlp = Mlp::from_safetensors(&path, &tanh()).unwrap();
    assert_eq!(mlp.layers.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 2]);
    assert_eq!(mlp.activations, [Activation::Tanh]);
    assert_eq!((mlp.input_dim(), mlp.output_dim(), mlp.num_params()), (3, 2, 12 + 4 + 8 + 2));
    assert_eq!(mlp.param_ranges(), [(0, 16), (16, 10)]);
    // named_parameters() order: 0.weight row-major, 0.bias, 2.weight, 2.bias.
    let theta = mlp.parameters();
    assert_eq!(theta[1], 0.2f32); // 0.weight[0, 1]
    assert_eq!(theta[3], 0.4f32); // 0.weight[1, 0]
    assert_eq!(theta[12], 10.1f32); // 0.bias[0]
    assert_eq!(theta[16], 20.1f32); // 2.weight[0, 0]
    assert_eq!(theta[25], 30.2f32); // 2.bias[1]
    assert_eq!(mlp.layers[0].weight[[1, 0]], 0.4f32);

    // Round trip through to_safetensors, with PyTorch's keys.
    let copy = dir.path().join("copy.safetensors");
    mlp.to_safetensors(&copy).unwrap();
    let bytes = std::fs::read(&copy).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort_unstable();
    assert_eq!(names, ["0.bias", "0.weight", "2.bias", "2.weight"]);
    assert_eq!(file.tensor("2.weight").unwrap().shape(), [2, 4]);
    assert_eq!(Mlp::from_safetensors(&copy, &tanh()).unwrap(), mlp);
    // Overwriting an existing file replaces it whole.
    let other = mlp.with_parameters((mlp.parameters() * 2.0).view()).unwrap();
    other.to_safetensors(&copy).unwrap();
    assert_eq!(Mlp::from_safetensors(&copy, &tanh()).unwrap(), other);
}

#[test]
fn layers_are_ordered_by_numeric_index_and_may_lack_bias() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        tensor("10.weight", &[2, 5], 0.0),
        tensor("2.weight", &[5, 4], 0.0),
        tensor("2.bias", &[5], 0.0),
        tensor("0.weight", &[4, 3], 0.0),
    ];
    let path = write_tensors(dir.path(), "m.safetensors", &tensors);
    let spec = ActivationSpec::parse(r#"["relu", "gelu"]"#).unwrap();
    let mlp = Mlp::from_safetensors(&path, &spec).unwrap();
    assert_eq!(mlp.layers.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 2, 10]);
    assert_eq!(mlp.layers.iter().map(|l| l.bias.is_some()).collect::<Vec<_>>(), [false, true, false]);
    assert_eq!(mlp.activations, [Activation::Relu, Activation::Gelu]);
    assert_eq!(mlp.num_params(), 12 + 20 + 5 + 10);
}

#[test]
fn accepts_a_common_prefix_and_f64() {
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["model.", "net.layers."] {
        let keys: Vec<&'static str> = ["0.weight", "0.bias", "2.weight"]
            .iter()
            .map(|k| &*Box::leak(format!("{prefix}{k}").into_boxed_str()))
            .collect();
        let tensors = vec![
            (keys[0], Dtype::F64, vec![2, 3], f64_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            (keys[1], Dtype::F64, vec![2], f64_bytes(&[0.5, -0.5])),
            (keys[2], Dtype::F32, vec![1, 2], f32_bytes(&[7.0, 8.0])),
        ];
        let path = write_tensors(dir.path(), "m.safetensors", &tensors);
        let mlp = Mlp::from_safetensors(&path, &ActivationSpec::Uniform(Activation::Sigmoid)).unwrap();
        assert_eq!(mlp.layers[0].weight, array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], "{prefix}");
        assert_eq!(mlp.layers[0].bias, Some(array![0.5f32, -0.5]));
        assert_eq!(mlp.layers[1].weight, array![[7.0f32, 8.0]]);
    }
}

#[test]
fn bad_models_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let spec = tanh();
    let mut good = sequential_3_4_2();

    // A bias without its weight.
    let mut tensors = good.clone();
    tensors.push(tensor("4.bias", &[2], 0.0));
    assert_mentions(&load_error(dir, &tensors, &spec), &["'4.bias'", "'4.weight'", "missing weight"]);

    // Keys that are not Linear parameters.
    for extra in ["0.running_mean", "head.weight", "classifier"] {
        let mut tensors = good.clone();
        tensors.push(tensor(extra, &[4], 0.0));
        assert_mentions(&load_error(dir, &tensors, &spec), &[&format!("unrecognized key '{extra}'")]);
    }

    // Keys with different prefixes.
    let tensors = vec![tensor("a.0.weight", &[4, 3], 0.0), tensor("b.2.weight", &[2, 4], 0.0)];
    assert_mentions(&load_error(dir, &tensors, &spec), &["'b.2.weight'", "'a.0.weight'", "prefix"]);

    // Two spellings of one layer.
    let tensors = vec![tensor("0.weight", &[4, 3], 0.0), tensor("00.weight", &[4, 3], 0.0)];
    assert_mentions(&load_error(dir, &tensors, &spec), &["'0.weight'", "'00.weight'", "same layer 0"]);

    // Wrong ranks.
    good[0] = tensor("0.weight", &[12], 0.0);
    assert_mentions(&load_error(dir, &good, &spec), &["'0.weight'", "[12]", "2-D"]);
    good[0] = tensor("0.weight", &[4, 3], 0.0);
    good[1] = tensor("0.bias", &[4, 1], 0.0);
    assert_mentions(&load_error(dir, &good, &spec), &["'0.bias'", "1-D"]);

    // Bias length ≠ out.
    good[1] = tensor("0.bias", &[5], 0.0);
    assert_mentions(&load_error(dir, &good, &spec), &["'0.bias' has 5 values", "'0.weight' has 4 outputs"]);
    good[1] = tensor("0.bias", &[4], 0.0);

    // Layers that do not chain.
    good[2] = tensor("2.weight", &[2, 5], 0.0);
    assert_mentions(
        &load_error(dir, &good, &spec),
        &["layer 2.weight expects 5 inputs but layer 0 produces 4"],
    );
    let prefixed = vec![tensor("model.0.weight", &[4, 3], 0.0), tensor("model.2.weight", &[2, 5], 0.0)];
    assert_mentions(
        &load_error(dir, &prefixed, &spec),
        &["layer model.2.weight expects 5 inputs but layer model.0 produces 4"],
    );
    good[2] = tensor("2.weight", &[2, 4], 0.0);

    // Empty weights.
    let empty = vec![(("0.weight"), Dtype::F32, vec![0, 3], Vec::new())];
    assert_mentions(&load_error(dir, &empty, &spec), &["'0.weight'", "[0, 3]"]);

    // NaN / Inf, with the flat index.
    let mut values = vec![0.5f32; 8];
    values[5] = f32::NAN;
    good[2] = ("2.weight", Dtype::F32, vec![2, 4], f32_bytes(&values));
    assert_mentions(&load_error(dir, &good, &spec), &["NaN", "'2.weight'", "flat index 5"]);
    good[2] = tensor("2.weight", &[2, 4], 0.0);
    good[3] = ("2.bias", Dtype::F32, vec![2], f32_bytes(&[0.0, f32::NEG_INFINITY]));
    assert_mentions(&load_error(dir, &good, &spec), &["-inf", "'2.bias'", "flat index 1"]);
    good[3] = ("2.bias", Dtype::F64, vec![2], f64_bytes(&[0.0, 1e300]));
    assert_mentions(&load_error(dir, &good, &spec), &["'2.bias'", "flat index 1", "float32 range"]);
    good[3] = tensor("2.bias", &[2], 0.0);

    // Unsupported dtypes.
    good[1] = ("0.bias", Dtype::F16, vec![4], vec![0; 8]);
    assert_mentions(&load_error(dir, &good, &spec), &["'0.bias'", "F16"]);
    good[1] = ("0.bias", Dtype::I64, vec![4], vec![0; 32]);
    assert_mentions(&load_error(dir, &good, &spec), &["'0.bias'", "I64"]);
    good[1] = tensor("0.bias", &[4], 0.0);

    // A per-gap spec of the wrong length.
    let two = ActivationSpec::PerGap(vec![Activation::Tanh, Activation::Relu]);
    assert_mentions(
        &load_error(dir, &good, &two),
        &["lists 2 activation(s)", "2 Linear layer(s)", "exactly 1"],
    );

    // No tensors at all.
    assert_mentions(&load_error(dir, &[], &spec), &["no tensors"]);

    // The good model still loads.
    let path = write_tensors(dir, "m.safetensors", &good);
    assert!(Mlp::from_safetensors(&path, &spec).is_ok());
}

#[test]
fn unreadable_model_files_are_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.safetensors");
    let error = Mlp::from_safetensors(&missing, &tanh()).unwrap_err();
    assert!(matches!(&error, FisherError::Io { path, .. } if path.contains("absent.safetensors")), "{error}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let error = Mlp::from_safetensors(&garbage, &tanh()).unwrap_err();
    assert!(
        matches!(&error, FisherError::Io { path, message } if path.contains("garbage") && message.contains("not a safetensors")),
        "{error}"
    );

    let mlp = Mlp::new(vec![Linear { index: 0, weight: Array2::ones((1, 1)), bias: None }], vec![]).unwrap();
    let nowhere = dir.path().join("no/such/dir/m.safetensors");
    assert!(matches!(mlp.to_safetensors(&nowhere), Err(FisherError::Io { .. })));
    assert!(!nowhere.exists());
}

#[test]
fn activation_specs() {
    use Activation::*;
    assert_eq!(ActivationSpec::parse("tanh").unwrap(), ActivationSpec::Uniform(Tanh));
    assert_eq!(ActivationSpec::parse(" GELU ").unwrap(), ActivationSpec::Uniform(Gelu));
    assert_eq!("relu".parse::<ActivationSpec>().unwrap(), ActivationSpec::Uniform(Relu));
    assert_eq!(
        ActivationSpec::parse(r#"["tanh","relu"]"#).unwrap(),
        ActivationSpec::PerGap(vec![Tanh, Relu])
    );
    assert_eq!(
        ActivationSpec::parse(r#"{"activations": ["sigmoid", "identity", "gelu"]}"#).unwrap(),
        ActivationSpec::PerGap(vec![Sigmoid, Identity, Gelu])
    );
    assert_eq!(ActivationSpec::parse("[]").unwrap(), ActivationSpec::PerGap(vec![]));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acts.json");
    std::fs::write(&file, r#"{"activations": ["relu", "relu"]}"#).unwrap();
    assert_eq!(
        ActivationSpec::parse(file.to_str().unwrap()).unwrap(),
        ActivationSpec::PerGap(vec![Relu, Relu])
    );
    std::fs::write(&file, r#"["relu", "swish"]"#).unwrap();
    let error = ActivationSpec::parse(file.to_str().unwrap()).unwrap_err().to_string();
    assert_mentions(&error, &["acts.json", "activation 1", "'swish'"]);
    let error = ActivationSpec::parse(dir.path().join("absent.json").to_str().unwrap()).unwrap_err();
    assert!(matches!(error, FisherError::Io { .. }), "{error}");

    for (bad, mentions) in [
        ("swish", vec!["unknown activation 'swish'"]),
        (r#"["tanh", "swish"]"#, vec!["activation 1", "'swish'"]),
        (r#"["tanh", 3]"#, vec!["activation 1", "3"]),
        (r#"{"acts": ["tanh"]}"#, vec!["'acts'"]),
        (r#"{"activations": "tanh"}"#, vec!["activations"]),
        ("[tanh", vec!["not valid JSON"]),
    ] {
        let error = ActivationSpec::parse(bad).unwrap_err().to_string();
        assert_mentions(&error, &mentions);
    }

    assert_eq!(ActivationSpec::Uniform(Tanh).for_gaps(3).unwrap(), [Tanh; 3]);
    assert!(ActivationSpec::PerGap(vec![Tanh]).for_gaps(2).is_err());
}

#[test]
fn mlp_new_and_with_parameters_validate() {
    let layer = |index, out, fan_in, bias: bool| Linear {
        index,
        weight: Array2::from_elem((out, fan_in), 0.5),
        bias: bias.then(|| Array1::zeros(out)),
    };
    let mlp = Mlp::new(vec![layer(0, 4, 3, true), layer(2, 2, 4, false)], vec![Activation::Relu]).unwrap();
    let message = |r: fisher_engine::Result<Mlp>| r.unwrap_err().to_string();
    assert_mentions(&message(Mlp::new(vec![], vec![])), &["no Linear layers"]);
    assert_mentions(
        &message(Mlp::new(vec![layer(0, 4, 3, true)], vec![Activation::Tanh])),
        &["needs 0 activation(s)"],
    );
    assert_mentions(
        &message(Mlp::new(vec![layer(2, 4, 3, true), layer(0, 2, 4, true)], vec![Activation::Tanh])),
        &["layer 0 follows layer 2"],
    );
    assert_mentions(
        &message(Mlp::new(vec![layer(0, 4, 3, true), layer(1, 2, 5, true)], vec![Activation::Tanh])),
        &["layer 1.weight expects 5 inputs but layer 0 produces 4"],
    );

    let theta = Array1::from_shape_fn(mlp.num_params(), |k| k as f32);
    let moved = mlp.with_parameters(theta.view()).unwrap();
    assert_eq!(moved.parameters(), theta);
    assert_eq!(moved.layers[0].weight[[1, 2]], 5.0);
    assert_eq!(moved.layers[0].bias.as_ref().unwrap()[0], 12.0);
    assert_eq!(moved.layers[1].weight[[0, 0]], 16.0);
    assert_mentions(
        &message(mlp.with_parameters(theta.slice(ndarray::s![1..]))),
        &["has 23 values", "24 parameters"],
    );
    let mut nan = theta.clone();
    nan[13] = f32::NAN;
    assert_mentions(&message(mlp.with_parameters(nan.view())), &["'0.bias'", "flat index 1"]);
    // A non-finite weight, in a row-major weight and in a transposed (column-major) one: the
    // first in PyTorch's row-major order is named.
    for (value, spelled) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut second = layer(2, 2, 4, false);
        second.weight[[1, 3]] = value;
        second.weight[[1, 1]] = value;
        assert_mentions(
            &message(Mlp::new(vec![layer(0, 4, 3, true), second.clone()], vec![Activation::Relu])),
            &[spelled, "'2.weight'", "flat index 5", "row 1, column 1"],
        );
        second.weight = second.weight.t().as_standard_layout().into_owned().reversed_axes();
        assert!(second.weight.as_slice().is_none(), "a column-major weight");
        assert_mentions(
            &message(Mlp::new(vec![layer(0, 4, 3, true), second], vec![Activation::Relu])),
            &[spelled, "'2.weight'", "flat index 5", "row 1, column 1"],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Data

/// Writes a `.npy` file (format 1.0) with the given descr, shape and raw bytes as `dir/name`.
fn write_npy(dir: &Path, name: &str, descr: &str, shape: &[usize], bytes: &[u8], fortran: bool) -> PathBuf {
    let path = dir.join(name);
    write_raw_npy(&path, descr, fortran, &npy_shape(shape), bytes);
    path
}

fn inputs_f32(dir: &Path, rows: usize, cols: usize) -> PathBuf {
    let values: Vec<f32> = (0..rows * cols).map(|k| k as f32 * 0.25 - 1.0).collect();
    write_npy(dir, "x.npy", "<f4", &[rows, cols], &f32_bytes(&values), false)
}

fn labels_i64(dir: &Path, labels: &[i64]) -> PathBuf {
    let bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(dir, "y.npy", "<i8", &[labels.len()], &bytes, false)
}

fn model_3_to(outputs: usize) -> Mlp {
    Mlp::new(
        vec![
            Linear { index: 0, weight: Array2::from_elem((4, 3), 0.1), bias: Some(Array1::zeros(4)) },
            Linear { index: 2, weight: Array2::from_elem((outputs, 4), 0.1), bias: None },
        ],
        vec![Activation::Tanh],
    )
    .unwrap()
}

#[track_caller]
fn data_error(inputs: &Path, labels: &Path, likelihood: Likelihood) -> FisherError {
    match Dataset::from_npy(inputs, labels, likelihood) {
        Ok(data) => panic!("loaded bad data: {data:?}"),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "error is not one line: {e}");
            e
        }
    }
}

#[test]
fn loads_categorical_data() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let x = inputs_f32(dir, 5, 3);
    let y = labels_i64(dir, &[0, 2, 1, 1, 0]);
    let data = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap();
    assert_eq!(data.inputs.dim(), (5, 3));
    assert_eq!(data.inputs[[1, 0]], 3.0 * 0.25 - 1.0);
    assert_eq!(data.targets, Targets::Classes(vec![0, 2, 1, 1, 0]));
    data.validate(&model_3_to(3), Likelihood::Categorical).unwrap();

    // float64 inputs, int32 labels of shape (N, 1).
    let values: Vec<f64> = (0..10).map(|k| k as f64 / 3.0).collect();
    let x = write_npy(dir, "x64.npy", "<f8", &[5, 2], &f64_bytes(&values), false);
    let bytes: Vec<u8> = [1i32, 0, 1, 1, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let y = write_npy(dir, "y32.npy", "<i4", &[5, 1], &bytes, false);
    let data = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap();
    assert_eq!(data.inputs[[4, 1]], (9.0f64 / 3.0) as f32);
    assert_eq!(data.targets, Targets::Classes(vec![1, 0, 1, 1, 0]));
    // uint8 labels (as MNIST loaders produce) are class indices too.
    let y8 = write_npy(dir, "y8.npy", "|u1", &[5], &[3, 0, 255, 1, 2], false);
    let data = Dataset::from_npy(&x, &y8, Likelihood::Categorical).unwrap();
    assert_eq!(data.targets, Targets::Classes(vec![3, 0, 255, 1, 2]));
}

#[test]
fn loads_gaussian_data() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let x = inputs_f32(dir, 4, 3);
    let targets: Vec<f32> = (0..8).map(|k| k as f32 - 2.5).collect();
    let y = write_npy(dir, "t.npy", "<f4", &[4, 2], &f32_bytes(&targets), false);
    let data = Dataset::from_npy(&x, &y, Likelihood::Gaussian).unwrap();
    assert_eq!(data.targets, Targets::Values(Array2::from_shape_vec((4, 2), targets).unwrap()));
    data.validate(&model_3_to(2), Likelihood::Gaussian).unwrap();
    // Targets width ≠ outputs.
    let error = data.validate(&model_3_to(3), Likelihood::Gaussian).unwrap_err().to_string();
    assert_mentions(&error, &["targets have 2 columns but the model has 3 outputs"]);

    // A 1-D float64 target is N×1.
    let y = write_npy(dir, "t1.npy", "<f8", &[4], &f64_bytes(&[0.5, 1.5, 2.5, 3.5]), false);
    let data = Dataset::from_npy(&x, &y, Likelihood::Gaussian).unwrap();
    assert_eq!(data.targets, Targets::Values(array![[0.5f32], [1.5], [2.5], [3.5]]));
    data.validate(&model_3_to(1), Likelihood::Gaussian).unwrap();
}

#[test]
fn bad_data_names_the_row_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let x = inputs_f32(dir, 5, 3);

    // N mismatch.
    let y = labels_i64(dir, &[0, 1, 2, 0]);
    let error = data_error(&x, &y, Likelihood::Categorical).to_string();
    assert_mentions(&error, &["x.npy", "have 5 rows", "y.npy", "have 4"]);

    // Negative label.
    let y = labels_i64(dir, &[0, -1, 2, 0, 1]);
    let error = data_error(&x, &y, Likelihood::Categorical).to_string();
    assert_mentions(&error, &["y.npy", "label -1 at row 1", "negative"]);

    // Label out of range (needs the model: validate).
    let y = labels_i64(dir, &[0, 1, 3, 0, 1]);
    let data = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap();
    let error = data.validate(&model_3_to(3), Likelihood::Categorical).unwrap_err().to_string();
    assert_mentions(&error, &["label 3 at row 2", "3 classes", "0..=2"]);

    // Wrong input width.
    let data = Dataset::from_npy(&inputs_f32(dir, 5, 4), &labels_i64(dir, &[0; 5]), Likelihood::Categorical)
        .unwrap();
    let error = data.validate(&model_3_to(3), Likelihood::Categorical).unwrap_err().to_string();
    assert_mentions(&error, &["inputs have 4 columns", "(0.weight) expects 3 inputs"]);

    // The likelihood and the targets disagree.
    let data = Dataset::from_npy(&x, &labels_i64(dir, &[0; 5]), Likelihood::Categorical).unwrap();
    assert!(data.validate(&model_3_to(3), Likelihood::Gaussian).is_err());

    // NaN / Inf in the inputs, with row and column.
    let mut values: Vec<f32> = vec![0.5; 15];
    values[2 * 3 + 1] = f32::NAN;
    let bad = write_npy(dir, "nan.npy", "<f4", &[5, 3], &f32_bytes(&values), false);
    let y = labels_i64(dir, &[0; 5]);
    match data_error(&bad, &y, Likelihood::Categorical) {
        FisherError::NonFinite { row: 2, col: 1, what, .. } => assert!(what.contains("nan.npy"), "{what}"),
        other => panic!("expected NonFinite at (2, 1), got {other}"),
    }
    let mut values = vec![0.5f64; 15];
    values[14] = f64::INFINITY;
    let bad = write_npy(dir, "inf.npy", "<f8", &[5, 3], &f64_bytes(&values), false);
    assert!(matches!(
        data_error(&bad, &y, Likelihood::Categorical),
        FisherError::NonFinite { row: 4, col: 2, .. }
    ));
    values[14] = 1e300;
    let bad = write_npy(dir, "big.npy", "<f8", &[5, 3], &f64_bytes(&values), false);
    assert_mentions(
        &data_error(&bad, &y, Likelihood::Categorical).to_string(),
        &["row 4, column 2", "float32 range"],
    );
    // ... and in a Dataset built in memory.
    let mut data = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap();
    data.inputs[[3, 0]] = f32::NEG_INFINITY;
    assert!(matches!(
        data.validate(&model_3_to(3), Likelihood::Categorical),
        Err(FisherError::NonFinite { row: 3, col: 0, .. })
    ));

    // Non-finite Gaussian targets.
    let t = write_npy(dir, "t.npy", "<f4", &[5, 1], &f32_bytes(&[0.0, 0.0, 0.0, f32::NAN, 0.0]), false);
    assert!(matches!(
        data_error(&x, &t, Likelihood::Gaussian),
        FisherError::NonFinite { row: 3, col: 0, .. }
    ));

    // Empty.
    let empty = write_npy(dir, "empty.npy", "<f4", &[0, 3], &[], false);
    let none = write_npy(dir, "none.npy", "<i8", &[0], &[], false);
    assert!(matches!(data_error(&empty, &none, Likelihood::Categorical), FisherError::Empty { rows: 0, .. }));
    let mut data = Dataset::from_npy(&x, &y, Likelihood::Categorical).unwrap();
    data.inputs = Array2::zeros((0, 3));
    data.targets = Targets::Classes(vec![]);
    assert!(matches!(data.validate(&model_3_to(3), Likelihood::Categorical), Err(FisherError::Empty { .. })));
}

#[test]
fn bad_data_files_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let x = inputs_f32(dir, 3, 2);
    let y = labels_i64(dir, &[0, 1, 0]);

    // Float labels for the categorical likelihood.
    let float_labels = write_npy(dir, "yf.npy", "<f4", &[3], &f32_bytes(&[0.0, 1.0, 0.0]), false);
    assert_mentions(
        &data_error(&x, &float_labels, Likelihood::Categorical).to_string(),
        &["yf.npy", "float32", "int32 or int64"],
    );
    // Labels that are not a vector.
    let wide = write_npy(dir, "y2.npy", "<i8", &[3, 2], &[0u8; 48], false);
    assert_mentions(&data_error(&x, &wide, Likelihood::Categorical).to_string(), &["y2.npy", "(3, 2)"]);
    // Integer inputs, 1-D inputs, unsupported dtypes.
    let int_inputs = write_npy(dir, "xi.npy", "<i4", &[3, 2], &[0u8; 24], false);
    assert_mentions(
        &data_error(&int_inputs, &y, Likelihood::Categorical).to_string(),
        &["xi.npy", "int32", "float32 or float64"],
    );
    let flat = write_npy(dir, "x1.npy", "<f4", &[3], &f32_bytes(&[1.0, 2.0, 3.0]), false);
    assert_mentions(&data_error(&flat, &y, Likelihood::Categorical).to_string(), &["x1.npy", "(3,)", "2-D"]);
    let bytes = write_npy(dir, "xu.npy", "|u1", &[3, 2], &[0u8; 6], false);
    assert_mentions(&data_error(&bytes, &y, Likelihood::Categorical).to_string(), &["xu.npy", "uint8"]);
    let booleans = write_npy(dir, "yb.npy", "|b1", &[3], &[0, 1, 0], false);
    assert_mentions(
        &data_error(&x, &booleans, Likelihood::Categorical).to_string(),
        &["yb.npy", "bool", "not supported"],
    );
    // Fortran order.
    let fortran = write_npy(dir, "xf.npy", "<f4", &[3, 2], &f32_bytes(&[0.0; 6]), true);
    assert!(
        matches!(data_error(&fortran, &y, Likelihood::Categorical), FisherError::Io { path, .. } if path.contains("xf.npy"))
    );
    // Missing, not .npy, truncated.
    let missing = dir.join("absent.npy");
    assert!(
        matches!(data_error(&missing, &y, Likelihood::Categorical), FisherError::Io { path, .. } if path.contains("absent.npy"))
    );
    assert!(
        matches!(data_error(&x, &missing, Likelihood::Categorical), FisherError::Io { path, .. } if path.contains("absent.npy"))
    );
    let text = dir.join("text.npy");
    std::fs::write(&text, "1,2\n3,4\n").unwrap();
    assert!(
        matches!(data_error(&text, &y, Likelihood::Categorical), FisherError::Io { path, .. } if path.contains("text.npy"))
    );
    let truncated = write_npy(dir, "xt.npy", "<f4", &[3, 2], &f32_bytes(&[0.0; 5]), false);
    assert!(
        matches!(data_error(&truncated, &y, Likelihood::Categorical), FisherError::Io { path, .. } if path.contains("xt.npy"))
    );
}
