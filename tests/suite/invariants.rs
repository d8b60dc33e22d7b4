//! Properties that hold whatever the values, and the checks on the checkers themselves:
//!
//! * the f64 reference on hand-computed cases (including one where plain f64 summation
//!   would lose the answer to cancellation);
//! * exact symmetry, PSD, trace identities tr F = Σ diag = mean ‖gᵢ‖² = tr K = Σ tr(blocks),
//!   blocks = sub-blocks of F, ‖F‖_F = ‖K‖_F and equal non-zero spectra of F and K;
//! * the tolerance helper fails on perturbed, NaN and ±Inf results, on a plain sequential
//!   f32 sum at N = 65,536 and on a wrong normalization, so it cannot pass silently.

use std::panic::catch_unwind;

use fisher_engine::reference::grads as reference;
use fisher_engine::{FisherMatrix, Form};
use ndarray::{array, s, Array1, Array2, ArrayView2};

use crate::common::problems::cpu_reduce;
use crate::common::verify::{
    assert_agrees, assert_psd, assert_symmetric, assert_trace_matches_mean_norm, symmetric_eigenvalues,
    trace_mismatch, Tolerance,
};

/// The CPU backend's `form` of `grads`, in one push.
fn cpu(grads: ArrayView2<'_, f32>, form: &Form) -> FisherMatrix {
    cpu_reduce(grads, form, &[])
}

fn full(m: FisherMatrix) -> Array2<f32> {
    match m {
        FisherMatrix::Full(f) | FisherMatrix::Gram(f) => f,
        other => panic!("expected a matrix, got {}", other.name()),
    }
}

fn reference(grads: ArrayView2<'_, f32>, form: &Form) -> FisherMatrix<f64> {
    reference::reduce(grads, form).expect("reference")
}

#[test]
fn reference_matches_hand_computed_forms() {
    // g₁ = (1, 2), g₂ = (3, 4).
    let g = array![[1.0f32, 2.0], [3.0, 4.0]];
    // F = (g₁g₁ᵀ + g₂g₂ᵀ)/2 = ([[1, 2], [2, 4]] + [[9, 12], [12, 16]])/2.
    assert_eq!(reference(g.view(), &Form::Full), FisherMatrix::Full(array![[5.0, 7.0], [7.0, 10.0]]));
    assert_eq!(reference(g.view(), &Form::Diagonal), FisherMatrix::Diagonal(array![5.0, 10.0]));
    assert_eq!(
        reference(g.view(), &Form::BlockDiagonal(vec![1, 1])),
        FisherMatrix::BlockDiagonal(vec![array![[5.0]], array![[10.0]]])
    );
    // K = G Gᵀ/2: g₁·g₁ = 5, g₁·g₂ = 11, g₂·g₂ = 25.
    assert_eq!(reference(g.view(), &Form::Gram), FisherMatrix::Gram(array![[2.5, 5.5], [5.5, 12.5]]));
    // Norms are not divided by N.
    assert_eq!(reference(g.view(), &Form::SampleNorms), FisherMatrix::SampleNorms(array![5.0, 25.0]));
}

#[test]
fn reference_survives_cancellation() {
    // F₀₁ = (x·x + 1·1 + x·(−x))/3 = 1/3 with x = 10²⁰: a plain f64 sum gives
    // (10⁴⁰ + 1) − 10⁴⁰ = 0; compensated summation keeps the 1.
    let x = 1e20f32;
    let g = array![[x, x], [1.0, 1.0], [x, -x]];
    let FisherMatrix::Full(f) = reference(g.view(), &Form::Full) else { unreachable!() };
    assert_eq!(f[[0, 1]], 1.0 / 3.0);
    assert_eq!(f[[1, 0]], 1.0 / 3.0);
    let xx = f64::from(x) * f64::from(x);
    assert!((f[[0, 0]] - (2.0 * xx + 1.0) / 3.0).abs() <= 1e-15 * f[[0, 0]]);
    // Gram sums over parameters: K₀₂ = (x·x + x·(−x))/3 = 0 exactly, K₁₁ = 2/3.
    let FisherMatrix::Gram(k) = reference(g.view(), &Form::Gram) else { unreachable!() };
    assert_eq!(k[[0, 2]], 0.0);
    assert_eq!(k[[1, 1]], 2.0 / 3.0);
}

