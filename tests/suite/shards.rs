//! Shards and their merge (issue 11): n shards of a run, merged, equal the single run bit
//! for bit on the CPU for every summed form and variant; the GPU's shards merge within its
//! tolerance; `fisher merge` refuses a missing, duplicated or mismatched part by name and
//! writes nothing.

use fisher_engine::fisher::{shard_range, NetFisher, NetForm, NetSums, Variant, DEFAULT_BLOCK_SAMPLES};
use fisher_engine::model::{Activation, Dataset, Likelihood, Mlp};
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::Engine;

use crate::common::cli::{assert_dir_holds, assert_fails, fisher, read_safetensors, s, succeeds, temp};
use crate::common::problems::{seeded_dataset, seeded_mlp};
use crate::common::{cpu_engine, gpu_engine};

const SUM_FORMS: [NetForm; 4] = [NetForm::Diagonal, NetForm::Kfac, NetForm::Layer, NetForm::Full];

fn problem(widths: &[usize], n: usize, likelihood: Likelihood, seed: u64) -> (Mlp, Dataset) {
    let mut rng = SplitMix64::new(seed);
    let depth = widths.len() - 1;
    let bias: Vec<bool> = (0..depth).map(|l| l != 1).collect(); // one layer without a bias
    let mlp = seeded_mlp(widths, &vec![Activation::Tanh; depth - 1], &bias, 1.0, 0.3, &mut rng);
    let data = seeded_dataset(n, widths[0], widths[depth], likelihood, &mut rng);
    (mlp, data)
}

/// The merge of `count` shards' sums, added in the order `order` (a permutation).
fn merged(engine: &Engine, mlp: &Mlp, data: &Dataset, variant: Variant, form: NetForm, block: usize, count: usize, order: &[usize]) -> NetSums {
    let parts: Vec<NetSums> = (0..count)
        .map(|i| engine.fisher_sums(mlp, data, variant, form, shard_range(data.len(), block, i, count), block).unwrap())
        .collect();
    let mut total = parts[order[0]].clone();
    for &i in &order[1..] {
        total.merge(&parts[i]).unwrap();
    }
    assert_eq!(total.samples, data.len());
    total
}

fn bits(f: &NetFisher) -> Vec<u64> {
    f.values().into_iter().map(f64::to_bits).collect()
}

#[test]
fn cpu_shards_merge_to_the_single_run_bit_for_bit() {
    let engine = cpu_engine();
    for (likelihood, variant) in [
        (Likelihood::Categorical, Variant::True),
        (Likelihood::Categorical, Variant::Empirical),
        (Likelihood::Categorical, Variant::MonteCarlo { samples: 3, seed: 11 }),
        (Likelihood::Gaussian, Variant::True),
    ] {
        let (mlp, data) = problem(&[7, 9, 6, 4], 503, likelihood, 5);
        let n = data.len();
        for form in SUM_FORMS {
            // Several blocks per shard, shards of unequal size, merged in a scrambled order.
            let block = 37;
            let single = engine.fisher_sums(&mlp, &data, variant, form, 0..n, block).unwrap().finish(n).unwrap();
            for (count, order) in [(4, vec![2, 0, 3, 1]), (3, vec![0, 1, 2]), (14, (0..14).rev().collect())] {
                let parts = merged(&engine, &mlp, &data, variant, form, block, count, &order).finish(n).unwrap();
                assert_eq!(bits(&parts), bits(&single), "{form:?} {variant:?} in {count} shards");
            }
            // The single run of the default block (one block here) is `Engine::fisher`.
            let plain = engine.fisher(&mlp, &data, variant, form).unwrap();
            let four = merged(&engine, &mlp, &data, variant, form, DEFAULT_BLOCK_SAMPLES, 4, &[3, 1, 0, 2]).finish(n).unwrap();
            assert_eq!(bits(&four), bits(&plain), "{form:?} {variant:?}: default block");
            // Exact across blocks, and still the Fisher: within the f32 contract of the f64
            // reference, like every network result.
            let reference = fisher_engine::reference::network::fisher(&mlp, &data, likelihood, variant, form).unwrap();
            let agreement = single.agreement(&reference).unwrap();
            assert!(agreement.frobenius_rel < 1e-5, "{form:?} {variant:?}: {agreement:?}");
        }
    }
}

