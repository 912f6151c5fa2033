//! Runs a job on its world and sees it to the end: serves it, starts the local workers, and
//! supervises them: metrics into `metrics.jsonl` and the progress bar, checkpoints recorded in
//! `run.json` (older ones pruned), and on a dead worker (exit, kill, heartbeat timeout, a
//! reported failure) every worker stopped and the job restarted from the last checkpoint, up to
//! `--max-restarts` times.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use proto::v1::{Command, Job};
use serde_json::json;
use worker::Device;

use super::folder::{checkpoint_dir, truncate_metrics, write_json_atomically, RunRecord};
use super::server::{serve, Event, Inner, Shared};
use super::{finetune, index, retention, Plan, TrainArgs};

/// How long a failure reported as the loss of a peer waits for that peer's own report or exit.
const LOST_PEER_GRACE: Duration = Duration::from_secs(1);

/// How a launched job ended (a failure past the restarts is an error).
pub enum Finished {
    Done(f64),
    Interrupted,
}

/// Called when every rank has written its validation part of a step: returns the line to add
/// to the metrics (e.g. the validation macro AUC).
pub type OnValidation<'a> = Box<dyn FnMut(u64, Vec<PathBuf>) -> Result<serde_json::Value> + Send + 'a>;

/// Serves `job` over `work` to the world `p` describes, starts the local workers, and
/// supervises them to the end: metrics into `metrics.jsonl` and the progress bar, checkpoints
/// into `record` (`run.json`), and on a dead worker every worker stopped and the job restarted
/// from the last checkpoint, up to `--max-restarts` times.
pub async fn launch(
    p: &Plan,
    run_dir: &Path,
    token: &str,
    job: Job,
    work: index::Work,
    record: &mut RunRecord,
    on_validation: Option<OnValidation<'_>>,
) -> Result<Finished> {
    let a = &p.args;
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        token: token.to_string(),
        run_id: p.run_id.clone(),
        world: p.world,
        work,
        inner: Mutex::new(Inner {
            generation: 0,
            open: false,
            regs: (0..p.world).map(|_| None).collect(),
            complete: false,
            register_deadline: Instant::now(),
            job: job.clone(),
            command: Command::Continue,
            last_seen: vec![None; p.world],
            nccl_id: None,
            progress: 0,
            checkpointed: 0,
        }),
        events: tx,
        register_wait: Duration::from_secs(a.register_timeout),
    });
    let url = serve(a, shared.clone()).await?;
    fs::write(run_dir.join("coordinator.url"), format!("{url}\n"))?;
    eprintln!(
        "coordinator: run {} in {}: {} steps of {} pairs ({} per epoch) on {} {} worker(s); serving {url}",
        p.run_id,
        run_dir.display(),
        p.steps,
        a.global_batch,
        job.steps_per_epoch * a.global_batch as u64,
        p.world,
        p.device
    );
    if !p.local {
        eprintln!("coordinator: waiting for {} workers: {}", p.world, join_command(p, run_dir, &url));
    }

    let bar = progress_bar(p.steps, p.last_checkpoint);
    let mut sup = Supervisor {
        p,
        shared: &shared,
        run_dir,
        token,
        url: &url,
        bar: &bar,
        children: Vec::new(),
        on_validation: None,
    };
    sup.on_validation = on_validation;
    let mut restarts = 0u32;
    let mut generation = 0u64;
    loop {
        generation += 1;
        sup.start_generation(generation, record.last_checkpoint, &job)?;
        let outcome = sup.watch(generation, &mut events, record).await?;
        match outcome {
            Outcome::Done(loss) => {
                shared.lock().command = Command::Shutdown;
                sup.reap(Duration::from_secs(10)).await;
                record.finished = true;
                write_json_atomically(&run_dir.join("run.json"), &*record)?;
                bar.finish_and_clear();
                return Ok(Finished::Done(loss));
            }
            Outcome::Interrupted => {
                {
                    let mut g = shared.lock();
                    g.command = Command::Shutdown;
                    g.open = false;
                }
                sup.reap(Duration::from_secs(5)).await;
                bar.abandon();
                return Ok(Finished::Interrupted);
            }
            Outcome::Unregistered(why) => {
                {
                    let mut g = shared.lock();
                    g.command = Command::Shutdown;
                    g.open = false;
                }
                // Long enough for the waiting registrations to be told why before the server goes.
                tokio::time::sleep(Duration::from_millis(300)).await;
                sup.kill_all().await;
                bar.abandon();
                bail!("{why}");
            }
            Outcome::Permanent(why) => {
                {
                    let mut g = shared.lock();
                    g.command = Command::Shutdown;
                    g.open = false;
                }
                sup.kill_all().await;
                bar.abandon();
                bail!(
                    "{why}; not restarted (a restart cannot change this); last checkpoint at step {}",
                    record.last_checkpoint
                );
            }
            Outcome::Failed(why) => {
                {
                    // A new generation: the old one's sessions turn stale and get an abort.
                    let mut g = shared.lock();
                    g.generation += 1;
                    g.open = false;
                    g.command = Command::Continue;
                }
                sup.kill_all().await;
                restarts += 1;
                if restarts > a.max_restarts {
                    bar.abandon();
                    bail!(
                        "{why}; gave up after {} restarts; last checkpoint at step {} (continue with --resume {})",
                        a.max_restarts,
                        record.last_checkpoint,
                        run_dir.display()
                    );
                }
                // (A full disk fails here too: the error keeps the failure that led to it.)
                truncate_metrics(&run_dir.join("metrics.jsonl"), record.last_checkpoint)
                    .with_context(|| format!("{why}; then, restarting"))?;
                bar.set_position(record.last_checkpoint);
                bar.suspend(|| {
                    eprintln!(
                        "coordinator: {why}; restarting from step {} ({restarts}/{})",
                        record.last_checkpoint, a.max_restarts
                    )
                });
            }
        }
    }
}

