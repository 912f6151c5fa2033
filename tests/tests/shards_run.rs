//! Training from packed shards on real coordinator and worker processes: a run on a JPEG tree,
//! the same run told to pack the tree into shards (`--shards DIR`) and a run given that prepared
//! folder as `--data` train on the same pairs in the same order with the same draws (the images
//! keep their size when packed, so the pixels are the same too): their losses agree bit for
//! bit, unreadable images included. A damaged prepared folder is refused with one line before
//! any worker starts.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::*;

const STEPS: u64 = 6;

/// `train_args_on` `data` on 2 workers, plus `extra`.
fn args_on(run_dir: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = train_args_on(run_dir, data, 2, STEPS);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn runs_from_shards_train_as_the_run_from_the_tree() {
    let _g = serial();
    // A few images that fail when decoded (in the workers, or when packed): substituted alike
    // from the tree and from the shards.
    let tree = tree_with_broken_images("shards-tree", 5, 10, 3);

    let from_tree = fresh_dir("shards-from-tree");
    let out = run_ok(&args_on(&from_tree, &tree, &["--loader-threads", "1"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping unreadable image"));
    let want = losses(&from_tree);
    assert_eq!(want.len(), STEPS as usize);
    assert!(want.iter().all(|(_, l)| l.is_finite() && *l > 0.0), "{want:?}");

    let shards = fresh_dir("shards-packed").join("shards");
    let packing = fresh_dir("shards-packing");
    let out = run_ok(&args_on(&packing, &tree, &["--shards", shards.to_str().expect("utf-8")]));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("packed") && err.contains("skipping unreadable image"), "{err}");
    assert_eq!(losses(&packing), want, "--shards DIR");

    let prepared = fresh_dir("shards-prepared");
    run_ok(&args_on(&prepared, &shards, &["--loader-threads", "3"]));
    assert_eq!(losses(&prepared), want, "--data PREPARED");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prepared.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["args"]["loader_threads"], 3);

    // Damaged copies of the prepared folder: one line, non-zero, before any worker starts.
    let copy = |name: &str| {
        let d = fresh_dir(name);
        for e in std::fs::read_dir(&shards).expect("shards") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
        }
        d
    };
    let missing = copy("shards-missing");
    std::fs::remove_file(missing.join("shard-00000.bin")).expect("rm");
    let table = copy("shards-table");
    let text = std::fs::read_to_string(table.join("pairs.jsonl")).expect("table");
    std::fs::write(table.join("pairs.jsonl"), text.replacen("{\"subject_id\"", "{\"subject", 2)).expect("write");
    for (dir, word) in [(&missing, "shard-00000.bin"), (&table, "pairs.jsonl:")] {
        let t0 = Instant::now();
        let out = coordinator().args(args_on(&fresh_dir("shards-bad-run"), dir, &[])).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(word) && !err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }
}
