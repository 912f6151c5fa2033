//! The worker's own memory use, for the metrics (`rss_mb`).

/// This process's peak resident set size so far, in MiB: Linux's `VmHWM` (the high-water mark
/// of `VmRSS`) from `/proc/self/status`. `None` where there is no such file or line (other
/// operating systems, or a `/proc` that is not mounted): the metrics then carry no value.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:` line of a `/proc/<pid>/status` text, in MiB (the kernel writes kibibytes as
/// "kB").
fn parse_vm_hwm(status: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: f64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_high_water_mark_in_mib() {
        let status = "Name:\tworker\nVmPeak:\t  900000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(200.0));
        assert_eq!(parse_vm_hwm("VmRSS:\t 1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t lots\n"), None);
    }

    #[test]
    fn this_process_has_a_peak_on_linux_and_it_grows_with_what_it_touches() {
        if !cfg!(target_os = "linux") {
            assert_eq!(peak_rss_mb(), None);
            return;
        }
        let before = peak_rss_mb().expect("VmHWM on Linux");
        assert!(before > 0.0);
        // Touch 64 MiB more than the process held at its peak so far.
        let extra = ((before + 64.0) * (1 << 20) as f64) as usize;
        let v = vec![1u8; extra];
        let after = peak_rss_mb().unwrap();
        assert!(after >= before + 60.0, "{before} -> {after} MiB after touching {} MiB", extra >> 20);
        drop(v);
    }
}
