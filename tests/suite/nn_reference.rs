//! The f64 network reference against independent computations: central finite differences
//! of the log-likelihood and of the outputs, brute-force expectations over labels, Monte
//! Carlo convergence, and the identities between forms (blocks of `full`, its diagonal and
//! trace, KFAC expansion).

use fisher_engine::model::{Activation, Dataset, Likelihood, Linear, Mlp, Targets};
use fisher_engine::fisher::{augmented_to_pytorch, kfac_expand, mc_uniform, KfacFactors, NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::SplitMix64;
use ndarray::{s, Array1, Array2, ArrayView2};

use crate::common::problems;

/// Central-difference step: balances the O(h²) truncation error against the O(u/h) rounding
/// error of f64 (both ≈ 1e-10 relative here).
const H: f64 = 1e-5;

/// An MLP with layer widths `widths` (indices 0, 2, 4, … as in an nn.Sequential with
/// activation modules between), weights N(0, 1/in)·1.5 so that activations are neither
/// saturated nor linear, biases N(0, 0.5²).
fn seeded_mlp(widths: &[usize], activations: &[Activation], bias: bool, seed: u64) -> Mlp {
    let bias = vec![bias; widths.len() - 1];
    problems::seeded_mlp(widths, activations, &bias, 1.5, 0.5, &mut SplitMix64::new(seed))
}

fn seeded_data(mlp: &Mlp, n: usize, likelihood: Likelihood, seed: u64) -> Dataset {
    problems::seeded_dataset(n, mlp.input_dim(), mlp.output_dim(), likelihood, &mut SplitMix64::new(seed))
}

fn theta_f64(mlp: &Mlp) -> Array1<f64> {
    mlp.parameters().mapv(f64::from)
}

/// Worst |a − b| relative to max(|b|, floor).
#[track_caller]
fn assert_close(what: &str, a: ArrayView2<'_, f64>, b: ArrayView2<'_, f64>, rel: f64) {
    assert_eq!(a.dim(), b.dim(), "{what}: shapes differ");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    let (mut worst, mut at) = (0.0f64, (0, 0));
    for ((idx, &x), &y) in a.indexed_iter().zip(b.iter()) {
        let d = (x - y).abs();
        if d.is_nan() || d > worst {
            worst = d;
            at = idx;
        }
    }
    assert!(
        worst <= rel * scale,
        "{what}: max |Δ| = {worst:e} at {at:?} ({} vs {}) exceeds {rel:e} × {scale:e}",
        a[at],
        b[at]
    );
}

fn full(f: NetFisher<f64>) -> Array2<f64> {
    match f {
        NetFisher::Full(m) => m,
        other => panic!("expected Full, got {other:?}"),
    }
}

fn gaps(widths: &[usize]) -> usize {
    widths.len() - 2
}

/// True when every hidden pre-activation of sample `i` is at least 1e-3 from relu's kink, so
/// that a step of 1e-5 in any parameter cannot cross it.
fn away_from_kinks(mlp: &Mlp, data: &Dataset, i: usize) -> bool {
    let pre = reference::pre_activations_at(mlp, theta_f64(mlp).view(), data.inputs.row(i)).unwrap();
    pre[..pre.len() - 1].iter().all(|z| z.iter().all(|v| v.abs() > 1e-3))
}

/// ∇θ log p(yᵢ|xᵢ) by central differences in f64.
fn fd_gradient(mlp: &Mlp, data: &Dataset, i: usize, likelihood: Likelihood) -> Array1<f64> {
    let theta = theta_f64(mlp);
    Array1::from_shape_fn(theta.len(), |p| {
        let mut plus = theta.clone();
        plus[p] += H;
        let mut minus = theta.clone();
        minus[p] -= H;
        let up = reference::log_likelihood_at(mlp, plus.view(), data, i, likelihood).unwrap();
        let down = reference::log_likelihood_at(mlp, minus.view(), data, i, likelihood).unwrap();
        (up - down) / (2.0 * H)
    })
}

/// Every architecture the finite-difference test covers: each activation, with and without
/// bias, a deeper mixed network and a network with no hidden layer.
fn fd_cases() -> Vec<(String, Mlp)> {
    let mut cases = Vec::new();
    let all =
        [Activation::Tanh, Activation::Relu, Activation::Sigmoid, Activation::Gelu, Activation::Identity];
    for (a, act) in all.into_iter().enumerate() {
        for bias in [true, false] {
            let widths = [3, 4, 3];
            cases.push((
                format!("3-4-3 {} bias={bias}", act.name()),
                seeded_mlp(&widths, &vec![act; gaps(&widths)], bias, 100 + a as u64 * 2 + bias as u64),
            ));
        }
    }
    cases.push((
        "3-5-4-2 relu,gelu bias".into(),
        seeded_mlp(&[3, 5, 4, 2], &[Activation::Relu, Activation::Gelu], true, 7),
    ));
    cases.push((
        "2-3-4-3 sigmoid,tanh no bias".into(),
        seeded_mlp(&[2, 3, 4, 3], &[Activation::Sigmoid, Activation::Tanh], false, 8),
    ));
    cases.push(("4-3 single layer".into(), seeded_mlp(&[4, 3], &[], true, 9)));
    cases
}

#[test]
fn empirical_gradients_equal_finite_differences() {
    for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
        for (name, mlp) in fd_cases() {
            let data = seeded_data(&mlp, 6, likelihood, 11);
            let (rows, r) = reference::per_sample_rows(&mlp, &data, likelihood, Variant::Empirical).unwrap();
            assert_eq!((r, rows.dim()), (1, (6, mlp.num_params())), "{name}");
            let mut checked = 0;
            for i in 0..data.len() {
                if !away_from_kinks(&mlp, &data, i) {
                    continue;
                }
                checked += 1;
                let fd = fd_gradient(&mlp, &data, i, likelihood);
                assert_close(
                    &format!("{name} {likelihood:?} sample {i}"),
                    rows.row(i).insert_axis(ndarray::Axis(0)),
                    fd.view().insert_axis(ndarray::Axis(0)),
                    1e-7,
                );
            }
            assert!(checked >= 4, "{name}: only {checked} samples away from relu kinks");
        }
    }
}