#[test]
fn full_and_gram_are_exactly_symmetric() {
    for (seed, &(n, p)) in [(1, 1), (5, 3), (100, 193), (37, 385), (2, 4097), (600, 50)].iter().enumerate() {
        let g = fisher_engine::synthetic::gradient_like(n, p, 100 + seed as u64);
        assert_symmetric(&full(cpu(g.view(), &Form::Full)));
        assert_symmetric(&full(cpu(g.view(), &Form::Gram)));
        let FisherMatrix::BlockDiagonal(blocks) = cpu(g.view(), &Form::BlockDiagonal(vec![p])) else {
            unreachable!()
        };
        assert_symmetric(&blocks[0]);
    }
}

#[test]
fn fisher_and_gram_are_positive_semi_definite() {
    // Full rank (N > P) and rank-deficient (N < P) in each direction.
    for (seed, &(n, p)) in [(80, 30), (10, 40), (1, 12), (64, 64)].iter().enumerate() {
        let g = fisher_engine::synthetic::gradient_like(n, p, 200 + seed as u64);
        // Computed eigenvalues of a singular matrix scatter around 0 by about the
        // dimension times the entry error: allow P·(entry tolerance).
        let tol = |size: usize, terms: usize| size as f64 * Tolerance::for_sum(terms).rel;
        assert_psd(&full(cpu(g.view(), &Form::Full)), tol(p, n));
        assert_psd(&full(cpu(g.view(), &Form::Gram)), tol(n, p));
    }
}

#[test]
fn traces_agree_across_forms() {
    for (seed, &(n, p)) in [(1, 1), (9, 4), (300, 70), (50, 600)].iter().enumerate() {
        let g = fisher_engine::synthetic::gradient_like(n, p, 300 + seed as u64);
        let norms = cpu(g.view(), &Form::SampleNorms);
        let tol = Tolerance::for_sum(n.max(p));
        for form in [Form::Full, Form::Diagonal, Form::BlockDiagonal(vec![1, p - 1].into_iter().filter(|&b| b > 0).collect()), Form::Gram] {
            let result = cpu(g.view(), &form);
            assert_trace_matches_mean_norm(&result, &norms, tol);
            // The reference satisfies the identities to f64 precision.
            let oracle = reference(g.view(), &form);
            let oracle_norms = reference(g.view(), &Form::SampleNorms);
            assert!(trace_mismatch(&oracle, &oracle_norms) < 1e-13, "{form:?}");
        }
    }
}

#[test]
fn blocks_are_the_diagonal_blocks_of_the_full_matrix() {
    let (n, p) = (333, 97);
    let g = fisher_engine::synthetic::gradient_like(n, p, 400);
    let sizes = vec![1, 2, 31, 63];
    let form = Form::BlockDiagonal(sizes.clone());

    // The reference computes each entry with the same compensated sum in the same order,
    // so its blocks equal its full matrix's sub-blocks exactly.
    let FisherMatrix::Full(f64_full) = reference(g.view(), &Form::Full) else { unreachable!() };
    let FisherMatrix::BlockDiagonal(f64_blocks) = reference(g.view(), &form) else { unreachable!() };
    // The CPU path runs different gemm shapes per block: equal within the tolerance.
    let f32_full = full(cpu(g.view(), &Form::Full));
    let FisherMatrix::BlockDiagonal(f32_blocks) = cpu(g.view(), &form) else { unreachable!() };
    let tol = Tolerance::for_sum(n);
    for ((start, &size), (f64_block, f32_block)) in
        form.block_starts().into_iter().zip(&sizes).zip(f64_blocks.iter().zip(&f32_blocks))
    {
        let range = s![start..start + size, start..start + size];
        assert_eq!(f64_block, &f64_full.slice(range));
        let sub = FisherMatrix::Full(f32_full.slice(range).to_owned());
        assert_agrees(&sub, &FisherMatrix::Full(f64_block.clone()), tol);
        assert_agrees(&FisherMatrix::Full(f32_block.clone()), &FisherMatrix::Full(f64_block.clone()), tol);
    }
}

