//! `coordinator forward-backward` as a user runs it: a good run against the fixture's
//! reference, and bad inputs that must give one clear line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny_quickgelu")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cxrclip-fb-{}-{name}", std::process::id()))
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
type Raw<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

fn write(path: &Path, tensors: &[Raw<'_>]) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn run(inputs: &Path, out: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["forward-backward", "--checkpoint"])
        .arg(fixture())
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn matches_the_reference_loss() {
    let out = tmp("good.safetensors");
    let (ok, err) = run(&fixture().join("reference.safetensors"), &out);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let refb = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&refb).unwrap();
    for key in ["loss", "logits_per_image", "image_embeds", "text_embeds", "grad.logit_scale"] {
        let a = st.tensor(key).unwrap();
        let b = reference.tensor(key).unwrap();
        assert_eq!(a.shape(), b.shape(), "{key}");
        for (x, y) in a.data().chunks_exact(4).zip(b.data().chunks_exact(4)) {
            let (x, y) = (f32::from_le_bytes(x.try_into().unwrap()), f32::from_le_bytes(y.try_into().unwrap()));
            assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "{key}: {x} vs {y}");
        }
    }
    let grads = st.names().iter().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(grads, reference.names().iter().filter(|n| n.starts_with("grad.")).count());
    std::fs::remove_file(out).unwrap();
}

#[test]
fn bad_inputs_are_one_clear_line() {
    let b = 2;
    let pixels = f32_bytes(&vec![0.5; b * 3 * 32 * 32]);
    let mut ids = vec![0i64; b * 77];
    ids[0] = 998;
    ids[5] = 999;
    ids[77] = 998;
    ids[80] = 999;
    let good_ids = i64_bytes(&ids);
    let cases: Vec<(&str, Vec<Raw<'_>>, &str)> = vec![
        ("no-ids", vec![("pixel_values", Dtype::F32, vec![b, 3, 32, 32], pixels.clone())], "input_ids"),
        (
            "rank",
            vec![
                ("pixel_values", Dtype::F32, vec![b, 3 * 32 * 32], pixels.clone()),
                ("input_ids", Dtype::I64, vec![b, 77], good_ids.clone()),
            ],
            "shape",
        ),
        (
            "size",
            vec![
                ("pixel_values", Dtype::F32, vec![b * 4, 3, 16, 16], pixels.clone()),
                ("input_ids", Dtype::I64, vec![b * 4, 77], i64_bytes(&vec![1; b * 4 * 77])),
            ],
            "image_size",
        ),
        (
            "vocab",
            vec![
                ("pixel_values", Dtype::F32, vec![b, 3, 32, 32], pixels.clone()),
                ("input_ids", Dtype::I64, vec![b, 77], {
                    let mut v = ids.clone();
                    v[3] = 5000;
                    i64_bytes(&v)
                }),
            ],
            "vocabulary",
        ),
    ];
    for (name, tensors, needle) in cases {
        let inp = tmp(&format!("{name}.safetensors"));
        write(&inp, &tensors);
        let (ok, err) = run(&inp, &tmp("unused.safetensors"));
        assert!(!ok, "{name}: should fail");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line, got {err:?}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{name}: {err}");
        std::fs::remove_file(inp).unwrap();
    }
    // A truncated inputs file.
    let inp = tmp("trunc.safetensors");
    std::fs::write(&inp, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let (ok, err) = run(&inp, &tmp("unused.safetensors"));
    assert!(!ok && err.contains("truncated"), "{err}");
    std::fs::remove_file(inp).unwrap();
}

/// `--out` naming one of the inputs (a file of the checkpoint, the inputs file, through any
/// path that reaches them) is refused in one line, and the file is left as it was.
#[test]
fn an_output_that_is_an_input_is_refused() {
    let ck = tmp("own-checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, ck.join(p.file_name().unwrap())).unwrap();
    }
    let inputs = ck.join("reference.safetensors");
    let dotted = ck.join("..").join(ck.file_name().unwrap()).join("model.safetensors");
    for out in [ck.join("model.safetensors"), dotted, inputs.clone(), ck.join("config.json")] {
        let before = std::fs::read(&out).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["forward-backward", "--checkpoint"])
            .arg(&ck)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: accepted", out.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--out") && err.contains("input"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), before, "{} changed", out.display());
    }
    std::fs::remove_dir_all(&ck).unwrap();
}