#[test]
fn true_categorical_fisher_is_the_expectation_over_labels() {
    let mlp = seeded_mlp(&[3, 5, 4], &[Activation::Gelu], true, 21);
    let mut data = seeded_data(&mlp, 5, Likelihood::Categorical, 22);
    let classes = mlp.output_dim();
    let p_count = mlp.num_params();
    // Σ_c p_c g_c g_cᵀ with g_c the empirical gradient at label c.
    let mut brute = Array2::<f64>::zeros((p_count, p_count));
    let probabilities: Vec<Array1<f64>> = (0..data.len())
        .map(|i| {
            let pre =
                reference::pre_activations_at(&mlp, theta_f64(&mlp).view(), data.inputs.row(i)).unwrap();
            let z = pre.last().unwrap();
            let e = z.mapv(|v| (v - z.fold(f64::MIN, |m, &x| m.max(x))).exp());
            &e / e.sum()
        })
        .collect();
    for c in 0..classes {
        data.targets = Targets::Classes(vec![c as u32; data.len()]);
        let (g, _) =
            reference::per_sample_rows(&mlp, &data, Likelihood::Categorical, Variant::Empirical).unwrap();
        for (i, p) in probabilities.iter().enumerate() {
            let row = g.row(i);
            for a in 0..p_count {
                for b in 0..p_count {
                    brute[[a, b]] += p[c] * row[a] * row[b];
                }
            }
        }
    }
    brute /= data.len() as f64;
    let f =
        full(reference::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, NetForm::Full).unwrap());
    assert_close("true categorical vs Σ_c p_c g_c g_cᵀ", f.view(), brute.view(), 1e-12);
}