fn progress_bar(steps: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}

/// The command that starts one local worker: `--worker-bin` when given, else this very
/// executable in its `worker` role (so a fresh `cargo run -p coordinator` needs no separate
/// worker build, and a stale `worker` binary left beside it is never picked up by mistake).
fn worker_command(a: &TrainArgs) -> Result<Proc> {
    if let Some(p) = &a.worker_bin {
        ensure!(p.exists(), "--worker-bin {}: no such file", p.display());
        return Ok(Proc::new(p));
    }
    let exe = std::env::current_exe().context("finding the coordinator's own executable")?;
    let mut cmd = Proc::new(exe);
    cmd.arg("worker");
    Ok(cmd)
}

/// The command that joins a worker on another node to this run, with the flags that apply:
/// `--tls-ca` when the run serves TLS (the authority of `--tls-cert`; for a self-signed
/// certificate, the certificate itself), `--ring-host` for CPU ranks (their ring connects
/// directly between nodes), `--rejoin` so that the worker survives a restart.
fn join_command(p: &Plan, run_dir: &Path, url: &str) -> String {
    let mut cmd = format!("CXRCLIP_TOKEN=$(cat {}) worker --coordinator {url}", run_dir.join("token").display());
    if p.device == Device::Cuda {
        cmd.push_str(" --device cuda");
    }
    if let Some(cert) = &p.args.tls_cert {
        cmd.push_str(&format!(" --tls-ca {}", cert.display()));
    }
    if p.device == Device::Cpu && p.world > 1 {
        cmd.push_str(" --ring-host <that node's address>");
    }
    cmd.push_str(" --rejoin");
    cmd
}

enum Outcome {
    Done(f64),
    /// The generation's world did not complete within `--register-timeout`: the run stops.
    Unregistered(String),
    /// A dead, lost or stuck worker, or a failure it reported as retryable: restarted.
    Failed(String),
    /// A failure its worker says a restart cannot change: the run stops with it.
    Permanent(String),
    Interrupted,
}

