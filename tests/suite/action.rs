//! The trainer's gradient (finite differences of the f64 reference log-likelihood), that SGD
//! learns, and the action / length / chord / efficiency of paths against dense f64 Fishers.

use std::cell::Cell;

use fisher_engine::analysis::action::{self, check_same_architecture, ActionReport};
use fisher_engine::model::run::CheckpointLoader;
use fisher_engine::model::{Activation, ActivationSpec, Dataset, Mlp};
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

/// The action as it was computed before checkpoints were streamed, kept as the oracle: every
/// θ_t in memory in f64, differences and norms with ndarray.
fn in_memory_action(engine: &fisher_engine::Engine, checkpoints: &[Mlp], data: &Dataset, segments: usize) -> (Vec<[u64; 3]>, [u64; 5]) {
    let thetas: Vec<Array1<f64>> = checkpoints.iter().map(|c| c.parameters().mapv(f64::from)).collect();
    let quadratic = |m: &Mlp, d: &[f32]| engine.fisher_quadratic(m, data, Variant::True, ndarray::ArrayView1::from(d)).unwrap().max(0.0);
    let (mut steps, mut action, mut length, mut euclidean_length) = (Vec::new(), 0.0, 0.0, 0.0);
    for t in 0..thetas.len() - 1 {
        let delta = &thetas[t + 1] - &thetas[t];
        let d: Vec<f32> = delta.iter().map(|&x| x as f32).collect();
        let q = quadratic(&checkpoints[t], &d);
        let euclidean = delta.dot(&delta).sqrt();
        action += q;
        length += q.sqrt();
        euclidean_length += euclidean;
        steps.push([euclidean.to_bits(), q.to_bits(), length.to_bits()]);
    }
    let whole = &thetas[thetas.len() - 1] - &thetas[0];
    let delta: Vec<f32> = whole.iter().map(|&x| (x / segments as f64) as f32).collect();
    let mut chord = 0.0;
    for j in 0..segments {
        let mid = &thetas[0] + &(&whole * ((j as f64 + 0.5) / segments as f64));
        let at = checkpoints[0].with_parameters(mid.mapv(|x| x as f32).view()).unwrap();
        chord += quadratic(&at, &delta).sqrt();
    }
    (steps, [action.to_bits(), length.to_bits(), chord.to_bits(), euclidean_length.to_bits(), whole.dot(&whole).sqrt().to_bits()])
}

fn bits(report: &ActionReport) -> (Vec<[u64; 3]>, [u64; 5]) {
    let steps = report.steps.iter().map(|s| [s.euclidean.to_bits(), s.action.to_bits(), s.cumulative_length.to_bits()]).collect();
    let totals = [report.action, report.length, report.chord, report.euclidean_length, report.euclidean_chord].map(f64::to_bits);
    (steps, totals)
}

/// A trained run of `checkpoints` written as safetensors files, with its data.
fn written_run(dir: &std::path::Path, checkpoints: usize) -> (Vec<Mlp>, Vec<std::path::PathBuf>, Dataset) {
    let mlp = init_mlp(&[6, 9, 4], Activation::Tanh, true, 21).unwrap();
    let data = classification_task(30, 6, 4, 22).unwrap();
    let options = SgdOptions { learning_rate: 0.3, momentum: 0.9, batch_size: 10, steps: 3 * (checkpoints - 1), checkpoints, seed: 23 };
    let run = sgd(&mlp, &data, &options).unwrap();
    let files: Vec<_> = (0..checkpoints).map(|t| dir.join(format!("ckpt_{t:03}.safetensors"))).collect();
    for (model, file) in run.checkpoints.iter().zip(&files) {
        model.to_safetensors(file).unwrap();
    }
    (run.checkpoints, files, data)
}