#[test]
fn true_gaussian_fisher_is_jacobian_gram() {
    for bias in [true, false] {
        let mlp = seeded_mlp(&[3, 4, 2], &[Activation::Tanh], bias, 31);
        let data = seeded_data(&mlp, 4, Likelihood::Gaussian, 32);
        let theta = theta_f64(&mlp);
        let p_count = theta.len();
        let mut brute = Array2::<f64>::zeros((p_count, p_count));
        for i in 0..data.len() {
            let output = |t: &Array1<f64>| {
                reference::pre_activations_at(&mlp, t.view(), data.inputs.row(i)).unwrap().pop().unwrap()
            };
            let mut jacobian = Array2::<f64>::zeros((mlp.output_dim(), p_count));
            for p in 0..p_count {
                let (mut plus, mut minus) = (theta.clone(), theta.clone());
                plus[p] += H;
                minus[p] -= H;
                jacobian.column_mut(p).assign(&((output(&plus) - output(&minus)) / (2.0 * H)));
            }
            brute += &jacobian.t().dot(&jacobian);
        }
        brute /= data.len() as f64;
        let f =
            full(reference::fisher(&mlp, &data, Likelihood::Gaussian, Variant::True, NetForm::Full).unwrap());
        assert_close(&format!("true Gaussian vs JᵀJ/N (bias={bias})"), f.view(), brute.view(), 1e-7);
    }
}

#[test]
fn monte_carlo_converges_to_the_true_fisher() {
    for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
        let mlp = seeded_mlp(&[3, 4, 3], &[Activation::Tanh], true, 41);
        let data = seeded_data(&mlp, 4, likelihood, 42);
        let exact = full(reference::fisher(&mlp, &data, likelihood, Variant::True, NetForm::Full).unwrap());
        let mc = Variant::MonteCarlo { samples: 4000, seed: 2024 };
        let sampled = full(reference::fisher(&mlp, &data, likelihood, mc, NetForm::Full).unwrap());
        let error = (&sampled - &exact).mapv(|v| v * v).sum().sqrt() / exact.mapv(|v| v * v).sum().sqrt();
        assert!(error < 0.05, "{likelihood:?}: MC(K=4000) relative Frobenius error {error}");
        // A fixed seed gives the same result; another seed another one.
        let again = full(reference::fisher(&mlp, &data, likelihood, mc, NetForm::Full).unwrap());
        assert_eq!(sampled, again, "{likelihood:?}: MC is not deterministic");
        let other = Variant::MonteCarlo { samples: 4000, seed: 2025 };
        let different = full(reference::fisher(&mlp, &data, likelihood, other, NetForm::Full).unwrap());
        assert_ne!(sampled, different, "{likelihood:?}: the seed is ignored");
    }
}

