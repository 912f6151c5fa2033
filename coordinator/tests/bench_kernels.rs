//! `coordinator bench kernels --device cpu --op infonce ... --json` (the contract other tools
//! read): one row per variant with its time and the op's own peak heap use, which the metered
//! heap counts only once the bench starts it.

use std::process::Command;

#[test]
fn the_infonce_bench_reports_time_and_peak_heap_per_variant() {
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["bench", "kernels", "--device", "cpu", "--op", "infonce", "--local", "16", "--global", "64"])
        .args(["--dim", "32", "--variant", "both", "--json"])
        .output()
        .expect("start coordinator");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let rows = v["rows"].as_array().expect("rows");
    assert!(rows.len() >= 2, "{v}");
    for r in rows {
        let ms = r["ms"].as_f64().expect("ms");
        assert!(ms.is_finite() && ms > 0.0, "{r}");
        // The baseline holds the 16 x 64 logits whole at least: 4 KiB.
        let peak = r["peak_bytes"].as_u64().expect("peak_bytes");
        assert!(peak > 0, "the heap was not metered: {r}");
        if r["variant"].as_str().is_some_and(|s| s.contains("baseline")) {
            assert!(peak >= 16 * 64 * 4, "{r}");
        }
    }
}