#[test]
fn streamed_action_equals_the_in_memory_one_bit_for_bit() {
    let engine = cpu_engine();
    let dir = tempfile::tempdir().unwrap();
    let (checkpoints, files, data) = written_run(dir.path(), 7);
    let want = in_memory_action(&engine, &checkpoints, &data, 5);
    let in_memory = action::measure(&engine, &checkpoints, &data, Variant::True, 5, &mut |_, _| {}).unwrap();
    assert_eq!(bits(&in_memory), want);
    let (loader, _) = CheckpointLoader::open(files.clone(), &ActivationSpec::parse("tanh").unwrap()).unwrap();
    let streamed = action::measure_loaded(&engine, files.len(), |t| loader.load(t), &data, Variant::True, 5, &mut |_, _| {}).unwrap();
    assert_eq!(bits(&streamed), want);
    assert_eq!((streamed.checkpoints, streamed.parameters), (7, checkpoints[0].num_params()));
}

/// A checkpoint that counts how many of its kind are alive (one made into a point of the
/// chord is a checkpoint no more).
struct Counted<'a> {
    model: Option<Mlp>,
    alive: &'a Cell<usize>,
}

impl std::borrow::Borrow<Mlp> for Counted<'_> {
    fn borrow(&self) -> &Mlp {
        self.model.as_ref().expect("a checkpoint not yet made into a point")
    }
}

impl action::LoadedModel for Counted<'_> {
    fn into_model(mut self) -> Mlp {
        self.model.take().expect("a checkpoint not yet made into a point")
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.alive.set(self.alive.get() - 1);
    }
}

/// `fisher action`'s memory bound, by construction: the checkpoints are read in order (each
/// but θ₀ twice for the steps, θ₀ and θ_T again for each segment of the chord), never more
/// than two are alive at once, and each quadratic form runs beside one checkpoint at most (θ_t
/// for a step; none for the chord, whose point is built in θ₀'s place).
#[test]
fn action_holds_at_most_two_checkpoints() {
    let engine = cpu_engine();
    let dir = tempfile::tempdir().unwrap();
    let (checkpoints, files, data) = written_run(dir.path(), 12);
    let (loader, _) = CheckpointLoader::open(files.clone(), &ActivationSpec::parse("tanh").unwrap()).unwrap();
    let (alive, most) = (Cell::new(0), Cell::new(0));
    let mut reads = Vec::new();
    let load = |t: usize| {
        reads.push(t);
        let model = loader.load(t)?;
        alive.set(alive.get() + 1);
        most.set(most.get().max(alive.get()));
        Ok(Counted { model: Some(model), alive: &alive })
    };
    let mut forms = 0;
    let report = action::measure_loaded(&engine, files.len(), load, &data, Variant::True, 3, &mut |done, total| {
        forms += 1;
        assert_eq!((done, total), (forms, 11 + 3));
        // Called right after each form: θ_t was alive beside Δθ_t, nothing beside the chord's point.
        let beside = if done <= 11 { 1 } else { 0 };
        assert_eq!(alive.get(), beside, "checkpoints alive after form {done}");
    })
    .unwrap();
    assert_eq!(most.get(), 2, "at most two checkpoints at once");
    assert_eq!(alive.get(), 0, "every checkpoint dropped");
    let steps = (1..12).flat_map(|t| [t, t]);
    let chord = [0, 11, 0, 11, 0];
    assert_eq!(reads, [0].into_iter().chain(steps).chain(chord).collect::<Vec<_>>(), "the order of the reads");
    assert_eq!(bits(&report), bits(&action::measure(&engine, &checkpoints, &data, Variant::True, 3, &mut |_, _| {}).unwrap()));
}

#[test]
fn a_streamed_checkpoint_of_another_architecture_is_refused() {
    let engine = cpu_engine();
    let a = init_mlp(&[4, 8, 3], Activation::Tanh, true, 1).unwrap();
    let b = init_mlp(&[4, 9, 3], Activation::Tanh, true, 1).unwrap();
    let data = classification_task(8, 4, 3, 1).unwrap();
    let path = [&a, &a, &b];
    let err = action::measure_loaded(&engine, 3, |t| Ok(path[t]), &data, Variant::True, 2, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("checkpoint 2 does not have the architecture of checkpoint 0"), "{err}");
}
