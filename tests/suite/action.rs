//! The trainer's gradient (finite differences of the f64 reference log-likelihood), that SGD
//! learns, and the action / length / chord / efficiency of paths against dense f64 Fishers.

use fisher_engine::analysis::action::{self, check_same_architecture};
use fisher_engine::model::Activation;
use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::model::train::{classification_task, init_mlp, loss_and_gradient, sgd, SgdOptions};
use ndarray::Array1;

use crate::common::{backend_test, cpu_engine};

#[test]
fn trainer_gradient_matches_finite_differences() {
    let mlp = init_mlp(&[4, 6, 3], Activation::Tanh, true, 1).unwrap();
    let data = classification_task(9, 4, 3, 2).unwrap();
    let rows: Vec<usize> = (0..9).collect();
    let (_, grad) = loss_and_gradient(&mlp, &data, &rows);
    let theta = mlp.parameters().mapv(f64::from);
    let mean_nll = |t: &Array1<f64>| -> f64 {
        -(0..9).map(|i| reference::log_likelihood_at(&mlp, t.view(), &data, i, data.likelihood()).unwrap()).sum::<f64>() / 9.0
    };
    let h = 1e-5;
    for k in 0..theta.len() {
        let (mut up, mut down) = (theta.clone(), theta.clone());
        up[k] += h;
        down[k] -= h;
        let fd = (mean_nll(&up) - mean_nll(&down)) / (2.0 * h);
        assert!((grad[k] as f64 - fd).abs() <= 1e-5 + 1e-4 * fd.abs(), "θ[{k}]: {} vs {fd}", grad[k]);
    }
}

#[test]
fn sgd_learns_and_keeps_evenly_spaced_checkpoints() {
    let mlp = init_mlp(&[8, 16, 4], Activation::Tanh, true, 3).unwrap();
    let data = classification_task(256, 8, 4, 4).unwrap();
    let options = SgdOptions { learning_rate: 0.2, momentum: 0.9, batch_size: 32, steps: 100, checkpoints: 21, seed: 5 };
    let run = sgd(&mlp, &data, &options).unwrap();
    assert_eq!(run.checkpoints.len(), 21);
    assert_eq!(run.steps.first(), Some(&0));
    assert_eq!(run.steps.last(), Some(&100));
    assert!(run.steps.windows(2).all(|w| w[1] == w[0] + 5), "{:?}", run.steps);
    let (first, last) = (run.losses[0], *run.losses.last().unwrap());
    assert!(last < 0.6 * first, "loss {first} → {last}");
}

backend_test!(action_terms_match_dense_reference, |engine| {
    let mlp = init_mlp(&[5, 7, 3], Activation::Gelu, true, 6).unwrap();
    let data = classification_task(40, 5, 3, 7).unwrap();
    let run = sgd(&mlp, &data, &SgdOptions { learning_rate: 0.3, momentum: 0.5, batch_size: 10, steps: 6, checkpoints: 4, seed: 8 }).unwrap();
    let thetas: Vec<Array1<f64>> = run.checkpoints.iter().map(|c| c.parameters().mapv(f64::from)).collect();
    let dense = |m: &fisher_engine::model::Mlp| {
        let NetFisher::Full(f) = reference::fisher(m, &data, data.likelihood(), Variant::True, NetForm::Full).unwrap() else { unreachable!() };
        f
    };
    // Independent: S and L from dense f64 Fishers at each left endpoint, chord by the midpoint rule.
    let (mut s, mut l) = (0.0, 0.0);
    for t in 0..3 {
        let d = &thetas[t + 1] - &thetas[t];
        let d = d.mapv(|x| x as f32 as f64);
        let q = d.dot(&dense(&run.checkpoints[t]).dot(&d));
        s += q;
        l += q.sqrt();
    }
    let segments = 2;
    let whole = &thetas[3] - &thetas[0];
    let mut chord = 0.0;
    for j in 0..segments {
        let mid = &thetas[0] + &(&whole * ((j as f64 + 0.5) / segments as f64));
        let at = mlp.with_parameters(mid.mapv(|x| x as f32).view()).unwrap();
        let d = whole.mapv(|x| (x / segments as f64) as f32 as f64);
        chord += d.dot(&dense(&at).dot(&d)).sqrt();
    }
    let mut calls = 0;
    let report = action::measure(&engine, &run.checkpoints, &data, Variant::True, segments, &mut |done, total| {
        calls += 1;
        assert!(done <= total && total == 3 + segments);
    })
    .unwrap();
    assert_eq!(calls, 5);
    assert_eq!(report.steps.len(), 3);
    assert!((report.action - s).abs() <= 1e-5 * s, "S {} vs {s}", report.action);
    assert!((report.length - l).abs() <= 1e-5 * l, "L {} vs {l}", report.length);
    assert!((report.chord - chord).abs() <= 1e-5 * chord, "chord {} vs {chord}", report.chord);
    assert!((report.efficiency - l / chord).abs() <= 1e-4 * (l / chord));
    assert!((report.steps[2].cumulative_length - report.length).abs() <= 1e-12 * report.length);
});

#[test]
fn a_straight_evenly_sampled_path_has_efficiency_near_one() {
    let engine = cpu_engine();
    let a = init_mlp(&[4, 8, 3], Activation::Tanh, true, 11).unwrap();
    let b = init_mlp(&[4, 8, 3], Activation::Tanh, true, 12).unwrap();
    let data = classification_task(64, 4, 3, 13).unwrap();
    let (ta, tb) = (a.parameters().mapv(f64::from), b.parameters().mapv(f64::from));
    let path: Vec<_> = (0..=40)
        .map(|t| a.with_parameters((&ta + &((&tb - &ta) * (t as f64 / 40.0))).mapv(|x| x as f32).view()).unwrap())
        .collect();
    let report = action::measure(&engine, &path, &data, Variant::True, 40, &mut |_, _| {}).unwrap();
    // Left-point vs midpoint rules on the same straight line agree to O(1/T).
    assert!((report.efficiency - 1.0).abs() < 0.03, "efficiency {}", report.efficiency);
    // A detour (out and back along another direction) is longer than the chord.
    let c = init_mlp(&[4, 8, 3], Activation::Tanh, true, 14).unwrap();
    let detour = vec![a.clone(), c, b.clone()];
    let report = action::measure(&engine, &detour, &data, Variant::True, 16, &mut |_, _| {}).unwrap();
    assert!(report.efficiency > 1.0, "detour efficiency {}", report.efficiency);
}

#[test]
fn mismatched_checkpoints_are_refused() {
    let engine = cpu_engine();
    let a = init_mlp(&[4, 8, 3], Activation::Tanh, true, 1).unwrap();
    let b = init_mlp(&[4, 9, 3], Activation::Tanh, true, 1).unwrap();
    let data = classification_task(8, 4, 3, 1).unwrap();
    let err = action::measure(&engine, &[a.clone(), a.clone(), b.clone()], &data, Variant::True, 2, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("checkpoint 2"), "{err}");
    assert!(check_same_architecture(&[a.clone()]).is_ok());
    assert!(action::measure(&engine, &[a], &data, Variant::True, 2, &mut |_, _| {}).is_err());
}
