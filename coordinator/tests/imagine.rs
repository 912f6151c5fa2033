//! `coordinator imagine` as a user runs it, on a tiny random CLIP written by `coordinator init`:
//! the files it writes, the same bytes for the same seed, a similarity that rises, and bad
//! inputs refused in one line with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cxrclip-imagine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().unwrap()
}

/// One tiny model for every test of this file: 32 px, patch 8, one block of width 32.
fn checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tmp("model");
        let o = coordinator(&[
            "init",
            "--out",
            d.to_str().unwrap(),
            "--image",
            "32",
            "--patch",
            "8",
            "--width",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--seed",
            "3",
        ]);
        assert!(o.status.success(), "init: {}", String::from_utf8_lossy(&o.stderr));
        d
    })
}

fn imagine(out: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["imagine", "--checkpoint", checkpoint().to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend_from_slice(extra);
    coordinator(&a)
}

const PROMPTS: [&str; 4] =
    ["--prompt", "A frontal chest x-ray of cardiomegaly", "--prompt", "A frontal chest x-ray of edema"];

#[test]
fn writes_the_images_and_the_same_bytes_for_a_seed() {
    let settings = ["--steps", "12", "--size", "48", "--views", "3", "--seed", "7", "--device", "cpu"];
    let mut bytes = Vec::new();
    for run in ["a", "b"] {
        let out = tmp(&format!("twice-{run}"));
        let mut a = PROMPTS.to_vec();
        a.extend_from_slice(&settings);
        let o = imagine(&out, &a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let names =
            ["01-a-frontal-chest-x-ray-of-cardiomegaly.png", "02-a-frontal-chest-x-ray-of-edema.png", "grid.png"];
        let files: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(out.join(n)).unwrap()).collect();
        let img = image::load_from_memory(&files[0]).unwrap();
        assert_eq!((img.width(), img.height()), (48, 48));
        assert_eq!(img.color(), image::ColorType::L8, "a grayscale PNG");
        let grid = image::load_from_memory(&files[2]).unwrap();
        assert_eq!((grid.width(), grid.height()), (48 * 2 + 4, 48));

        // One JSON line per step, a similarity per prompt.
        let log = std::fs::read_to_string(out.join("similarity.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(lines[11]["step"], 12);
        assert_eq!(lines[0]["similarity"].as_array().unwrap().len(), 2);
        // Gradient ascent on the similarity raises it (mean over the two prompts and the
        // last three steps against the first: the views are random, so single steps vary).
        let mean = |r: std::ops::Range<usize>| -> f64 {
            let n = r.len() as f64;
            r.map(|k| lines[k]["similarity"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / 2.0)
                .sum::<f64>()
                / n
        };
        let (first, last) = (mean(0..1), mean(9..12));
        assert!(last.is_finite() && last > first, "similarity went from {first} to {last}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("imagine.json")).unwrap()).unwrap();
        assert_eq!(summary["final_similarity"].as_array().unwrap().len(), 2);
        bytes.push(files);
    }
    assert!(bytes[0] == bytes[1], "two runs with the same seed wrote different PNG bytes");

    // Another seed, another image; the pixel parameterisation and a neutral prompt run too.
    let out = tmp("other");
    let mut a = PROMPTS[..2].to_vec();
    a.extend_from_slice(&["--steps", "3", "--size", "32", "--views", "2", "--seed", "8"]);
    a.extend_from_slice(&["--parameterization", "pixels", "--neutral", "A frontal chest x-ray"]);
    let o = imagine(&out, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(out.join("similarity.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["neutral"].as_array().unwrap().len(), 1);
}

/// A 40 x 56 PNG (not square: its centre square is used): dark left, bright right, a bright
/// disc in the middle.
fn start_png(path: &Path) {
    let img = image::GrayImage::from_fn(40, 56, |x, y| {
        let (dx, dy) = (x as f32 - 20.0, y as f32 - 28.0);
        let disc = if dx * dx + dy * dy < 64.0 { 90 } else { 0 };
        image::Luma([(40 + 3 * x + disc).min(255) as u8])
    });
    img.save(path).unwrap();
}

fn read_gray(path: &Path) -> Vec<f32> {
    image::open(path).unwrap().into_luma8().into_raw().into_iter().map(|v| v as f32 / 255.0).collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[test]
fn starts_from_a_radiograph_and_shows_what_changed() {
    let dir = tmp("init-src");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("start.png");
    start_png(&png);
    let out = tmp("init");
    let mut a = PROMPTS.to_vec();
    a.extend_from_slice(&["--steps", "4", "--size", "32", "--views", "2", "--seed", "5", "--lr", "0.02"]);
    a.extend_from_slice(&["--init", png.to_str().unwrap()]);
    let o = imagine(&out, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("changes.png"), "{stdout}");

    // The start is the PNG's centre square at 32 px: left darker than right, the disc bright.
    let start = read_gray(&out.join("init.png"));
    assert_eq!(start.len(), 32 * 32);
    let (left, right) = (start[16 * 32 + 2], start[16 * 32 + 29]);
    assert!(left + 0.2 < right, "left {left}, right {right}");
    assert!(start[16 * 32 + 16] > start[16 * 32 + 8] + 0.2, "no disc in the middle");

    // Four small steps move the image a little from its start, far less than a gray start
    // would be from it, and the change images say so.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("imagine.json")).unwrap()).unwrap();
    assert_eq!(summary["init"].as_str().unwrap(), png.to_str().unwrap());
    let gray_start: Vec<f32> = vec![0.5; start.len()];
    for (k, name) in
        ["01-a-frontal-chest-x-ray-of-cardiomegaly", "02-a-frontal-chest-x-ray-of-edema"].iter().enumerate()
    {
        let img = read_gray(&out.join(format!("{name}.png")));
        let moved = mean_abs_diff(&img, &start);
        assert!(moved > 0.0 && moved < 0.05, "{name}: moved {moved} from its start");
        assert!(mean_abs_diff(&gray_start, &start) > 4.0 * moved, "{name}: the start is not the PNG");
        let reported = summary["mean_abs_change"][k].as_f64().unwrap() as f32;
        assert!((reported - moved).abs() < 0.01, "{name}: reported {reported}, PNGs differ by {moved}");
        // The change image: mid-gray plus the amplified difference.
        let change = read_gray(&out.join(format!("{name}-change.png")));
        let want: Vec<f32> = img.iter().zip(&start).map(|(a, b)| (0.5 + 2.5 * (a - b)).clamp(0.0, 1.0)).collect();
        assert!(mean_abs_diff(&change, &want) < 0.02, "{name}: the change image is not 0.5 + 2.5 (image - start)");
    }
    let grid = image::open(out.join("changes.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (32 * 2 + 4, 32));
}

fn refused(out: &Path, extra: &[&str], want: &str) {
    let o = imagine(out, extra);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{extra:?} accepted: {err}");
    assert_ne!(o.status.code(), Some(101), "{extra:?} panicked: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
    assert!(err.contains(want), "{extra:?}: {err}");
}

#[test]
fn bad_input_is_one_line() {
    let out = tmp("bad");
    let p = PROMPTS[..2].to_vec();
    let with =
        |extra: &[&'static str]| -> Vec<&'static str> { p.iter().copied().chain(extra.iter().copied()).collect() };
    refused(&out, &["--steps", "2"], "no prompt");
    refused(&out, &["--prompt", " "], "prompt 1 is empty");
    refused(&out, &with(&["--size", "36"]), "--size 36");
    refused(&out, &with(&["--size", "2048"]), "--size 2048");
    refused(&out, &with(&["--views", "0"]), "--views");
    refused(&out, &with(&["--lr", "nan"]), "--lr");
    refused(&out, &with(&["--steps", "0"]), "--steps");
    refused(&out, &with(&["--init", "/nonexistent/start.png"]), "--init /nonexistent/start.png");
    refused(&out, &with(&["--init", "/etc/hostname"]), "not a PNG, JPEG or DICOM");
    let not_png = tmp("not-a-png");
    std::fs::create_dir_all(&not_png).unwrap();
    std::fs::write(not_png.join("start.png"), b"plain text").unwrap();
    let not_png: &'static str = Box::leak(not_png.join("start.png").to_str().unwrap().to_owned().into_boxed_str());
    refused(&out, &with(&["--init", not_png]), "not a readable PNG");
    // Nothing was written by the refusals above.
    assert!(!out.exists(), "a refused run made {}", out.display());
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"earlier result").unwrap();
    refused(&out, &with(&["--steps", "1"]), "not empty");

    let o = coordinator(&["imagine", "--checkpoint", "/nonexistent/model", "--prompt", "x", "--out", "/tmp/x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains("no such folder"), "{err}");
}