struct Supervisor<'a> {
    p: &'a Plan,
    shared: &'a Arc<Shared>,
    run_dir: &'a Path,
    token: &'a str,
    url: &'a str,
    bar: &'a ProgressBar,
    /// Local workers of the current generation.
    children: Vec<Child>,
    on_validation: Option<OnValidation<'a>>,
}

impl<'a> Supervisor<'a> {
    fn start_generation(&mut self, generation: u64, from: u64, job: &Job) -> Result<()> {
        {
            let mut g = self.shared.lock();
            g.generation = generation;
            g.complete = false;
            g.register_deadline = Instant::now() + Duration::from_secs(self.p.args.register_timeout);
            g.progress = from;
            g.checkpointed = from;
            let mut job = job.clone();
            if from > 0 {
                job.resume_step = from;
                job.resume_dir = checkpoint_dir(self.run_dir, from).to_string_lossy().into_owned();
            }
            g.job = job;
            g.regs.iter_mut().for_each(|r| *r = None);
            g.last_seen.iter_mut().for_each(|t| *t = None);
            g.nccl_id = None;
            g.command = Command::Continue;
            g.open = true;
        }
        if !self.p.local {
            return Ok(());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Each worker gets its share of the cores (more would oversubscribe them): a CPU
        // worker's compute threads, and every worker's loader threads (worker::feed).
        let threads = (cores / self.p.world).max(1);
        for i in 0..self.p.world {
            let mut cmd = worker_command(&self.p.args)?;
            cmd.args(["--coordinator", self.url, "--device", self.p.device.name()])
                .env("CXRCLIP_TOKEN", self.token)
                .env("CXRCLIP_CORES", threads.to_string())
                .stdin(Stdio::null());
            // Local workers trust the certificate chain the coordinator serves (a self-signed
            // certificate is its own authority; a chain file that ends in its root works too).
            if let Some(cert) = &self.p.args.tls_cert {
                cmd.arg("--tls-ca").arg(cert);
            }
            if self.p.device == Device::Cuda {
                cmd.env("CUDA_VISIBLE_DEVICES", i.to_string());
            } else {
                cmd.env("RAYON_NUM_THREADS", threads.to_string());
            }
            // SAFETY: prctl is async-signal-safe; it makes the kernel kill the worker if the
            // coordinator dies, so no worker outlives its run.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().with_context(|| format!("starting worker {i}: {:?}", cmd.get_program()))?;
            self.children.push(child);
        }
        Ok(())
    }

    async fn watch(
        &mut self,
        generation: u64,
        events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
        record: &mut RunRecord,
    ) -> Result<Outcome> {
        let world = self.p.world;
        let mut done: HashSet<usize> = HashSet::new();
        // Validation parts of a step, by rank, until every rank's is in.
        let mut validation: std::collections::BTreeMap<u64, std::collections::BTreeMap<usize, PathBuf>> =
            std::collections::BTreeMap::new();
        let mut last_loss = f64::NAN;
        let mut pid_rank: Vec<(u32, usize)> = Vec::new();
        // A failure a rank reported as the loss of a peer: held for a moment, in case the peer's
        // own report or its exit says what happened to it.
        let mut lost: Option<(String, usize, Instant)> = None;
        let mut watchdog = StepWatchdog::new(self.p.args.step_timeout);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;
        let plain = !console_is_terminal();
        let every = (self.p.steps / 10).max(1);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(Outcome::Interrupted),
                ev = events.recv() => {
                    let Some(ev) = ev else { bail!("the gRPC service stopped") };
                    match ev {
                        Event::Registered { generation: g, rank, host, pid } if g == generation => {
                            pid_rank.push((pid, rank));
                            let host = proto::printable(&host);
                            self.bar.suspend(|| eprintln!("coordinator: rank {rank} joined from {host} (pid {pid})"));
                        }
                        Event::Left { generation: g, rank } if g == generation => {
                            pid_rank.retain(|(_, r)| *r != rank);
                            self.bar.suspend(|| {
                                eprintln!("coordinator: rank {rank} left before the run started (its registration ended); its slot is free")
                            });
                        }
                        Event::Metrics { generation: g, m } if g == generation => {
                            watchdog.stepped(m.step_seconds);
                            let line = json!({
                                "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                                "logit_scale": m.logit_scale, "images_per_s": m.images_per_s,
                                "step_seconds": m.step_seconds, "world": world, "generation": generation,
                                "rss_mb": m.rss_mb,
                            });
                            writeln!(metrics, "{line}")?;
                            metrics.flush()?;
                            self.bar.set_position(m.step);
                            self.bar.set_message(format!("loss {:.4}  {:.1} img/s", m.loss, m.images_per_s));
                            if plain && (m.step.is_multiple_of(every) || m.step == self.p.steps) {
                                eprintln!("step {}/{}  loss {:.4}  {:.1} img/s", m.step, self.p.steps, m.loss, m.images_per_s);
                            }
                        }
                        Event::Checkpoint { generation: g, step, path } if g == generation => {
                            watchdog.progressed();
                            record.last_checkpoint = step;
                            if plain {
                                eprintln!("coordinator: checkpoint {}", proto::printable(&path));
                            }
                            write_json_atomically(&self.run_dir.join("run.json"), record)?;
                            let best = finetune::Best::read(self.run_dir).map(|b| b.checkpoint);
                            let keep = self.p.args.keep_checkpoints;
                            if let Err(e) = retention::prune(self.run_dir, step, keep, best.as_deref()) {
                                // Disk hygiene only: the run goes on with the old checkpoints left.
                                self.bar.suspend(|| eprintln!("coordinator: removing old checkpoints: {e}"));
                            }
                        }
                        Event::Done { generation: g, rank, loss } if g == generation => {
                            done.insert(rank);
                            if rank == 0 { last_loss = loss; }
                            if done.len() == world { return Ok(Outcome::Done(last_loss)); }
                        }
                        Event::Failed { generation: g, rank, message, permanent, lost_peer } if g == generation => {
                            let message = proto::printable(&message);
                            match lost_peer {
                                // Another rank's failure seen from here: the peer's own report or
                                // exit, if it comes within a moment, says more.
                                Some(peer) if !permanent => {
                                    let why = format!("rank {peer} was lost (rank {rank}: {message})");
                                    lost.get_or_insert((why, peer, Instant::now() + LOST_PEER_GRACE));
                                }
                                _ => {
                                    let why = format!("rank {rank} failed: {message}");
                                    return Ok(if permanent { Outcome::Permanent(why) } else { Outcome::Failed(why) });
                                }
                            }
                        }
                        Event::Validation { generation: g, rank, step, path } if g == generation => {
                            watchdog.progressed();
                            let parts = validation.entry(step).or_default();
                            parts.insert(rank, PathBuf::from(path));
                            if parts.len() == world {
                                let paths = validation.remove(&step).unwrap_or_default().into_values().collect();
                                if let Some(hook) = self.on_validation.as_mut() {
                                    let line = hook(step, paths)?;
                                    writeln!(metrics, "{line}")?;
                                    metrics.flush()?;
                                    self.bar.suspend(|| eprintln!("coordinator: step {step}: {line}"));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    for c in &mut self.children {
                        if let Ok(Some(status)) = c.try_wait() {
                            let pid = c.id();
                            let rank = pid_rank.iter().find(|(p, _)| *p == pid).map(|(_, r)| *r);
                            let finished = rank.is_some_and(|r| done.contains(&r));
                            // A rank that reported a lost peer exits after its report: only the
                            // lost peer's own exit says more than that report.
                            let reporter = lost.as_ref().is_some_and(|(_, peer, _)| rank != Some(*peer));
                            if !(reporter || (status.success() && finished)) {
                                let who = rank.map_or(format!("worker pid {pid}"), |r| format!("rank {r} (pid {pid})"));
                                return Ok(Outcome::Failed(format!("{who} exited ({status})")));
                            }
                        }
                    }
                    if let Some((why, _, _)) = lost.take_if(|(_, _, until)| Instant::now() > *until) {
                        return Ok(Outcome::Failed(why));
                    }
                    if let Some(why) = watchdog.stuck() {
                        return Ok(Outcome::Failed(why));
                    }
                    let timeout = Duration::from_secs(self.p.args.heartbeat_timeout);
                    let g = self.shared.lock();
                    // Heartbeats count once the world is complete: a registrant waiting for its
                    // peers sends none and is not missing any.
                    for (rank, seen) in g.last_seen.iter().enumerate() {
                        if g.complete && seen.is_some_and(|t| t.elapsed() > timeout) && !done.contains(&rank) {
                            return Ok(Outcome::Failed(format!("rank {rank} sent no heartbeat for {} s", timeout.as_secs())));
                        }
                    }
                    if !g.complete && Instant::now() > g.register_deadline {
                        let came = g.registered();
                        let who = if came.is_empty() { "none came".to_string() } else { came.join(", ") };
                        return Ok(Outcome::Unregistered(format!(
                            "only {} of {world} workers registered within {} s ({who})",
                            came.len(),
                            self.p.args.register_timeout
                        )));
                    }
                }
            }
        }
    }

    /// Waits up to `grace` for the local workers to exit, then kills the rest.
    async fn reap(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.children.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_all().await;
    }

    async fn kill_all(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Catches a run whose ranks heartbeat but no longer step (a wedged GPU, a collective waiting
/// for a peer that will never come): armed by the generation's first step, it counts the time
/// since the last sign of progress (a step, a checkpoint, a validation part) against a limit.
struct StepWatchdog {
    /// `--step-timeout` (0: from the slowest step).
    fixed: Option<Duration>,
    slowest: f64,
    last: Option<Instant>,
}

/// The automatic limit: this many times the slowest step so far...
const STUCK_STEPS: f64 = 20.0;
/// ...and never less than this (a checkpoint or an epoch's validation takes longer than a step).
const STUCK_FLOOR: Duration = Duration::from_secs(300);

impl StepWatchdog {
    fn new(seconds: u64) -> Self {
        Self { fixed: (seconds > 0).then(|| Duration::from_secs(seconds)), slowest: 0.0, last: None }
    }

    fn stepped(&mut self, step_seconds: f64) {
        if step_seconds.is_finite() {
            self.slowest = self.slowest.max(step_seconds);
        }
        self.last = Some(Instant::now());
    }

    /// Progress that is not a step (only once the steps have begun).
    fn progressed(&mut self) {
        if self.last.is_some() {
            self.last = Some(Instant::now());
        }
    }

    fn limit(&self) -> Duration {
        self.fixed.unwrap_or_else(|| STUCK_FLOOR.max(Duration::from_secs_f64(STUCK_STEPS * self.slowest)))
    }

    /// Why the run counts as stuck, if it does.
    fn stuck(&self) -> Option<String> {
        let idle = self.last?.elapsed();
        (idle > self.limit()).then(|| {
            format!(
                "no step finished for {} s (the slowest took {:.1} s; --step-timeout): a rank is stuck while its heartbeat goes on",
                idle.as_secs(),
                self.slowest
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_waits_for_the_first_step_and_scales_with_the_slowest() {
        let mut w = StepWatchdog::new(0);
        assert!(w.stuck().is_none(), "not armed before the first step");
        w.progressed();
        assert!(w.last.is_none(), "a checkpoint before any step does not arm it");
        w.stepped(2.0);
        assert_eq!(w.limit(), STUCK_FLOOR);
        w.stepped(30.0);
        w.stepped(f64::NAN);
        assert_eq!(w.limit(), Duration::from_secs(600));
        let mut fixed = StepWatchdog::new(5);
        fixed.stepped(100.0);
        assert_eq!(fixed.limit(), Duration::from_secs(5));
        fixed.last = Some(Instant::now() - Duration::from_secs(6));
        let why = fixed.stuck().expect("stuck");
        assert!(why.contains("no step finished for 6 s"), "{why}");
    }
}