#[test]
fn monte_carlo_rows_follow_the_documented_draws() {
    let mlp = seeded_mlp(&[2, 4], &[], true, 51);
    let (seed, k) = (0xDEAD_BEEF_0000_0007u64, 6);
    let logits = Array1::from(vec![0.3, -1.2, 2.0, 0.1]);
    let p = {
        let e = logits.mapv(|v: f64| v.exp());
        &e / e.sum()
    };
    let data = seeded_data(&mlp, 9, Likelihood::Categorical, 52);
    let rows = reference::output_rows(
        logits.view(),
        &data,
        8,
        Likelihood::Categorical,
        Variant::MonteCarlo { samples: k, seed },
    )
    .unwrap();
    for draw in 0..k {
        let u = f64::from(mc_uniform(seed, 8, draw as u32, 0));
        let class = (0..4).find(|&c| u < p.slice(s![..=c]).sum()).unwrap_or(3);
        let mut expected = -&p;
        expected[class] += 1.0;
        expected /= (k as f64).sqrt();
        assert_close(
            &format!("categorical draw {draw}"),
            rows.slice(s![draw..=draw, ..]),
            expected.view().insert_axis(ndarray::Axis(0)),
            1e-15,
        );
    }

    let data = seeded_data(&mlp, 9, Likelihood::Gaussian, 53);
    let rows = reference::output_rows(
        logits.view(),
        &data,
        5,
        Likelihood::Gaussian,
        Variant::MonteCarlo { samples: k, seed },
    )
    .unwrap();
    for draw in 0..k {
        for j in 0..4 {
            let u1 = f64::from(mc_uniform(seed, 5, draw as u32, 2 * j));
            let u2 = f64::from(mc_uniform(seed, 5, draw as u32, 2 * j + 1));
            let epsilon = (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let expected = epsilon / (k as f64).sqrt();
            assert!((rows[[draw, j as usize]] - expected).abs() <= 1e-15, "Gaussian draw {draw}, output {j}");
        }
    }
}

#[test]
fn true_rows_factor_the_output_covariance() {
    let mlp = seeded_mlp(&[2, 5], &[], true, 61);
    let data = seeded_data(&mlp, 1, Likelihood::Categorical, 62);
    let logits = Array1::from(vec![1.0, -0.5, 0.25, 3.0, 0.0]);
    let rows =
        reference::output_rows(logits.view(), &data, 0, Likelihood::Categorical, Variant::True).unwrap();
    let e = logits.mapv(f64::exp);
    let p = &e / e.sum();
    let mut covariance = Array2::from_diag(&p);
    for a in 0..5 {
        for b in 0..5 {
            covariance[[a, b]] -= p[a] * p[b];
        }
    }
    assert_close("Σ_c s_c s_cᵀ = diag(p) − ppᵀ", rows.t().dot(&rows).view(), covariance.view(), 1e-15);
}

/// Every form of one (model, data, variant) agrees with `full` where it should.
fn check_form_identities(mlp: &Mlp, data: &Dataset, likelihood: Likelihood, variant: Variant, what: &str) {
    let run = |form| reference::fisher(mlp, data, likelihood, variant, form).unwrap();
    let f = full(run(NetForm::Full));
    let p_count = mlp.num_params();
    assert_eq!(f.dim(), (p_count, p_count));
    assert_eq!(f, f.t(), "{what}: full is not exactly symmetric");

    let NetFisher::Diagonal(diag) = run(NetForm::Diagonal) else { panic!() };
    assert_close(
        &format!("{what}: diag"),
        diag.view().insert_axis(ndarray::Axis(0)),
        f.diag().insert_axis(ndarray::Axis(0)),
        1e-13,
    );

    let NetFisher::Layer(blocks) = run(NetForm::Layer) else { panic!() };
    assert_eq!(blocks.len(), mlp.layers.len());
    for (l, (block, (start, len))) in blocks.iter().zip(mlp.param_ranges()).enumerate() {
        assert_close(
            &format!("{what}: layer {l} block"),
            block.view(),
            f.slice(s![start..start + len, start..start + len]),
            1e-13,
        );
    }

    let NetFisher::Norms(norms) = run(NetForm::Norms) else { panic!() };
    assert_eq!(norms.len(), data.len());
    let trace = f.diag().sum();
    assert!((norms.mean().unwrap() - trace).abs() <= 1e-13 * trace, "{what}: mean(norms) ≠ tr F");

    let NetFisher::Grads(grads) = run(NetForm::Grads) else { panic!() };
    let r = fisher_engine::fisher::rows_per_sample(variant, mlp.output_dim());
    assert_eq!(grads.dim(), (data.len() * r, p_count));
    let gram = grads.t().dot(&grads) / data.len() as f64;
    assert_close(&format!("{what}: GᵀG/N"), gram.view(), f.view(), 1e-13);
    for i in 0..data.len() {
        let own = grads.slice(s![i * r..(i + 1) * r, ..]).mapv(|v| v * v).sum();
        assert!((own - norms[i]).abs() <= 1e-13 * own.max(1e-300), "{what}: norm of sample {i}");
    }

    let NetFisher::Kfac(factors) = run(NetForm::Kfac) else { panic!() };
    let theta = theta_f64(mlp);
    for (l, (layer, factor)) in mlp.layers.iter().zip(&factors).enumerate() {
        assert_eq!(factor.a.dim(), (layer.augmented_in(), layer.augmented_in()), "{what}: A of layer {l}");
        assert_eq!(factor.g.dim(), (layer.fan_out(), layer.fan_out()), "{what}: G of layer {l}");
        // A from the layer inputs, computed here from the pre-activations.
        let mut a = Array2::<f64>::zeros(factor.a.dim());
        for i in 0..data.len() {
            let input: Array1<f64> = if l == 0 {
                data.inputs.row(i).mapv(f64::from)
            } else {
                let pre = reference::pre_activations_at(mlp, theta.view(), data.inputs.row(i)).unwrap();
                pre[l - 1].mapv(|z| mlp.activations[l - 1].apply_f64(z))
            };
            let mut augmented = Array1::<f64>::ones(layer.augmented_in());
            augmented.slice_mut(s![..layer.fan_in()]).assign(&input);
            for x in 0..augmented.len() {
                for y in 0..augmented.len() {
                    a[[x, y]] += augmented[x] * augmented[y] / data.len() as f64;
                }
            }
        }
        assert_close(&format!("{what}: A of layer {l}"), factor.a.view(), a.view(), 1e-13);
        // The bias block of the exact layer block is G itself (∂/∂b = δ).
        if layer.bias.is_some() {
            let w = layer.weight.len();
            let bias_block = blocks[l].slice(s![w.., w..]);
            assert_close(
                &format!("{what}: G of layer {l} vs bias block"),
                factor.g.view(),
                bias_block,
                1e-13,
            );
        }
        let expanded = kfac_expand(factor, layer.bias.is_some()).unwrap();
        assert_eq!(expanded.dim(), blocks[l].dim(), "{what}: expanded KFAC block {l}");
    }
}

#[test]
fn forms_agree_with_full() {
    for (likelihood, bias) in
        [(Likelihood::Categorical, true), (Likelihood::Gaussian, false), (Likelihood::Gaussian, true)]
    {
        let mlp = seeded_mlp(&[4, 5, 3, 3], &[Activation::Tanh, Activation::Relu], bias, 71);
        let data = seeded_data(&mlp, 7, likelihood, 72);
        for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 5 }] {
            check_form_identities(
                &mlp,
                &data,
                likelihood,
                variant,
                &format!("{likelihood:?} {variant:?} bias={bias}"),
            );
        }
    }
}

