//! Several nodes, made of network namespaces on this machine: the coordinator in one, a remote
//! worker (`--expect-workers 2 --ring-host ... --rejoin`) in each of two others, joined by a
//! bridge in the coordinator's namespace and a veth pair per worker. Two faults heal with no
//! hand on the keyboard and give the clean run's losses:
//! - a partition: one worker's link down for 40 s (its heartbeats fail, the coordinator restarts
//!   the job, the other worker registers again and waits, the partitioned one gives the job up
//!   and registers again once its link is back);
//! - a `kill -9` of one worker, restarted by the test (its peer sees the ring closed, reports the
//!   lost rank and registers again);
//! - a `kill -9` of the coordinator, resumed by the test with `--resume RUN` alone (it serves on
//!   the run's stored address; the workers, whose calls fail, register again with it).
//!
//! Needs root (`ip netns add`); where it is not allowed the test says so and passes without
//! running. The namespaces go when the test ends, however it ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

const STEPS: u64 = 12;
const PORT: u16 = 50051;
/// How long the partitioned worker's link stays down.
const PARTITION: Duration = Duration::from_secs(40);

/// Three namespaces: `ns[0]` holds the coordinator and the bridge (10.201.0.1), `ns[1]` and
/// `ns[2]` one worker each (10.201.0.2, 10.201.0.3). Deleted on drop, which also deletes the
/// veth pairs.
struct Hosts {
    ns: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Hosts {
    /// The three hosts, or why they cannot be made here.
    fn make() -> Result<Hosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        Self::remove_stale();
        let tag = format!("cxrclip-{}", std::process::id());
        let mut hosts = Hosts { ns: Vec::new() };
        for k in 0..3 {
            let name = format!("{tag}-{k}");
            ip(&["netns", "add", &name])?;
            hosts.ns.push(name);
        }
        let (hub, a, b) = (&hosts.ns[0], &hosts.ns[1], &hosts.ns[2]);
        for ns in &hosts.ns {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", hub, "addr", "add", "10.201.0.1/24", "dev", "br0"])?;
        ip(&["-n", hub, "link", "set", "br0", "up"])?;
        for (k, ns) in [(1, a), (2, b)] {
            let port = format!("port{k}");
            ip(&["-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            ip(&["-n", hub, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", hub, "link", "set", &port, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("10.201.0.{}/24", k + 1), "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    /// Namespaces a killed run of this test left behind (its process is gone).
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name.strip_prefix("cxrclip-").and_then(|r| r.split('-').next()) else { continue };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }

    /// `bin` with `args` inside namespace `k` (`ip netns exec` replaces itself with it: the pid
    /// is the program's).
    fn command(&self, k: usize, bin: &str, args: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[k]]).arg(bin_dir().join(bin)).args(args);
        c.stdin(std::process::Stdio::null());
        c
    }

    /// Takes worker `k`'s link down (`up` false) or brings it back, at the bridge's end.
    fn link(&self, k: usize, up: bool) {
        ip(&["-n", &self.ns[0], "link", "set", &format!("port{k}"), if up { "up" } else { "down" }]).expect("link");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Starts worker `k` (its namespace's one) logging to `log`.
type Start<'a> = dyn Fn(usize, &str) -> Spawned + 'a;

/// A run across the three hosts: the coordinator and both workers started; `fault` is applied
/// once the run is past its first checkpoint (with the run folder, the coordinator, the workers
/// and a way to start one again); then everything must end cleanly. Returns the losses and the
/// coordinator's log.
fn run_with(
    hosts: &Hosts,
    name: &str,
    fault: impl FnOnce(&Path, &mut Spawned, &mut [Spawned; 2], &Start<'_>),
) -> (Vec<(u64, f64)>, String) {
    let dir = fresh_dir(name);
    let run = dir.join("run");
    let mut args = remote_args(&run, 2, STEPS);
    args.extend(
        ["--listen", &format!("10.201.0.1:{PORT}"), "--heartbeat-timeout", "4", "--max-restarts", "5"]
            .map(String::from),
    );
    let (mut coord, url, token) = serve(hosts.command(0, "coordinator", &args), &run, &dir.join("coordinator.log"));
    assert_eq!(url, format!("http://10.201.0.1:{PORT}"));
    let start = |k: usize, log: &str| {
        let ring_host = format!("10.201.0.{}", k + 1);
        let args: Vec<String> = ["--coordinator", &url, "--ring-host", &ring_host, "--rejoin"]
            .into_iter()
            .chain(["--coordinator-timeout", "8", "--rejoin-timeout", "120"])
            .map(String::from)
            .collect();
        let mut cmd = hosts.command(k, "worker", &args);
        cmd.env("CXRCLIP_TOKEN", &token);
        Spawned::start(cmd, &dir.join(log))
    };
    let mut workers = [start(1, "worker1.log"), start(2, "worker2.log")];
    assert!(
        wait_for(Duration::from_secs(120), || losses(&run).len() >= 6 || !coord.running()),
        "the run did not reach step 6:\n{}",
        coord.text()
    );
    fault(&run, &mut coord, &mut workers, &start);
    let status = coord.wait(Duration::from_secs(240));
    let err = coord.text();
    assert!(status.success(), "{status}\n{err}");
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(30));
        assert!(status.success(), "a worker ended with {status}:\n{}\ncoordinator:\n{err}", w.text());
    }
    (losses(&run), err)
}

fn assert_same_losses(what: &str, got: &[(u64, f64)], want: &[(u64, f64)], log: &str) {
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{what}:\n{log}");
    for ((s, g), (_, w)) in got.iter().zip(want) {
        assert_close(&format!("{what}: loss of step {s}"), *g, *w, 1e-4);
    }
}

/// The rank the coordinator gave the worker of `pid` (from its "rank R joined ... (pid P)").
fn rank_of(log: &str, pid: u32) -> String {
    let line = log.lines().rev().find(|l| l.contains("joined from") && l.ends_with(&format!("(pid {pid})")));
    let line = line.unwrap_or_else(|| panic!("pid {pid} never joined:\n{log}"));
    line.split_whitespace().nth(2).expect("rank").to_string()
}

#[test]
fn a_partitioned_node_and_a_killed_worker_heal_by_themselves() {
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipping the network-namespace test: {why} (it needs root and `ip netns add`)");
            return;
        }
    };
    let _g = serial();
    let t0 = Instant::now();
    // The clean run: two local workers (the losses do not depend on where the ranks run).
    let clean = fresh_dir("netns-clean");
    run_ok(&train_args(&clean, 2, STEPS));
    let want = losses(&clean);

    // (a) Worker 1's link down for 40 s, then up.
    let t = Instant::now();
    let (got, log) = run_with(&hosts, "netns-partition", |_, _, _, _| {
        hosts.link(1, false);
        std::thread::sleep(PARTITION);
        hosts.link(1, true);
    });
    assert_same_losses("partition", &got, &want, &log);
    assert!(log.contains("sent no heartbeat") && log.contains("restarting from step"), "{log}");
    eprintln!("a {} s partition healed: the run took {:.1} s", PARTITION.as_secs(), t.elapsed().as_secs_f64());

    // (b) Worker 2 killed with SIGKILL and started again at once, as an operator's supervisor
    // (systemd, Slurm) would.
    let t = Instant::now();
    let mut killed = 0;
    let (got, log) = run_with(&hosts, "netns-kill", |_, _, workers, start| {
        killed = workers[1].pid();
        sigkill(killed);
        workers[1].wait(Duration::from_secs(10));
        workers[1] = start(2, "worker2-again.log");
    });
    assert_same_losses("kill", &got, &want, &log);
    // The failure is the killed rank's, whoever noticed it.
    let rank = rank_of(&log, killed);
    assert!(log.contains(&format!("rank {rank} was lost")) && log.contains("restarting from step"), "{log}");
    eprintln!("a killed worker healed: the run took {:.1} s", t.elapsed().as_secs_f64());

    // (c) The coordinator killed with SIGKILL and resumed with `--resume RUN` alone: it serves
    // where the run said (the stored --listen), and the workers find it and register again.
    let t = Instant::now();
    let (got, log) = run_with(&hosts, "netns-coordinator", |run, coord, _, _| {
        sigkill(coord.pid());
        coord.wait(Duration::from_secs(10));
        let resume = ["--resume".to_string(), run.to_string_lossy().into_owned()];
        let log = coord.log.clone();
        *coord = Spawned::start(hosts.command(0, "coordinator", &resume), &log);
    });
    assert_same_losses("coordinator killed", &got, &want, &log);
    let serving = format!("serving http://10.201.0.1:{PORT}");
    assert_eq!(log.matches(&serving).count(), 2, "{log}");
    eprintln!(
        "a killed and resumed coordinator healed: the run took {:.1} s; the whole test {:.1} s",
        t.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
