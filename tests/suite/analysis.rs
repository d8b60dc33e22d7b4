//! The analysis module against independent f64 references: eigenvalues from the cyclic
//! Jacobi solver of the test harness (`common::verify`, not faer), log-determinants and solves from this file's own
//! Cholesky, every other measure from brute-force formulas over the dense matrix.

use fisher_engine::analysis::{
    self, conjugate_gradient, coupling_implicit, lanczos_top_k, measures_exact, measures_implicit, slq, CgOptions,
    DenseOperator, ExplicitFisher, FactorOperator, FisherOperator, FnOperator, KfacOperator, LanczosOptions,
    LayerShape, MeasureOptions, ParameterLayout, SlqOptions, SpectralDensity, Spectrum,
};
use fisher_engine::reference::grads as reference;
use fisher_engine::fisher::{kfac_expand, KfacFactors, NetFisher};
use fisher_engine::synthetic::{gradient_like, normal_matrix, SplitMix64};
use fisher_engine::{Engine, FisherError, FisherMatrix, Form};
use ndarray::{array, s, Array1, Array2};

use crate::common::verify::symmetric_eigenvalues;
use crate::common::{close, MEASURE_KEYS};

// ---------------------------------------------------------------------------------------
// Independent references
// ---------------------------------------------------------------------------------------

/// F = GᵀG/N in f64 from seeded gradient-like rows (the crate's f64 reference reduction).
fn fisher_f64(n: usize, p: usize, seed: u64) -> Array2<f64> {
    let grads = gradient_like(n, p, seed);
    match reference::reduce(grads.view(), &Form::Full).unwrap() {
        FisherMatrix::Full(f) => f,
        _ => unreachable!(),
    }
}

/// Jacobi eigenvalues, descending.
fn jacobi_desc(m: &Array2<f64>) -> Vec<f64> {
    let mut v = symmetric_eigenvalues(m);
    v.reverse();
    v
}

/// Plain Cholesky (lower), panicking if not positive definite: the test's own oracle.
fn cholesky(a: &Array2<f64>) -> Array2<f64> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let d = a[[j, j]] - (0..j).map(|k| l[[j, k]].powi(2)).sum::<f64>();
        assert!(d > 0.0, "reference Cholesky: not positive definite at {j}");
        l[[j, j]] = d.sqrt();
        for i in j + 1..n {
            l[[i, j]] = (a[[i, j]] - (0..j).map(|k| l[[i, k]] * l[[j, k]]).sum::<f64>()) / l[[j, j]];
        }
    }
    l
}

fn shifted(a: &Array2<f64>, shift: f64) -> Array2<f64> {
    a + &(Array2::<f64>::eye(a.nrows()) * shift)
}

/// log det(A + shift·I) = 2 Σ log Lᵢᵢ.
fn ref_logdet(a: &Array2<f64>, shift: f64) -> f64 {
    2.0 * cholesky(&shifted(a, shift)).diag().iter().map(|v| v.ln()).sum::<f64>()
}

/// (A + shift·I)⁻¹ b by Cholesky.
fn ref_solve(a: &Array2<f64>, shift: f64, b: &[f64]) -> Vec<f64> {
    let l = cholesky(&shifted(a, shift));
    let n = b.len();
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[[i, k]] * y[k]).sum::<f64>()) / l[[i, i]];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[[k, i]] * x[k]).sum::<f64>()) / l[[i, i]];
    }
    x
}

