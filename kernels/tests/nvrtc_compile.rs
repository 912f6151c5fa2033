//! Compiles every CUDA kernel with NVRTC for sm_90 and sm_80 (no GPU needed) and runs ptxas on
//! the sm_90 PTX to report registers and spills.
//!
//! NVRTC comes from NVIDIA's wheels that `scripts/nvidia-wheels.sh` installs into the
//! workspace's `.cache/nvidia`, found here without any environment. Where they are missing,
//! the test fails when `CI` is set and otherwise skips with one line saying how to get them.
//! Any NVRTC warning fails the test; so does a spill in the attention or InfoNCE kernels.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use kernels::cuda::{libs, nvrtc};

/// Prints past libtest's output capture (straight to the process's stdout), so that the
/// resource report and the summary line show in every CI log, not only on failure.
macro_rules! say {
    ($($t:tt)*) => {{
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, $($t)*);
        let _ = o.flush();
    }};
}

const ARCHES: [(&str, &str); 2] = [("sm_90", "compute_90"), ("sm_80", "compute_80")];

fn ptxas() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = libs::nvidia_package_roots().into_iter().map(|r| r.join("cu13/bin")).collect();
    dirs.push(PathBuf::from("/usr/local/cuda/bin"));
    dirs.into_iter().map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// Resource lines per kernel from `ptxas -v`: (kernel, registers, spill stores, spill loads, shared bytes).
fn ptxas_report(ptxas: &Path, family: &str, ptx: &str) -> Vec<(String, u32, u32, u32, u32)> {
    let dir = std::env::temp_dir().join(format!("cxrclip-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{family}.ptx"));
    std::fs::write(&src, ptx).unwrap();
    let out = Command::new(ptxas)
        .args(["-arch=sm_90", "-v", "-o"])
        .arg(dir.join(format!("{family}.cubin")))
        .arg(&src)
        .output()
        .expect("ptxas runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ptxas failed on {family}:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = Vec::new();
    let mut current: Option<String> = None;
    let (mut st, mut ld) = (0, 0);
    for line in text.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            current = Some(rest.split('\'').next().unwrap_or("").to_string());
        } else if line.contains("bytes spill stores") {
            let nums: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            // "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            if nums.len() >= 3 {
                st = nums[1];
                ld = nums[2];
            }
        } else if line.contains("Used") && line.contains("registers") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let regs = words.iter().position(|w| w.starts_with("registers")).and_then(|i| words[i - 1].parse().ok());
            let smem =
                words.iter().position(|w| w.starts_with("smem")).and_then(|i| words[i - 2].parse().ok()).unwrap_or(0);
            if let (Some(name), Some(regs)) = (current.take(), regs) {
                rows.push((name, regs, st, ld, smem));
            }
            (st, ld) = (0, 0);
        }
    }
    rows
}

#[test]
fn nvrtc_compiles_every_kernel() {
    if let Err(e) = libs::ensure_nvrtc() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but NVRTC is missing: {e:#} (scripts/test.sh runs scripts/nvidia-wheels.sh first)");
        }
        say!("nvrtc: skipped, NVRTC not found; run scripts/nvidia-wheels.sh to install it into .cache/nvidia");
        return;
    }
    let include = nvrtc::find_include_dir().expect("CUDA headers (the nvidia-cuda-runtime wheel)");
    let mut sm90 = Vec::new();
    for f in nvrtc::FAMILIES {
        for (arch, virt) in ARCHES {
            let c = nvrtc::compile(f, virt, &include).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(c.log.is_empty(), "NVRTC warnings in {}.cu for {arch}:\n{}", f.name, c.log);
            nvrtc::check_entries(f, &c.ptx).unwrap();
            if arch == "sm_90" {
                sm90.push((f.name, c.ptx));
            }
        }
    }
    match ptxas() {
        Some(p) => {
            let mut spilled = Vec::new();
            say!("ptxas -arch=sm_90: kernel, registers, spill stores / loads (bytes), static shared memory (bytes)");
            for (family, ptx) in &sm90 {
                for (name, regs, st, ld, smem) in ptxas_report(&p, family, ptx) {
                    say!("  {family:<11} {name:<26} {regs:>3} regs  spills {st}/{ld}  smem {smem}");
                    if (st > 0 || ld > 0) && (*family == "attention" || *family == "infonce") {
                        spilled.push(name);
                    }
                }
            }
            assert!(spilled.is_empty(), "register spills in {spilled:?}");
        }
        None if std::env::var_os("CI").is_some() => panic!("CI is set but ptxas (nvidia-cuda-nvcc wheel) is missing"),
        None => say!("ptxas: skipped, not found (scripts/nvidia-wheels.sh installs it)"),
    }
    say!("nvrtc: compiled {} kernels for sm_90 and sm_80", nvrtc::entry_count());
}