#[test]
fn gram_has_the_spectrum_of_the_fisher_matrix() {
    for (seed, &(n, p)) in [(12, 30), (30, 12), (20, 20)].iter().enumerate() {
        let g = fisher_engine::synthetic::gradient_like(n, p, 500 + seed as u64);
        let f = full(cpu(g.view(), &Form::Full)).mapv(f64::from);
        let k = full(cpu(g.view(), &Form::Gram)).mapv(f64::from);
        // tr(F²) = ‖F‖²_F = ‖K‖²_F = tr(K²): both equal (1/N²) Σᵢⱼ (gᵢ·gⱼ)².
        let frob2 = |m: &Array2<f64>| m.iter().map(|v| v * v).sum::<f64>();
        let (ff, kk) = (frob2(&f), frob2(&k));
        assert!((ff - kk).abs() <= 1e-5 * ff, "‖F‖² = {ff}, ‖K‖² = {kk}");
        // The min(N, P) largest eigenvalues agree; the rest of the larger one are ≈ 0.
        let (ef, ek) = (symmetric_eigenvalues(&f), symmetric_eigenvalues(&k));
        let rank = n.min(p);
        let top = |e: &[f64]| e[e.len() - rank..].to_vec();
        let scale = ef.last().copied().unwrap_or(0.0);
        for (a, b) in top(&ef).iter().zip(top(&ek)) {
            assert!((a - b).abs() <= 1e-5 * scale, "eigenvalues {a} vs {b}");
        }
        let rest = if p > n { &ef[..p - rank] } else { &ek[..n - rank] };
        assert!(rest.iter().all(|v| v.abs() <= 1e-5 * scale), "{rest:?}");
    }
}

#[test]
fn jacobi_eigenvalues_are_right_on_a_known_matrix() {
    // [[2, 1], [1, 2]] has eigenvalues 1 and 3; diag(3, −1, 2) its diagonal.
    let e = symmetric_eigenvalues(&array![[2.0, 1.0], [1.0, 2.0]]);
    assert!((e[0] - 1.0).abs() < 1e-14 && (e[1] - 3.0).abs() < 1e-14, "{e:?}");
    let e = symmetric_eigenvalues(&Array2::from_diag(&array![3.0, -1.0, 2.0]));
    assert_eq!(e, vec![-1.0, 2.0, 3.0]);
}

/// True when `check` panics.
fn fails(check: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    catch_unwind(check).is_err()
}

#[test]
fn tolerance_helper_catches_wrong_results() {
    let (n, p) = (500, 20);
    let g = fisher_engine::synthetic::gradient_like(n, p, 600);
    let oracle = reference(g.view(), &Form::Full);
    let result = full(cpu(g.view(), &Form::Full));
    let tol = Tolerance::for_sum(n);
    assert!(!fails(|| assert_agrees(&FisherMatrix::Full(result.clone()), &oracle, tol)));

    let max = result.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let perturb = |i: usize, j: usize, value: f32| {
        let mut bad = result.clone();
        bad[[i, j]] = value;
        FisherMatrix::Full(bad)
    };
    // One entry off by 10× the bound, an off-diagonal one far below max|F|.
    let bump = (10.0 * tol.rel * f64::from(max)) as f32;
    let bad = perturb(3, 17, result[[3, 17]] + bump);
    let message = catch_unwind(|| assert_agrees(&bad, &oracle, tol)).expect_err("perturbed entry passed");
    let message = message.downcast_ref::<String>().expect("panic message");
    assert!(message.contains("fisher[3, 17]"), "worst index not named: {message}");
    // NaN and ±Inf never pass, wherever they are.
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(fails(|| assert_agrees(&perturb(0, 0, value), &oracle, tol)), "{value} passed");
    }
    // Wrong form or shape.
    let diag = FisherMatrix::Diagonal(Array1::from(result.diag().to_vec()));
    assert!(fails(|| assert_agrees(&diag, &oracle, tol)));
    let smaller = FisherMatrix::Full(result.slice(s![..p - 1, ..p - 1]).to_owned());
    assert!(fails(|| assert_agrees(&smaller, &oracle, tol)));
    // NaN in the reference is refused too.
    let FisherMatrix::Full(mut nan_oracle) = oracle.clone() else { unreachable!() };
    nan_oracle[[1, 1]] = f64::NAN;
    let ok = FisherMatrix::Full(result.clone());
    assert!(fails(|| assert_agrees(&ok, &FisherMatrix::Full(nan_oracle), tol)));
}