fn matvec(a: &Array2<f64>, v: &[f64]) -> Vec<f64> {
    a.dot(&Array1::from(v.to_vec())).to_vec()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// A random symmetric PSD matrix B Bᵀ/k + shift·I (k columns).
fn random_psd(n: usize, k: usize, shift: f64, seed: u64) -> Array2<f64> {
    let b = normal_matrix(n, k, seed).mapv(f64::from);
    b.dot(&b.t()) / k as f64 + Array2::<f64>::eye(n) * shift
}

fn dense_of(op: &impl FisherOperator) -> Array2<f64> {
    let n = op.dim();
    let mut m = Array2::zeros((n, n));
    for j in 0..n {
        let mut e = vec![0.0; n];
        e[j] = 1.0;
        for (i, v) in op.apply(&e).unwrap().into_iter().enumerate() {
            m[[i, j]] = v;
        }
    }
    m
}

/// Brute-force coupling from the dense matrix, with the unit ownership written out here.
fn ref_coupling(f: &Array2<f64>, shapes: &[LayerShape]) -> (f64, Vec<f64>) {
    let total: f64 = f.iter().map(|v| v * v).sum();
    let mut start = 0;
    let mut inside = 0.0;
    let mut units = Vec::new();
    for sh in shapes {
        let len = sh.fan_out * sh.fan_in + if sh.has_bias { sh.fan_out } else { 0 };
        let owner =
            |rel: usize| if rel < sh.fan_out * sh.fan_in { rel / sh.fan_in } else { rel - sh.fan_out * sh.fan_in };
        let (mut layer, mut same_unit) = (0.0, 0.0);
        for i in 0..len {
            for j in 0..len {
                let v = f[[start + i, start + j]].powi(2);
                layer += v;
                if owner(i) == owner(j) {
                    same_unit += v;
                }
            }
        }
        inside += layer;
        units.push(1.0 - same_unit / layer);
        start += len;
    }
    (1.0 - inside / total, units)
}

// ---------------------------------------------------------------------------------------
// Hand-checkable
// ---------------------------------------------------------------------------------------

#[test]
fn two_by_two_by_hand() {
    // F = [[2, 1], [1, 2]]: eigenvalues 3 and 1, eigenvectors (1, ±1)/√2.
    let f = ExplicitFisher::from_matrix(&FisherMatrix::Full(array![[2.0f32, 1.0], [1.0, 2.0]])).unwrap();
    assert_eq!(f.eigenvalues().unwrap(), vec![3.0, 1.0]);
    close(f.logdet(0.5).unwrap(), 3.5f64.ln() + 1.5f64.ln(), 1e-14, "logdet");
    let theta = [1.0, 0.0];
    let layout = ParameterLayout::from_ranges(vec![(0, 1), (1, 1)], 2).unwrap();
    let m = measures_exact(
        &f,
        &MeasureOptions {
            alpha: 1.0,
            damping: 0.0,
            top: 5,
            samples: Some(100),
            theta: Some(&theta),
            layout: Some(&layout),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.trace, 4.0);
    close(m.frobenius, 10f64.sqrt(), 1e-15, "frobenius");
    assert_eq!(m.top_eigenvalues, vec![3.0, 1.0]);
    close(m.logdet, 3f64.ln(), 1e-14, "logdet at λ = 0");
    close(m.effective_dimension, 3.0 / 4.0 + 1.0 / 2.0, 1e-15, "d_eff(1)");
    close(m.condition_number.unwrap(), 3.0, 1e-14, "condition number");
    close(m.stable_rank, 10.0 / 9.0, 1e-14, "stable rank");
    close(m.spectral_entropy, -(0.75 * 0.75f64.ln() + 0.25 * 0.25f64.ln()), 1e-14, "entropy");
    // κ = 100/(2π ln 100); F̂ = 2F/4 has eigenvalues 1.5, 0.5.
    let kappa = 100.0 / (2.0 * std::f64::consts::PI * 100f64.ln());
    let abbas = ((1.0 + 1.5 * kappa) * (1.0 + 0.5 * kappa)).ln() / kappa.ln();
    close(m.abbas_effective_dimension.unwrap(), abbas, 1e-14, "Abbas d_n");
    assert_eq!(m.fisher_rao_norm_squared, Some(2.0));
    close(m.fisher_rao_norm.unwrap(), 2f64.sqrt(), 1e-15, "Fisher-Rao norm");
    // ‖F‖² = 10, diagonal blocks 4 + 4.
    close(m.inter_layer_coupling.unwrap(), 0.2, 1e-15, "inter-layer coupling");
    // (F + I) x = (1, 0): [[3, 1], [1, 3]]⁻¹ e₁ = (3, −1)/8.
    let sol = f.solve_damped(&[1.0, 0.0], 1.0).unwrap();
    close(sol.x[0], 3.0 / 8.0, 1e-15, "x₀");
    close(sol.x[1], -1.0 / 8.0, 1e-15, "x₁");
    assert!(sol.residual < 1e-15);
}

#[test]
fn singular_at_zero_damping_is_infinite_and_serializes_as_null() {
    // rank 1: eigenvalues 2, 0.
    let f = ExplicitFisher::from_matrix(&FisherMatrix::Full(array![[1.0f32, 1.0], [1.0, 1.0]])).unwrap();
    let m = measures_exact(&f, &MeasureOptions { damping: 0.0, ..Default::default() }).unwrap();
    assert_eq!(m.condition_number, Some(f64::INFINITY));
    assert_eq!(m.logdet, f64::NEG_INFINITY);
    let json = serde_json::to_value(&m).unwrap();
    assert!(json["condition_number"].is_null() && json["logdet"].is_null(), "{json}");
    // With damping both are finite: cond = (2 + λ)/λ.
    let m = measures_exact(&f, &MeasureOptions { damping: 0.5, ..Default::default() }).unwrap();
    close(m.condition_number.unwrap(), 5.0, 1e-14, "damped condition number");
    close(m.logdet, 2.5f64.ln() + 0.5f64.ln(), 1e-14, "damped logdet");
    // The Cholesky solve refuses the singular undamped system.
    assert!(matches!(f.solve_damped(&[1.0, 0.0], 0.0), Err(FisherError::InvalidInput(_))));
}

#[test]
fn abbas_limits() {
    // F̂ = P·F/tr F is scale-free, and d_n → rank as n → ∞ (slowly: log(κλ)/log κ).
    let s = Spectrum::new(vec![5.0, 1.0, 0.0], 3, 0.0).unwrap();
    let scaled = Spectrum::new(vec![500.0, 100.0, 0.0], 3, 0.0).unwrap();
    let d = analysis::abbas_effective_dimension(&s, 1000).unwrap();
    close(d, analysis::abbas_effective_dimension(&scaled, 1000).unwrap(), 1e-14, "scale invariance");
    let d_big = analysis::abbas_effective_dimension(&s, 1usize << 60).unwrap();
    assert!((d_big - 2.0).abs() < (d - 2.0).abs() && (d_big - 2.0).abs() < 0.1, "d_n = {d}, d_∞ ≈ {d_big}");
    assert!(analysis::abbas_effective_dimension(&s, 18).is_err(), "κ_18 < 1 must be refused");
    assert!(analysis::abbas_effective_dimension(&s, 19).is_ok());
}

// ---------------------------------------------------------------------------------------
// Exact spectra and measures of every stored form
// ---------------------------------------------------------------------------------------

#[test]
fn full_spectrum_and_measures_against_jacobi_and_brute_force() {
    // N < P (singular) and N > P (regular), with awkward sizes.
    for &(n, p, seed) in &[(23usize, 37usize, 1u64), (61, 29, 2)] {
        let f = fisher_f64(n, p, seed);
        let fisher = ExplicitFisher::from_matrix(&FisherMatrix::Full(f.clone())).unwrap();
        let eig = fisher.eigenvalues().unwrap();
        let jac = jacobi_desc(&f);
        assert!(max_rel(&eig, &jac) < 1e-13, "faer vs Jacobi: {:e}", max_rel(&eig, &jac));

        let theta: Vec<f64> = (0..p).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        // Layers that cover the P parameters exactly, for the coupling below.
        let shapes = match p {
            37 => [
                LayerShape { fan_in: 3, fan_out: 4, has_bias: true },
                LayerShape { fan_in: 4, fan_out: 3, has_bias: false },
                LayerShape { fan_in: 3, fan_out: 3, has_bias: false },
            ],
            29 => [
                LayerShape { fan_in: 3, fan_out: 4, has_bias: true },
                LayerShape { fan_in: 4, fan_out: 2, has_bias: true },
                LayerShape { fan_in: 2, fan_out: 1, has_bias: true },
            ],
            _ => unreachable!(),
        };
        assert_eq!(shapes.iter().map(LayerShape::num_params).sum::<usize>(), p);
        let (alpha, damping, samples) = (0.05, 1e-3, 1000);
        let m = measures_exact(
            &fisher,
            &MeasureOptions {
                alpha,
                damping,
                top: 7,
                samples: Some(samples),
                theta: Some(&theta),
                ..Default::default()
            },
        )
        .unwrap();
        let lam: Vec<f64> = jac.iter().map(|v| v.max(0.0)).collect();
        let tr: f64 = (0..p).map(|i| f[[i, i]]).sum();
        let fro2: f64 = f.iter().map(|v| v * v).sum();
        close(m.trace, tr, 1e-14, "trace");
        close(m.frobenius, fro2.sqrt(), 1e-14, "frobenius");
        assert!(max_rel(&m.top_eigenvalues, &lam[..7]) < 1e-12);
        close(m.logdet, ref_logdet(&f, damping), 1e-11, "logdet vs Cholesky");
        close(m.effective_dimension, lam.iter().map(|l| l / (l + alpha)).sum(), 1e-11, "d_eff");
        let kappa = samples as f64 / (2.0 * std::f64::consts::PI * (samples as f64).ln());
        let f_hat = f.mapv(|v| v * kappa * p as f64 / tr);
        close(m.abbas_effective_dimension.unwrap(), ref_logdet(&f_hat, 1.0) / kappa.ln(), 1e-11, "Abbas d_n");
        let ft = matvec(&f, &theta);
        close(m.fisher_rao_norm_squared.unwrap(), theta.iter().zip(&ft).map(|(a, b)| a * b).sum(), 1e-13, "θᵀFθ");
        close(m.stable_rank, fro2 / (lam[0] * lam[0]), 1e-12, "stable rank");
        let entropy: f64 = -lam.iter().filter(|&&l| l > 1e-12 * lam[0]).map(|l| (l / tr) * (l / tr).ln()).sum::<f64>();
        close(m.spectral_entropy, entropy, 1e-9, "spectral entropy");
        let cond_ref = (lam[0] + damping) / (if n < p { 0.0 } else { lam[p - 1] } + damping);
        close(m.condition_number.unwrap(), cond_ref, 1e-8, "condition number");

        // Coupling on the layer structure. Inter-layer coupling is 1 − (in-block mass)/(total),
        // here ≈ 4·10⁻³: rounding of order ε relative to 1 is 250ε relative to the value.
        let layout = ParameterLayout::from_shapes(&shapes).unwrap();
        let c = fisher.coupling(&layout).unwrap();
        let (inter, units) = ref_coupling(&f, &shapes);
        close(c.inter_layer.unwrap(), inter, 1e-11, "inter-layer");
        assert_eq!(c.inter_unit.len(), shapes.len());
        for (got, want) in c.inter_unit.iter().zip(&units) {
            close(got.unwrap(), *want, 1e-13, "inter-unit");
        }
    }
}

#[test]
fn coupling_full_against_brute_force_and_zero_for_block_diagonal() {
    let shapes = [
        LayerShape { fan_in: 3, fan_out: 4, has_bias: true },
        LayerShape { fan_in: 4, fan_out: 2, has_bias: false },
        LayerShape { fan_in: 2, fan_out: 1, has_bias: true },
    ];
    let layout = ParameterLayout::from_shapes(&shapes).unwrap();
    let p = layout.dim();
    assert_eq!(p, 16 + 8 + 3);
    // Few samples of unscaled gradients: a low-rank F whose entries are all of one size,
    // strongly coupled.
    let f = match reference::reduce(normal_matrix(3, p, 9).view(), &Form::Full).unwrap() {
        FisherMatrix::Full(f) => f,
        _ => unreachable!(),
    };
    let fisher = ExplicitFisher::from_matrix(&FisherMatrix::Full(f.clone())).unwrap();
    let c = fisher.coupling(&layout).unwrap();
    let (inter, units) = ref_coupling(&f, &shapes);
    assert!(inter > 0.3, "a generic F couples its layers ({inter})");
    close(c.inter_layer.unwrap(), inter, 1e-13, "inter-layer");
    assert_eq!(c.inter_unit.len(), 3);
    for ((got, want), shape) in c.inter_unit.iter().zip(&units).zip(&shapes) {
        // A single unit owns its whole layer: nothing can lie outside its block.
        if shape.fan_out == 1 {
            assert_eq!((*got, *want), (Some(0.0), 0.0));
        } else {
            assert!(*want > 0.1);
            close(got.unwrap(), *want, 1e-13, "inter-unit");
        }
    }

    // Zero the off-diagonal layer blocks: inter-layer coupling 0, inter-unit unchanged.
    let mut block = f.clone();
    for (i, &(si, li)) in layout.ranges().iter().enumerate() {
        for (j, &(sj, lj)) in layout.ranges().iter().enumerate() {
            if i != j {
                block.slice_mut(s![si..si + li, sj..sj + lj]).fill(0.0);
            }
        }
    }
    let fb = ExplicitFisher::from_matrix(&FisherMatrix::Full(block.clone())).unwrap();
    let cb = fb.coupling(&layout).unwrap();
    assert_eq!(cb.inter_layer, Some(0.0));
    assert_eq!(cb.inter_unit, c.inter_unit);

    // Layer blocks: inter-unit the same, inter-layer not visible.
    let blocks: Vec<Array2<f64>> =
        layout.ranges().iter().map(|&(st, l)| f.slice(s![st..st + l, st..st + l]).to_owned()).collect();
    let layer = ExplicitFisher::from_net(&NetFisher::Layer(blocks), Some(&layout)).unwrap();
    let cl = layer.coupling(&layout).unwrap();
    assert_eq!(cl.inter_layer, None);
    for (a, b) in cl.inter_unit.iter().zip(&c.inter_unit) {
        close(a.unwrap(), b.unwrap(), 1e-14, "inter-unit from blocks");
    }
    // The layer form's spectrum is the union of the blocks' (Jacobi on the dense block-diagonal).
    assert!(max_rel(&layer.eigenvalues().unwrap(), &jacobi_desc(&block)) < 1e-13);
    close(layer.logdet(1e-2).unwrap(), ref_logdet(&block, 1e-2), 1e-12, "layer logdet");

    // Hutchinson estimate for an implicit F: within 3 standard errors, and exactly 0 for the
    // block-diagonal F (every probe's mass stays in its own block).
    let dense = DenseOperator::new(&f).unwrap();
    let est = coupling_implicit(&dense, &layout, 64, 3).unwrap();
    let (value, se) = (est.inter_layer.unwrap(), est.inter_layer_std_error.unwrap());
    assert!((value - inter).abs() <= 3.0 * se, "Hutchinson {value} ± {se} vs exact {inter}");
    let est0 = coupling_implicit(&DenseOperator::new(&block).unwrap(), &layout, 4, 3).unwrap();
    assert!(est0.inter_layer.unwrap() < 1e-15);
}

#[test]
fn diagonal_form() {
    let d = Array1::from(vec![3.0f32, 0.5, 2.0, 0.0, 1.0]);
    let f = ExplicitFisher::from_matrix(&FisherMatrix::Diagonal(d.clone())).unwrap();
    assert_eq!(f.eigenvalues().unwrap(), vec![3.0, 2.0, 1.0, 0.5, 0.0]);
    close(f.logdet(0.25).unwrap(), [3.25f64, 0.75, 2.25, 0.25, 1.25].iter().map(|v| v.ln()).sum(), 1e-15, "logdet");
    let b = [1.0, 2.0, 3.0, 4.0, 5.0];
    let sol = f.solve_damped(&b, 0.25).unwrap();
    let want: Vec<f64> = b.iter().zip(d.iter()).map(|(b, &d)| b / (f64::from(d) + 0.25)).collect();
    assert!(max_rel(&sol.x, &want) < 1e-15 && sol.relative_residual < 1e-15);
    assert!(f.solve_damped(&b, 0.0).is_err(), "a zero diagonal entry cannot be inverted undamped");
    let c = f.coupling(&ParameterLayout::from_ranges(vec![(0, 2), (2, 3)], 5).unwrap()).unwrap();
    assert_eq!((c.inter_layer, c.inter_unit.len()), (None, 0));
}

/// Random KFAC factors (PSD) for a layer of `shape`.
fn kfac_factors(shape: LayerShape, seed: u64) -> KfacFactors<f64> {
    let a = shape.augmented_in();
    KfacFactors { a: random_psd(a, a + 1, 0.0, seed), g: random_psd(shape.fan_out, 2, 1e-3, seed + 100) }
}

#[test]
fn kfac_apply_spectrum_logdet_solve_and_coupling_against_the_expansion() {
    let shapes = [
        LayerShape { fan_in: 4, fan_out: 3, has_bias: true },
        LayerShape { fan_in: 3, fan_out: 5, has_bias: false },
        LayerShape { fan_in: 5, fan_out: 2, has_bias: true },
    ];
    let layout = ParameterLayout::from_shapes(&shapes).unwrap();
    let factors: Vec<KfacFactors<f64>> =
        shapes.iter().enumerate().map(|(l, &s)| kfac_factors(s, l as u64 + 1)).collect();
    let kfac = ExplicitFisher::from_net(&NetFisher::Kfac(factors.clone()), Some(&layout)).unwrap();
    let p = layout.dim();
    assert_eq!(kfac.dim(), p);

    // The dense block-diagonal of kfac_expand blocks (PyTorch order).
    let mut dense = Array2::<f64>::zeros((p, p));
    for ((s0, len), (f, sh)) in layout.ranges().iter().zip(factors.iter().zip(&shapes)) {
        dense.slice_mut(s![*s0..s0 + len, *s0..s0 + len]).assign(&kfac_expand(f, sh.has_bias).unwrap());
    }
    // apply = kfac_expand · v, and the operator's dense matrix is the expansion.
    let mut rng = SplitMix64::new(5);
    let v: Vec<f64> = (0..p).map(|_| rng.normal()).collect();
    assert!(max_rel(&kfac.apply(&v).unwrap(), &matvec(&dense, &v)) < 1e-14);
    assert!(max_rel(dense_of(&kfac).as_slice().unwrap(), dense.as_slice().unwrap()) < 1e-14);
    // tr and ‖·‖_F from the factors.
    close(kfac.trace().unwrap(), dense.diag().sum(), 1e-14, "KFAC trace");
    close(kfac.frobenius_squared(), dense.iter().map(|v| v * v).sum(), 1e-13, "KFAC ‖F‖²");

    // Eigenvalues from the factors = Jacobi eigenvalues of the expansion.
    let eig = kfac.eigenvalues().unwrap();
    let jac = jacobi_desc(&dense);
    assert!(max_rel(&eig, &jac) < 1e-12, "KFAC spectrum: {:e}", max_rel(&eig, &jac));
    close(kfac.logdet(1e-2).unwrap(), ref_logdet(&dense, 1e-2), 1e-12, "KFAC logdet");

    // Solve via the factor eigenbases = dense Cholesky solve.
    let sol = kfac.solve_damped(&v, 1e-2).unwrap();
    let want = ref_solve(&dense, 1e-2, &v);
    assert!(max_rel(&sol.x, &want) < 1e-10, "KFAC solve: {:e}", max_rel(&sol.x, &want));
    assert!(sol.relative_residual < 1e-12, "KFAC solve residual {:e}", sol.relative_residual);

    // Inter-unit coupling from G alone = brute force on the expansion.
    let c = kfac.coupling(&layout).unwrap();
    let (_, units) = ref_coupling(&dense, &shapes);
    assert_eq!(c.inter_layer, None);
    for (got, want) in c.inter_unit.iter().zip(&units) {
        close(got.unwrap(), *want, 1e-12, "KFAC inter-unit");
    }

    // f32 factors through KfacOperator directly; and bad shapes are refused.
    let f32_factors: Vec<KfacFactors<f32>> =
        factors.iter().map(|f| KfacFactors { a: f.a.mapv(|v| v as f32), g: f.g.mapv(|v| v as f32) }).collect();
    assert!(KfacOperator::new(&f32_factors, &shapes).is_ok());
    let wrong = [shapes[1], shapes[0], shapes[2]];
    assert!(matches!(KfacOperator::new(&f32_factors, &wrong), Err(FisherError::InvalidInput(_))));
    assert!(ExplicitFisher::from_net(&NetFisher::Kfac(factors), None).is_err(), "KFAC needs the shapes");
}

#[test]
fn gram_and_full_share_the_nonzero_spectrum_and_the_measures() {
    for &(n, p) in &[(17usize, 41usize), (45, 19)] {
        let grads = gradient_like(n, p, 4);
        let full = reference::reduce(grads.view(), &Form::Full).unwrap();
        let gram = reference::reduce(grads.view(), &Form::Gram).unwrap();
        let ff = ExplicitFisher::from_matrix(&full).unwrap();
        let fg = ExplicitFisher::from_matrix(&gram).unwrap();
        let (ef, eg) = (ff.eigenvalues().unwrap(), fg.eigenvalues().unwrap());
        assert_eq!(analysis::eigenvalues(&full).unwrap(), ef);
        let r = n.min(p);
        assert!(max_rel(&ef[..r], &eg[..r]) < 1e-12, "non-zero spectra differ: {:e}", max_rel(&ef[..r], &eg[..r]));
        assert!(eg.len() == n && ef.len() == p);

        let options = MeasureOptions { alpha: 0.01, damping: 1e-3, top: 30, samples: Some(500), ..Default::default() };
        assert!(measures_exact(&fg, &options).is_err(), "Gram without P must be refused");
        let fg = fg.with_parameters(p);
        let (mf, mg) = (measures_exact(&ff, &options).unwrap(), measures_exact(&fg, &options).unwrap());
        assert_eq!(mg.parameters, p);
        assert_eq!(mg.top_eigenvalues.len(), 30.min(p));
        for (a, b, what) in [
            (mf.trace, mg.trace, "trace"),
            (mf.frobenius, mg.frobenius, "frobenius"),
            (mf.logdet, mg.logdet, "logdet"),
            (mf.effective_dimension, mg.effective_dimension, "d_eff"),
            (mf.abbas_effective_dimension.unwrap(), mg.abbas_effective_dimension.unwrap(), "Abbas"),
            (mf.stable_rank, mg.stable_rank, "stable rank"),
            (mf.spectral_entropy, mg.spectral_entropy, "entropy"),
            (mf.condition_number.unwrap(), mg.condition_number.unwrap(), "condition"),
        ] {
            close(b, a, 1e-9, what);
        }
        // The Gram solve lives in sample space.
        let b: Vec<f64> = (0..n).map(|i| i as f64 - 3.0).collect();
        let sol = fg.solve_damped(&b, 1e-2).unwrap();
        let k = match &gram {
            FisherMatrix::Gram(k) => k.clone(),
            _ => unreachable!(),
        };
        assert!(max_rel(&sol.x, &ref_solve(&k, 1e-2, &b)) < 1e-10);
    }
}

// ---------------------------------------------------------------------------------------
// Lanczos
// ---------------------------------------------------------------------------------------

/// The Done-when case: a 2,410-parameter Fisher (P of a 784-3-10 MLP with biases ≈ a small
/// model) from 2,000 synthetic per-sample gradients with power-law column scales, computed
/// by the engine's CPU path; Lanczos top-20 against faer's dense eigensolver.
#[test]
fn lanczos_top20_matches_dense_on_2410_parameters() {
    let (n, p) = (2000, 2410);
    let mut grads = normal_matrix(n, p, 2410);
    for (j, mut col) in grads.columns_mut().into_iter().enumerate() {
        let scale = (1.0 + j as f64).powf(-0.6) as f32;
        col.mapv_inplace(|v| v * scale);
    }
    let full = Engine::cpu().fisher_from_grads(grads.view(), &Form::Full).unwrap();
    let fisher = ExplicitFisher::from_matrix(&full).unwrap();
    let start = std::time::Instant::now();
    let exact = fisher.eigenvalues().unwrap();
    let dense_time = start.elapsed();
    let start = std::time::Instant::now();
    let result = lanczos_top_k(&fisher, &LanczosOptions::top(20)).unwrap();
    let lanczos_time = start.elapsed();
    assert!(result.converged, "not converged after {} F·v: residuals {:?}", result.iterations, result.residuals);
    let worst = result.values.iter().zip(&exact).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    println!(
        "2410-parameter Fisher, top-20: max relative error {worst:.2e}, {} F·v, {} restarts, Lanczos {:.2?}, dense {:.2?}",
        result.iterations, result.restarts, lanczos_time, dense_time
    );
    assert!(worst <= 1e-6, "Lanczos top-20 relative error {worst:e} > 1e-6");

    // The same through the square-root factor (no dense F): F = GᵀG/N applied as Gᵀ(Gv)/N.
    let factor = FactorOperator::new(grads, n).unwrap();
    let via_factor = lanczos_top_k(&factor, &LanczosOptions::top(20)).unwrap();
    let worst = via_factor.values.iter().zip(&exact).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    // The dense F was rounded to f32 once (relative 6e-8 per entry), the factor was not.
    assert!(worst <= 1e-6, "Lanczos top-20 via the factor: relative error {worst:e}");
}

#[test]
fn lanczos_restarts_breakdowns_and_vectors() {
    let f = fisher_f64(90, 120, 8);
    let jac = jacobi_desc(&f);
    let fisher = ExplicitFisher::from_matrix(&FisherMatrix::Full(f.clone())).unwrap();
    // A small basis forces many thick restarts.
    let options = LanczosOptions { max_basis: Some(12), vectors: true, max_iterations: 3000, ..LanczosOptions::top(6) };
    let r = lanczos_top_k(&fisher, &options).unwrap();
    assert!(r.converged && r.restarts > 0, "{r:?}");
    assert!(max_rel(&r.values, &jac[..6]) < 1e-9, "restarted Lanczos: {:e}", max_rel(&r.values, &jac[..6]));
    for (theta, x) in r.values.iter().zip(r.vectors.as_ref().unwrap()) {
        let fx = matvec(&f, x);
        let res: f64 = fx.iter().zip(x).map(|(a, b)| (a - theta * b).powi(2)).sum::<f64>().sqrt();
        assert!(res <= 1e-6 * theta, "Ritz vector residual {res:e} for θ = {theta:e}");
    }

    // Rank 4 (N = 4 < P): asking for 7 finds the 4 non-zero eigenvalues and zeros, across
    // the breakdown of the Krylov space.
    let low = fisher_f64(4, 50, 3);
    let r = lanczos_top_k(&DenseOperator::new(&low).unwrap(), &LanczosOptions::top(7)).unwrap();
    let jac = jacobi_desc(&low);
    assert!(max_rel(&r.values[..4], &jac[..4]) < 1e-10);
    assert!(r.values[4..].iter().all(|v| v.abs() < 1e-12 * jac[0]), "{:?}", r.values);

    // k ≥ P: the whole spectrum, exactly.
    let tiny = fisher_f64(10, 6, 1);
    let r = lanczos_top_k(&DenseOperator::new(&tiny).unwrap(), &LanczosOptions::top(10)).unwrap();
    assert_eq!(r.values.len(), 6);
    assert!(max_rel(&r.values, &jacobi_desc(&tiny)) < 1e-12);

    // Bad options.
    assert!(lanczos_top_k(&fisher, &LanczosOptions { max_basis: Some(7), ..LanczosOptions::top(6) }).is_err());
    assert!(lanczos_top_k(&fisher, &LanczosOptions::top(0)).is_err());
}

// ---------------------------------------------------------------------------------------
// Stochastic Lanczos quadrature
// ---------------------------------------------------------------------------------------

#[test]
fn slq_within_its_error_bar_and_the_bar_shrinks() {
    let (n, p) = (150, 260);
    let f = fisher_f64(n, p, 21);
    let fisher = ExplicitFisher::from_matrix(&FisherMatrix::Full(f.clone())).unwrap();
    let damping = 1e-3;
    let exact_logdet = ref_logdet(&f, damping);
    let lam: Vec<f64> = jacobi_desc(&f).into_iter().map(|v| v.max(0.0)).collect();
    let alpha = 1e-2;
    let exact_deff: f64 = lam.iter().map(|l| l / (l + alpha)).sum();
    let exact_fro2: f64 = f.iter().map(|v| v * v).sum();
    for seed in 0..4 {
        let q = slq(&fisher, &SlqOptions { probes: 24, steps: 40, seed, reorthogonalize: true }).unwrap();
        for (est, exact, what) in [
            (q.estimate(|x| (x + damping).ln()), exact_logdet, "logdet"),
            (q.estimate(|x| x / (x + alpha)), exact_deff, "d_eff"),
            (q.estimate(|x| x * x), exact_fro2, "‖F‖²_F"),
        ] {
            assert!(
                (est.value - exact).abs() <= 3.0 * est.std_error,
                "seed {seed}: SLQ {what} {} ± {} vs exact {exact}",
                est.value,
                est.std_error
            );
        }
        {
            let e = q.estimate(|x| (x + damping).ln());
            println!(
                "SLQ log det(F + 1e-3 I), P = {p}, seed {seed}, 24 probes × 40 steps: {:.4} ± {:.4} (exact {exact_logdet:.4}, error {:.2e} = {:.2} error bars)",
                e.value,
                e.std_error,
                e.value - exact_logdet,
                (e.value - exact_logdet).abs() / e.std_error
            );
        }
    }
    // The error bar shrinks like 1/√n_v.
    let few = slq(&fisher, &SlqOptions { probes: 6, steps: 40, seed: 9, reorthogonalize: true }).unwrap();
    let many = slq(&fisher, &SlqOptions { probes: 96, steps: 40, seed: 9, reorthogonalize: true }).unwrap();
    let (se_few, se_many) =
        (few.estimate(|x| (x + damping).ln()).std_error, many.estimate(|x| (x + damping).ln()).std_error);
    assert!(se_many < 0.5 * se_few, "error bar did not shrink: {se_few:e} (6 probes) → {se_many:e} (96 probes)");
    // Without reorthogonalization the quadrature is still within its bar.
    let plain = slq(&fisher, &SlqOptions { probes: 24, steps: 40, seed: 1, reorthogonalize: false }).unwrap();
    let e = plain.estimate(|x| (x + damping).ln());
    assert!(
        (e.value - exact_logdet).abs() <= 3.0 * e.std_error,
        "no reorth: {} ± {} vs {exact_logdet}",
        e.value,
        e.std_error
    );
    // Each probe's weights sum to 1, and f(λ) = λ is Hutchinson's estimate of tr F.
    assert!(q_weights_sum_to_one(&many));
    let tr = many.estimate(|x| x);
    assert!((tr.value - f.diag().sum()).abs() <= 3.0 * tr.std_error);

    // The density holds P eigenvalues in total, and the exact density puts the zeros below.
    let density = many.density(40, None, 0.0).unwrap();
    close(density.total(), p as f64, 1e-9, "SLQ density mass");
    let exact = SpectralDensity::from_spectrum(&fisher.spectrum().unwrap(), 30, None, 0.1).unwrap();
    close(exact.total(), p as f64, 1e-9, "exact density mass");
    assert!(exact.below >= (p - n) as f64 - 1e-9, "zeros must sit below the range: {}", exact.below);
}

fn q_weights_sum_to_one(q: &analysis::SlqQuadrature) -> bool {
    q.nodes.iter().all(|nodes| (nodes.iter().map(|n| n.1).sum::<f64>() - 1.0).abs() < 1e-12)
}

#[test]
fn implicit_measures_agree_with_exact_ones() {
    let shapes =
        [LayerShape { fan_in: 6, fan_out: 5, has_bias: true }, LayerShape { fan_in: 5, fan_out: 3, has_bias: true }];
    let layout = ParameterLayout::from_shapes(&shapes).unwrap();
    let p = layout.dim();
    let n = 30;
    let grads = gradient_like(n, p, 77);
    let full = reference::reduce(grads.view(), &Form::Full).unwrap();
    let fisher = ExplicitFisher::from_matrix(&full).unwrap();
    let theta: Vec<f64> = (0..p).map(|i| (i as f64 * 0.37).sin()).collect();
    let options = MeasureOptions {
        alpha: 1e-2,
        damping: 1e-3,
        top: 5,
        samples: Some(5000),
        theta: Some(&theta),
        layout: Some(&layout),
        slq: SlqOptions { probes: 48, steps: 30, seed: 4, reorthogonalize: true },
        coupling_probes: 32,
        ..Default::default()
    };
    let exact = measures_exact(&fisher, &options).unwrap();
    // The implicit operator only knows F·v, tr F and a rank bound (N rows < P).
    let calls = std::cell::Cell::new(0usize);
    let implicit = FnOperator::new(p, |v: &[f64]| {
        calls.set(calls.get() + 1);
        fisher.apply(v)
    })
    .with_trace(exact.trace)
    .with_rank_bound(n);
    let m = measures_implicit(&implicit, &options).unwrap();
    assert_eq!(m.method, "stochastic");
    assert_eq!(m.fv_products, calls.get(), "F·v count");
    assert!(max_rel(&m.top_eigenvalues, &exact.top_eigenvalues) < 1e-9);
    assert_eq!(m.trace, exact.trace);
    close(m.fisher_rao_norm_squared.unwrap(), exact.fisher_rao_norm_squared.unwrap(), 1e-12, "θᵀFθ");
    close(m.condition_number.unwrap(), exact.condition_number.unwrap(), 1e-9, "condition via rank bound");
    let bars = &m.error_bars;
    for (est, se, want, what) in [
        (m.logdet, bars.logdet, exact.logdet, "logdet"),
        (m.effective_dimension, bars.effective_dimension, exact.effective_dimension, "d_eff"),
        (
            m.abbas_effective_dimension.unwrap(),
            bars.abbas_effective_dimension,
            exact.abbas_effective_dimension.unwrap(),
            "Abbas",
        ),
        (m.frobenius, bars.frobenius, exact.frobenius, "frobenius"),
        (m.spectral_entropy, bars.spectral_entropy, exact.spectral_entropy, "entropy"),
        (m.stable_rank, bars.stable_rank, exact.stable_rank, "stable rank"),
        (m.inter_layer_coupling.unwrap(), bars.inter_layer_coupling, exact.inter_layer_coupling.unwrap(), "coupling"),
    ] {
        let se = se.unwrap();
        assert!((est - want).abs() <= 3.5 * se, "{what}: {est} ± {se} vs exact {want}");
    }
    let json = serde_json::to_value(&m).unwrap();
    for key in MEASURE_KEYS {
        assert!(json.get(key).is_some(), "missing key {key}");
    }
    // Without a rank bound λ_min is unknown: no condition number.
    let no_bound = FnOperator::new(p, |v: &[f64]| fisher.apply(v));
    let m = measures_implicit(
        &no_bound,
        &MeasureOptions { top: 2, theta: None, layout: None, samples: None, ..options.clone() },
    )
    .unwrap();
    assert_eq!(m.condition_number, None);
    assert!(m.error_bars.trace.is_some(), "an estimated trace carries an error bar");
}

// ---------------------------------------------------------------------------------------
// Damped solves
// ---------------------------------------------------------------------------------------

#[test]
fn damped_solves_direct_and_cg() {
    let p = 64;
    let f = fisher_f64(40, p, 12);
    let fisher = ExplicitFisher::from_matrix(&FisherMatrix::Full(f.clone())).unwrap();
    let b: Vec<f64> = (0..p).map(|i| ((i * 5 % 13) as f64 - 6.0) * 0.1).collect();
    let damping = 1e-2;
    let want = ref_solve(&f, damping, &b);
    let direct = fisher.solve_damped(&b, damping).unwrap();
    assert!(direct.relative_residual < 1e-12, "Cholesky residual {:e}", direct.relative_residual);
    assert!(max_rel(&direct.x, &want) < 1e-10);

    let cg = conjugate_gradient(&fisher, &b, damping, &CgOptions { tol: 1e-10, max_iterations: 500 }).unwrap();
    assert!(cg.converged, "{cg:?}");
    assert!(cg.iterations.unwrap() <= p + 1 + 20, "CG took {:?} iterations", cg.iterations);
    // The recursive residual is honest: recompute it.
    let fx = fisher.apply(&cg.x).unwrap();
    let true_res: f64 =
        fx.iter().zip(&cg.x).zip(&b).map(|((a, x), b)| (a + damping * x - b).powi(2)).sum::<f64>().sqrt();
    let bn = b.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(true_res <= 1e-8 * bn, "true CG residual {true_res:e}");
    assert!(max_rel(&cg.x, &want) < 1e-6, "CG vs Cholesky: {:e}", max_rel(&cg.x, &want));

    // Capped: reported, not an error.
    let capped = conjugate_gradient(&fisher, &b, damping, &CgOptions { tol: 1e-12, max_iterations: 2 }).unwrap();
    assert!(!capped.converged && capped.iterations == Some(2));

    // Per-block Cholesky = dense solve of the block-diagonal matrix.
    let blocks = vec![f.slice(s![..20, ..20]).to_owned(), f.slice(s![20.., 20..]).to_owned()];
    let mut bd = Array2::zeros((p, p));
    bd.slice_mut(s![..20, ..20]).assign(&blocks[0]);
    bd.slice_mut(s![20.., 20..]).assign(&blocks[1]);
    let bf = ExplicitFisher::from_matrix(&FisherMatrix::BlockDiagonal(blocks)).unwrap();
    let sol = bf.solve_damped(&b, damping).unwrap();
    assert!(max_rel(&sol.x, &ref_solve(&bd, damping, &b)) < 1e-10 && sol.relative_residual < 1e-12);
}

// ---------------------------------------------------------------------------------------
// Bad input: errors, never panics
// ---------------------------------------------------------------------------------------

#[test]
fn bad_input_is_an_error() {
    let f = ExplicitFisher::from_matrix(&FisherMatrix::Full(array![[2.0f32, 1.0], [1.0, 2.0]])).unwrap();
    assert!(f.apply(&[1.0]).is_err());
    assert!(f.solve_damped(&[1.0, 2.0, 3.0], 1.0).is_err());
    assert!(f.logdet(-1.0).is_err() && f.logdet(f64::NAN).is_err());
    assert!(measures_exact(&f, &MeasureOptions { alpha: 0.0, ..Default::default() }).is_err());
    assert!(measures_exact(&f, &MeasureOptions { theta: Some(&[1.0]), ..Default::default() }).is_err());
    assert!(ExplicitFisher::from_matrix(&FisherMatrix::SampleNorms(Array1::from(vec![1.0f32]))).is_err());
    assert!(ExplicitFisher::from_matrix(&FisherMatrix::Full(array![[1.0f32, 2.0], [0.0, 1.0]])).is_err(), "asymmetric");
    assert!(ExplicitFisher::from_matrix(&FisherMatrix::Full(array![[f32::NAN, 0.0], [0.0, 1.0]])).is_err());
    assert!(ExplicitFisher::from_net(&NetFisher::Grads(Array2::<f32>::zeros((2, 2))), None).is_err());
    assert!(ParameterLayout::from_ranges(vec![(0, 2), (1, 2)], 4).is_err(), "overlap");
    assert!(ParameterLayout::from_ranges(vec![(0, 5)], 4).is_err(), "out of range");
    assert!(slq(&f, &SlqOptions { probes: 1, ..Default::default() }).is_err());
    // An F·v closure returning the wrong length or NaN is reported.
    let short = FnOperator::new(3, |_: &[f64]| Ok(vec![0.0; 2]));
    assert!(short.apply(&[1.0, 2.0, 3.0]).is_err());
    let nan = FnOperator::new(3, |_: &[f64]| Ok(vec![f64::NAN; 3]));
    assert!(lanczos_top_k(&nan, &LanczosOptions::top(1)).is_err());
    assert!(conjugate_gradient(&nan, &[1.0, 0.0, 0.0], 0.1, &CgOptions::default()).is_err());
}