#[test]
fn true_gaussian_g_of_the_last_layer_is_identity() {
    let mlp = seeded_mlp(&[3, 4, 2], &[Activation::Sigmoid], true, 75);
    let data = seeded_data(&mlp, 5, Likelihood::Gaussian, 76);
    let NetFisher::Kfac(factors) =
        reference::fisher(&mlp, &data, Likelihood::Gaussian, Variant::True, NetForm::Kfac).unwrap()
    else {
        panic!()
    };
    assert_close("G_L", factors[1].g.view(), Array2::<f64>::eye(2).view(), 1e-15);
    assert_eq!(factors[0].a[[3, 3]], 1.0, "the trailing 1 of ã");
}

#[test]
fn kfac_expansion_is_exact_for_one_sample_and_one_row() {
    for bias in [true, false] {
        let mlp = seeded_mlp(&[3, 4, 3, 2], &[Activation::Gelu, Activation::Tanh], bias, 81);
        for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
            let data = seeded_data(&mlp, 1, likelihood, 82);
            let run = |form| reference::fisher(&mlp, &data, likelihood, Variant::Empirical, form).unwrap();
            let (NetFisher::Kfac(factors), NetFisher::Layer(blocks)) =
                (run(NetForm::Kfac), run(NetForm::Layer))
            else {
                panic!()
            };
            for (l, (factor, block)) in factors.iter().zip(&blocks).enumerate() {
                let expanded = kfac_expand(factor, bias).unwrap();
                assert_close(
                    &format!("layer {l}, bias={bias}, {likelihood:?}"),
                    expanded.view(),
                    block.view(),
                    1e-13,
                );
            }
        }
    }
}

#[test]
fn kfac_expansion_is_exact_when_every_sample_has_the_same_input() {
    // A single layer sees the same ã for every sample, so E[δδᵀ ⊗ ããᵀ] = E[δδᵀ] ⊗ ããᵀ exactly,
    // for many samples and several output rows (true: R = C).
    for bias in [true, false] {
        let mlp = seeded_mlp(&[3, 4], &[], bias, 85);
        let mut data = seeded_data(&mlp, 6, Likelihood::Categorical, 86);
        let first = data.inputs.row(0).to_owned();
        for mut row in data.inputs.rows_mut() {
            row.assign(&first);
        }
        let run =
            |form| reference::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, form).unwrap();
        let (NetFisher::Kfac(factors), NetFisher::Layer(blocks)) = (run(NetForm::Kfac), run(NetForm::Layer))
        else {
            panic!()
        };
        let expanded = kfac_expand(&factors[0], bias).unwrap();
        assert_close(&format!("bias={bias}"), expanded.view(), blocks[0].view(), 1e-13);
    }
}