#[test]
fn a_run_longer_than_the_default_block_sums_its_blocks_exactly() {
    // 70,000 samples are two default blocks: `Engine::fisher` combines them with the exact
    // sum, so three shards of the default block give its bits.
    let engine = cpu_engine();
    let (mlp, data) = problem(&[3, 4, 2], 70_000, Likelihood::Categorical, 9);
    let n = data.len();
    for form in [NetForm::Diagonal, NetForm::Kfac] {
        let plain = engine.fisher(&mlp, &data, Variant::True, form).unwrap();
        let three = merged(&engine, &mlp, &data, Variant::True, form, DEFAULT_BLOCK_SAMPLES, 3, &[2, 0, 1]).finish(n).unwrap();
        assert_eq!(bits(&three), bits(&plain), "{form:?}");
        let reference = fisher_engine::reference::network::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, form).unwrap();
        assert!(plain.agreement(&reference).unwrap().frobenius_rel < 1e-5, "{form:?}");
    }
}

#[test]
fn gpu_shards_merge_within_the_gpu_tolerance() {
    let Some(gpu) = gpu_engine("gpu_shards_merge_within_the_gpu_tolerance") else { return };
    let cpu = cpu_engine();
    let (mlp, data) = problem(&[6, 8, 5], 300, Likelihood::Categorical, 3);
    let n = data.len();
    let block = 40;
    for form in SUM_FORMS {
        for variant in [Variant::True, Variant::MonteCarlo { samples: 2, seed: 4 }] {
            let on_gpu = merged(&gpu, &mlp, &data, variant, form, block, 3, &[1, 2, 0]).finish(n).unwrap();
            let on_cpu = cpu.fisher(&mlp, &data, variant, form).unwrap();
            let agreement = on_gpu.agreement(&on_cpu).unwrap();
            // The network contract of the f64 reference (‖Δ‖/‖ref‖ ≤ 1e-5), against the CPU:
            // MC draws are keyed by the sample's index in the whole data on both.
            assert!(agreement.frobenius_rel < 2e-5, "{form:?} {variant:?}: {agreement:?}");
        }
    }
}

#[test]
fn per_sample_forms_and_bad_ranges_have_no_shards() {
    let engine = cpu_engine();
    let (mlp, data) = problem(&[4, 3, 2], 50, Likelihood::Categorical, 1);
    for form in [NetForm::Grads, NetForm::Norms] {
        let e = engine.fisher_sums(&mlp, &data, Variant::True, form, 0..50, 10).unwrap_err();
        assert!(e.to_string().contains("per sample"), "{e}");
    }
    assert!(engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Diagonal, 0..51, 10).is_err());
    assert!(engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Diagonal, 0..50, 0).is_err());
    // Sums of another network or form do not merge.
    let mut a = engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Diagonal, 0..10, 10).unwrap();
    let b = engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Kfac, 10..20, 10).unwrap();
    assert!(a.merge(&b).is_err());
}

/// Writes a seeded MLP (safetensors) and data (.npy) for the CLI tests into `dir`.
fn cli_problem(dir: &std::path::Path) -> [String; 3] {
    let run = fisher(&[
        "compute", "--synthetic-model", "6,10,4", "--synthetic-samples", "700", "--activation", "tanh",
        "--save-model", s(&dir.join("m.safetensors")), "--save-data", s(&dir.join("data")), "--quiet",
    ]);
    succeeds(&run);
    [dir.join("m.safetensors"), dir.join("data/inputs.npy"), dir.join("data/labels.npy")].map(|p| p.display().to_string())
}

fn compute_args<'a>(files: &'a [String; 3], form: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "compute", "--weights", &files[0], "--inputs", &files[1], "--labels", &files[2], "--activation", "tanh",
        "--form", form, "--backend", "cpu", "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn cli_four_shards_merge_to_the_single_run_bit_for_bit() {
    let dir = temp();
    let d = dir.path();
    let files = cli_problem(d);
    for form in ["diag", "kfac", "layer", "full"] {
        let parts: Vec<String> = (0..4).map(|i| d.join(format!("{form}-{i}.safetensors")).display().to_string()).collect();
        for (i, part) in parts.iter().enumerate() {
            let shard = format!("{i}/4");
            succeeds(&fisher(&compute_args(&files, form, &["--shard", &shard, "--partial", part, "--block-samples", "64"])));
        }
        let merged = d.join(format!("{form}-merged.safetensors"));
        let mut args = vec!["merge", &parts[3], &parts[0], &parts[2], &parts[1], "--out", s(&merged), "--quiet"];
        succeeds(&fisher(&args));
        let single = d.join(format!("{form}-single.safetensors"));
        succeeds(&fisher(&compute_args(&files, form, &["--block-samples", "64", "--out", s(&single)])));
        let (a, b) = (read_safetensors(&merged), read_safetensors(&single));
        assert_eq!(a.names(), b.names(), "{form}");
        for name in a.names() {
            let (x, y) = (a.tensors[&name].1.clone(), b.tensors[&name].1.clone());
            assert_eq!(x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{form} {name}");
        }
        assert_eq!(a.metadata, b.metadata, "{form}: the merged file carries the single run's metadata");
        // Rerunning the merge over an existing output needs --force.
        let again = fisher(&args);
        assert_fails(&again, 2, &["exists", "--force"]);
        args.push("--force");
        succeeds(&fisher(&args));
    }
}

