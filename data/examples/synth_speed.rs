//! Generator speed on one core, split into rendering and JPEG encoding.
//! `cargo run --release -p data --example synth_speed -- [images] [size]`

use std::time::Instant;

use data::synth::{encode_jpeg, render_one, SynthConfig};
use data::DatasetKind;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let size: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    for dataset in [DatasetKind::Mimic, DatasetKind::Chexpert, DatasetKind::Rsna] {
        let cfg = SynthConfig { dataset, size, seed: 1, ..Default::default() };
        let t = Instant::now();
        let imgs: Vec<_> = (0..n).map(|i| render_one(&cfg, i)).collect();
        let render = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut bytes = 0;
        for (px, w, h, _, _) in &imgs {
            bytes += encode_jpeg(px, *w, *h, 92)?.len();
        }
        let enc = t.elapsed().as_secs_f64();
        let px: usize = imgs.iter().map(|i| i.1 * i.2).sum();
        println!(
            "{dataset} {size}px: study+render {:.0}/s, jpeg encode {:.0}/s, together {:.0} images/s on one core ({:.0} px avg, {} B avg)",
            n as f64 / render,
            n as f64 / enc,
            n as f64 / (render + enc),
            px as f64 / n as f64,
            bytes / n
        );
    }
    Ok(())
}
