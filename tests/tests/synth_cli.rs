//! `coordinator synth --visibility`: the spec reaches the film and nothing else (labels, reports
//! and the tree's layout are those of the default), and a bad spec is refused before anything is
//! written.

use std::path::Path;

use e2e::*;

fn synth(out: &Path, extra: &[&str]) -> std::process::Output {
    coordinator()
        .args(["synth", "--out", out.to_str().expect("utf-8"), "--studies", "12", "--dataset", "mimic"])
        .args(["--seed", "5", "--size", "64"])
        .args(extra)
        .output()
        .expect("synth")
}

/// Every file of the tree, by relative path, with its bytes (csv.gz decompressed).
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = files_under(root)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).expect("inside").to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).expect("read");
            if !rel.ends_with(".gz") {
                return (rel, bytes);
            }
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut s).expect("gunzip");
            (rel, s)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn visibility_changes_the_images_only() {
    let default = fresh_dir("synth-vis-default");
    let hidden = fresh_dir("synth-vis-zero");
    for (dir, extra) in [(&default, &[][..]), (&hidden, &["--visibility", "0,support_devices=1"][..])] {
        let out = synth(dir, extra);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (a, b) = (files(&default), files(&hidden));
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), b.iter().map(|f| &f.0).collect::<Vec<_>>());
    let mut changed = 0;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        if name.ends_with(".jpg") {
            changed += (x != y) as usize;
        } else {
            // Reports, labels, metadata and splits.
            assert!(x == y, "{name} differs with findings hidden");
        }
    }
    // Some of the 12 studies have a finding other than devices; their films lose it.
    assert!(changed > 0, "no image changed with every finding but devices at visibility 0");
}

#[test]
fn a_bad_visibility_is_refused_before_writing() {
    for (spec, says) in [
        ("oedema=0.5", "unknown finding 'oedema'"),
        ("pleural=0.5", "names several findings"),
        ("edema=much", "'much' is not a number"),
    ] {
        let dir = fresh_dir("synth-vis-bad").join("tree");
        let out = synth(&dir, &["--visibility", spec]);
        assert!(!out.status.success(), "{spec} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.lines().next().is_some_and(|l| l.contains(says)), "{spec}: {err}");
        assert!(!dir.exists(), "{spec}: the tree was started");
    }
}