#[test]
fn kfac_expansion_layout() {
    // G ⊗ A with distinct entries, so that any misplaced entry shows.
    let (fan_in, fan_out) = (2, 3);
    for bias in [true, false] {
        let aug = fan_in + bias as usize;
        let factors = KfacFactors {
            a: Array2::from_shape_fn((aug, aug), |(i, j)| (1 + i * aug + j) as f64),
            g: Array2::from_shape_fn((fan_out, fan_out), |(o, q)| (100 * (1 + o * fan_out + q)) as f64),
        };
        let expanded = kfac_expand(&factors, bias).unwrap();
        let size = fan_out * aug;
        assert_eq!(expanded.dim(), (size, size));
        let index = |o: usize, i: usize| if i < fan_in { o * fan_in + i } else { fan_in * fan_out + o };
        for o in 0..fan_out {
            for i in 0..aug {
                for q in 0..fan_out {
                    for j in 0..aug {
                        assert_eq!(
                            expanded[[index(o, i), index(q, j)]],
                            factors.g[[o, q]] * factors.a[[i, j]]
                        );
                    }
                }
            }
        }
        let mut perm = augmented_to_pytorch(fan_in, fan_out, bias);
        if !bias {
            assert_eq!(perm, (0..size).collect::<Vec<_>>(), "no bias: identity permutation");
        }
        perm.sort_unstable();
        assert_eq!(perm, (0..size).collect::<Vec<_>>(), "a permutation");
        // f32 too.
        let single = KfacFactors { a: factors.a.mapv(|v| v as f32), g: factors.g.mapv(|v| v as f32) };
        assert_eq!(kfac_expand(&single, bias).unwrap(), expanded.mapv(|v| v as f32));
    }
    let bad = KfacFactors { a: Array2::<f64>::zeros((2, 3)), g: Array2::zeros((1, 1)) };
    assert!(kfac_expand(&bad, true).is_err());
}

#[test]
fn reference_refuses_bad_requests() {
    let mlp = seeded_mlp(&[3, 4, 3], &[Activation::Tanh], true, 91);
    let mut data = seeded_data(&mlp, 4, Likelihood::Categorical, 92);
    let zero_draws = Variant::MonteCarlo { samples: 0, seed: 1 };
    assert!(reference::fisher(&mlp, &data, Likelihood::Categorical, zero_draws, NetForm::Full).is_err());
    // Class labels with the Gaussian likelihood.
    assert!(
        reference::fisher(&mlp, &data, Likelihood::Gaussian, Variant::Empirical, NetForm::Diagonal).is_err()
    );
    data.targets = Targets::Classes(vec![0, 1, 3, 2]);
    let error =
        reference::fisher(&mlp, &data, Likelihood::Categorical, Variant::Empirical, NetForm::Diagonal)
            .unwrap_err()
            .to_string();
    assert!(error.contains("label 3 at row 2"), "{error}");
    assert!(reference::log_likelihood(&mlp, &data, 9, Likelihood::Categorical).is_err());
    assert!(reference::pre_activations_at(&mlp, Array1::zeros(3).view(), data.inputs.row(0)).is_err());
}

#[test]
fn log_likelihood_matches_closed_forms() {
    // One layer with zero weights: z = b.
    let mlp = Mlp::new(
        vec![Linear {
            index: 0,
            weight: Array2::zeros((3, 2)),
            bias: Some(Array1::from(vec![0.5, -1.0, 2.0])),
        }],
        vec![],
    )
    .unwrap();
    let inputs = Array2::from_elem((1, 2), 1.0f32);
    let data = Dataset { inputs: inputs.clone(), targets: Targets::Classes(vec![2]) };
    let log_sum: f64 = [0.5f64, -1.0, 2.0].iter().map(|v| v.exp()).sum::<f64>().ln();
    let value = reference::log_likelihood(&mlp, &data, 0, Likelihood::Categorical).unwrap();
    assert!((value - (2.0 - log_sum)).abs() < 1e-15);
    let data = Dataset {
        inputs,
        targets: Targets::Values(Array2::from_shape_vec((1, 3), vec![0.5, 0.0, 0.0]).unwrap()),
    };
    let value = reference::log_likelihood(&mlp, &data, 0, Likelihood::Gaussian).unwrap();
    let expected = -0.5 * (1.0 + 4.0) - 1.5 * (2.0 * std::f64::consts::PI).ln();
    assert!((value - expected).abs() < 1e-14);
}
