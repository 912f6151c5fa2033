//! Compiles every CUDA kernel variant with NVRTC (no GPU needed): as a cubin for sm_90 and
//! sm_80 (what a device loads), with ptxas' resource report (`--ptxas-options=-v`, the ptxas
//! inside NVRTC), and one variant as PTX for compute_90 (the fallback the driver JIT-compiles).
//!
//! NVRTC comes from NVIDIA's wheels that `scripts/nvidia-wheels.sh` installs into the
//! workspace's `.cache/nvidia`, found here without any environment. Where they are missing,
//! the test fails when `CI` is set and otherwise skips with one line saying how to get them.
//! Any NVRTC warning fails the test; so does a register spill in any kernel, or static shared
//! memory over the 48 KB a kernel may declare.

use std::io::Write;
use std::time::Instant;

use kernels::cuda::libs;
use kernels::cuda::nvrtc::{self, Target};

/// Prints past libtest's output capture (straight to the process's stdout), so that the
/// resource report and the summary line show in every CI log, not only on failure.
macro_rules! say {
    ($($t:tt)*) => {{
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, $($t)*);
        let _ = o.flush();
    }};
}

const ARCHES: [(i32, i32); 2] = [(9, 0), (8, 0)];

/// One kernel's line of ptxas' report.
#[derive(Debug, Default)]
struct Usage {
    kernel: String,
    regs: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// Parses ptxas' `-v` report (as NVRTC's log carries it): per kernel, registers, spills and
/// static shared memory. Lines that are not ptxas' are returned as the second value.
fn ptxas_report(log: &str) -> (Vec<Usage>, Vec<String>) {
    let mut rows = Vec::new();
    let mut other = Vec::new();
    let mut cur = Usage::default();
    for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !line.starts_with("ptxas") {
            other.push(line.to_string());
        } else if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            cur = Usage { kernel: rest.split('\'').next().unwrap_or("").to_string(), ..Usage::default() };
        } else if line.contains("bytes spill stores") {
            // "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            let nums: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if nums.len() >= 3 {
                cur.spill_stores = nums[1];
                cur.spill_loads = nums[2];
            }
        } else if line.contains("Used") && line.contains("registers") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let before = |key: &str, back: usize| {
                words
                    .iter()
                    .position(|w| w.starts_with(key))
                    .and_then(|i| words.get(i.checked_sub(back)?)?.parse().ok())
            };
            cur.regs = before("registers", 1).unwrap_or(0);
            cur.smem = before("smem", 2).unwrap_or(0);
            if !cur.kernel.is_empty() {
                rows.push(std::mem::take(&mut cur));
            }
        }
    }
    (rows, other)
}

#[test]
fn ptxas_report_parses() {
    let log = "ptxas info    : 0 bytes gmem\n\
               ptxas info    : Compiling entry function 'attn_fwd' for 'sm_90'\n\
               ptxas info    : Function properties for attn_fwd\n\
               ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 168 registers, used 0 barriers, 34816 bytes smem, 400 bytes cmem[0]\n\
               a warning\n";
    let (rows, other) = ptxas_report(log);
    assert_eq!(rows.len(), 1);
    let u = &rows[0];
    assert_eq!((u.kernel.as_str(), u.regs, u.spill_stores, u.spill_loads, u.smem), ("attn_fwd", 168, 4, 12, 34816));
    assert_eq!(other, vec!["a warning".to_string()]);
}

/// Compiles one variant for one target: its report lines and the problems found (warnings,
/// spills, static shared memory over 48 KB). Panics on a compile error.
fn compile_job(
    f: &nvrtc::Family,
    v: &nvrtc::Variant,
    target: Target,
    cc: (i32, i32),
    include: &std::path::Path,
) -> (Vec<String>, Vec<String>) {
    let module = nvrtc::module_name(f, v);
    let arch = target.arch(cc);
    let (mut lines, mut problems) = (Vec::new(), Vec::new());
    let extra: &[&str] = if target == Target::Cubin { &["--ptxas-options=-v"] } else { &[] };
    let c = nvrtc::compile_with(f, v, target, cc, include, extra).unwrap_or_else(|e| panic!("{e:#}"));
    nvrtc::check_entries(f, target, &c.image).unwrap();
    let (rows, other) = ptxas_report(&c.log);
    if !other.is_empty() {
        problems.push(format!("NVRTC warnings in {module} for {arch}:\n{}", other.join("\n")));
    }
    if target == Target::Cubin {
        assert_eq!(rows.len(), f.entries.len(), "ptxas reported {} of {module}'s kernels", rows.len());
    }
    for u in rows {
        lines.push(format!(
            "  {arch} {module:<15} {:<26} {:>3} regs  spills {}/{}  smem {}",
            u.kernel, u.regs, u.spill_stores, u.spill_loads, u.smem
        ));
        if u.spill_stores > 0 || u.spill_loads > 0 {
            problems.push(format!("register spills in {module} {} for {arch}", u.kernel));
        }
        if u.smem > 48 * 1024 {
            problems.push(format!("{module} {} declares {} bytes of static shared memory", u.kernel, u.smem));
        }
    }
    (lines, problems)
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
    let started = Instant::now();
    let include = nvrtc::find_include_dir().expect("CUDA headers (the nvidia-cuda-runtime wheel)");
    // Every (family, variant, target) is one job; the jobs run on all cores (ptxas on the
    // attention and InfoNCE kernels takes seconds each), their reports print in list order.
    let mut jobs = Vec::new();
    for f in nvrtc::FAMILIES {
        for v in f.variants {
            for cc in ARCHES {
                jobs.push((f, v, Target::Cubin, cc));
            }
        }
    }
    // The fallback a device takes where a cubin fails is PTX for the virtual architecture,
    // from the same source and options: one variant shows that path compiles (all of them
    // would add a third to the runtime for a front end the cubins have already passed).
    let attention = nvrtc::family_of("attn_fwd").unwrap();
    jobs.push((attention, nvrtc::attention_variant(32).unwrap(), Target::Ptx, ARCHES[0]));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(jobs.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, Vec<String>, Vec<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(f, v, target, cc)) = jobs.get(i) else { break };
                        let (lines, problems) = compile_job(f, v, target, cc, &include);
                        out.push((i, lines, problems));
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("compile thread")).collect()
    });
    done.sort_by_key(|d| d.0);
    say!(
        "ptxas (in NVRTC): arch, module, kernel, registers, spill stores / loads (bytes), static shared memory (bytes)"
    );
    let mut problems = Vec::new();
    for (_, lines, p) in done {
        for l in lines {
            say!("{l}");
        }
        problems.extend(p);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    say!(
        "nvrtc: compiled {} kernels ({} variants of {} families) for sm_90 and sm_80 as cubin in {:.1} s",
        nvrtc::kernel_count(),
        nvrtc::variant_count(),
        nvrtc::FAMILIES.len(),
        started.elapsed().as_secs_f64()
    );
}