#[test]
fn tolerance_is_tight_enough_to_reject_sequential_f32_and_wrong_normalization() {
    let (n, p) = (65_536, 48);
    let tol = Tolerance::for_sum(n);
    assert!(tol.rel <= 2e-6, "{tol:?}");
    // Monotone in the reduction length, and never below a few roundings.
    assert!(Tolerance::for_sum(1).rel >= 3.0 * fisher_engine::verify::F32_UNIT_ROUNDOFF);
    assert!(Tolerance::for_sum(100).rel <= Tolerance::for_sum(1000).rel);

    let g = fisher_engine::synthetic::gradient_like(n, p, 700);
    let oracle = reference(g.view(), &Form::Full);

    // The naive kernel: one f32 accumulator per entry, samples added in order.
    let mut naive = Array2::<f32>::zeros((p, p));
    for row in g.outer_iter() {
        for i in 0..p {
            for j in 0..p {
                naive[[i, j]] += row[i] * row[j];
            }
        }
    }
    naive.mapv_inplace(|v| v / n as f32);
    let naive = FisherMatrix::Full(naive);
    let rel = naive.agreement(&oracle).expect("same form").max_rel;
    println!("sequential f32 sum at N = {n}: max|dF|/max|F| = {rel:.2e} vs tolerance {:.2e}", tol.rel);
    assert!(fails(|| assert_agrees(&naive, &oracle, tol)), "a sequential f32 sum passed");

    // The right sum with the sample-variance normalization 1/(N − 1).
    let good = full(cpu(g.view(), &Form::Full));
    assert!(!fails(|| assert_agrees(&FisherMatrix::Full(good.clone()), &oracle, tol)));
    let unbiased = FisherMatrix::Full(good.mapv(|v| (f64::from(v) * n as f64 / (n - 1) as f64) as f32));
    assert!(fails(|| assert_agrees(&unbiased, &oracle, tol)), "1/(N−1) passed");
}

#[test]
fn invariant_checkers_reject_violations() {
    let g = fisher_engine::synthetic::gradient_like(40, 6, 800);
    let f = full(cpu(g.view(), &Form::Full));
    assert!(!fails(|| assert_symmetric(&f)));
    let mut asym = f.clone();
    asym[[1, 4]] = f32::from_bits(asym[[1, 4]].to_bits() + 1); // one ulp
    assert!(fails(|| assert_symmetric(&asym)));
    assert!(fails(|| assert_symmetric(&Array2::zeros((2, 3)))));

    assert!(!fails(|| assert_psd(&f, 1e-6)));
    // [[1, 2], [2, 1]] has eigenvalue −1.
    assert!(fails(|| assert_psd(&array![[1.0f32, 2.0], [2.0, 1.0]], 1e-6)));
    assert!(fails(|| assert_psd(&array![[f32::NAN, 0.0], [0.0, 1.0]], 1e-6)));

    let norms = cpu(g.view(), &Form::SampleNorms);
    let FisherMatrix::SampleNorms(n) = &norms else { unreachable!() };
    let mut off = n.clone();
    off[0] *= 1.01;
    let off = FisherMatrix::SampleNorms(off);
    let tol = Tolerance::for_sum(40);
    let fisher = FisherMatrix::Full(f);
    assert!(!fails(|| assert_trace_matches_mean_norm(&fisher, &norms, tol)));
    assert!(fails(|| assert_trace_matches_mean_norm(&fisher, &off, tol)));
    assert!(fails(|| assert_trace_matches_mean_norm(&fisher, &fisher, tol)));
}