#[test]
fn cli_merge_refuses_missing_duplicated_and_mismatched_parts_by_name() {
    let dir = temp();
    let d = dir.path();
    let files = cli_problem(d);
    let part = |name: &str| d.join(name).display().to_string();
    for i in 0..3 {
        let shard = format!("{i}/3");
        succeeds(&fisher(&compute_args(&files, "diag", &["--shard", &shard, "--partial", &part(&format!("p{i}.safetensors")), "--block-samples", "100"])));
    }
    // Another run: the empirical variant, another block, another form.
    succeeds(&fisher(&compute_args(&files, "diag", &["--shard", "2/3", "--partial", &part("emp2.safetensors"), "--block-samples", "100", "--variant", "empirical"])));
    succeeds(&fisher(&compute_args(&files, "diag", &["--shard", "2/3", "--partial", &part("blk2.safetensors"), "--block-samples", "50"])));
    succeeds(&fisher(&compute_args(&files, "kfac", &["--shard", "2/3", "--partial", &part("kfac2.safetensors"), "--block-samples", "100"])));
    succeeds(&fisher(&compute_args(&files, "diag", &["--out", &part("result.safetensors")])));
    let before = crate::common::cli::names_in(d);
    let out = part("F.safetensors");
    let merge = |parts: &[&str]| {
        let mut args = vec!["merge"];
        args.extend_from_slice(parts);
        args.extend_from_slice(&["--out", &out]);
        fisher(&args)
    };
    let (p0, p1, p2) = (part("p0.safetensors"), part("p1.safetensors"), part("p2.safetensors"));
    assert_fails(&merge(&[&p0, &p2]), 2, &["shard 1/3 is missing", "p0.safetensors", "p2.safetensors"]);
    assert_fails(&merge(&[&p0, &p1, &p1, &p2]), 2, &["shard 1/3 is given twice", "p1.safetensors"]);
    assert_fails(&merge(&[&p0, &p1, &part("emp2.safetensors")]), 2, &["emp2.safetensors", "different run", "fingerprint"]);
    assert_fails(&merge(&[&p0, &p1, &part("blk2.safetensors")]), 2, &["blk2.safetensors", "block samples 50"]);
    assert_fails(&merge(&[&p0, &p1, &part("kfac2.safetensors")]), 2, &["kfac2.safetensors", "form kfac"]);
    assert_fails(&merge(&[&p0, &p1, &part("result.safetensors")]), 2, &["result.safetensors", "not a partial file"]);
    assert_fails(&merge(&[&p0, &p1, &files[1]]), 2, &["inputs.npy", "not a safetensors file"]);
    // The output may not be one of the parts.
    assert_fails(&fisher(&["merge", &p0, &p1, &p2, "--out", &p1, "--force"]), 2, &["p1.safetensors", "refusing to overwrite an input"]);
    // Nothing was written or replaced by any refusal.
    assert_eq!(crate::common::cli::names_in(d), before);
    succeeds(&merge(&[&p2, &p1, &p0]));
    assert!(std::path::Path::new(&out).is_file());
}

#[test]
fn cli_shard_flags_are_checked() {
    let dir = temp();
    let d = dir.path();
    let files = cli_problem(d);
    let p = d.join("p.safetensors").display().to_string();
    let out = d.join("F.safetensors").display().to_string();
    let cases: [(Vec<&str>, &str); 7] = [
        (vec!["--shard", "4/4", "--partial", &p], "not a shard i/n"),
        (vec!["--shard", "1/0", "--partial", &p], "not a shard i/n"),
        (vec!["--shard", "x", "--partial", &p], "not a shard i/n"),
        (vec!["--shard", "0/2"], "--partial"),
        (vec!["--shard", "0/2", "--partial", &p, "--out", &out], "not --out"),
        (vec!["--partial", &p, "--out", &out], "--partial needs --shard"),
        (vec!["--shard", "0/2", "--partial", &p, "--verify"], "--verify"),
    ];
    for (extra, needle) in cases {
        assert_fails(&fisher(&compute_args(&files, "diag", &extra)), 2, &[needle]);
    }
    assert_fails(&fisher(&compute_args(&files, "grads", &["--shard", "0/2", "--partial", &p])), 2, &["per sample"]);
    assert_fails(&fisher(&compute_args(&files, "diag", &["--block-samples", "0", "--out", &out])), 2, &["--block-samples"]);
    // The partial may not replace an input.
    assert_fails(&fisher(&compute_args(&files, "diag", &["--shard", "0/2", "--partial", &files[0]])), 2, &["refusing to overwrite an input"]);
    assert_dir_holds(d, &["data", "m.safetensors"]);
}
