//! The coordinator's gRPC service (`cxrclip.v1.Coordinator`) and the state it shares with the
//! supervisor.
//!
//! Every call but registration carries a session (token, run id, rank, generation, and the
//! secret its registration was given) checked here: the token admits a worker, the secret ties
//! each later call to the rank it registered, so one worker (or anyone holding the token) cannot
//! speak for another. A message of an older generation (a worker of a job that was aborted) gets
//! an abort command or an error, never a say in the current job; reported steps must follow the
//! run's progress (the next step, a checkpoint where the run writes it). Bad input gets an error
//! status: a malformed or hostile message never takes the coordinator down.
//!
//! A registration waits for the rest of the world inside its call. While it waits it is not a
//! live rank (no heartbeat is expected); its slot is freed when its call ends without the world
//! (the worker died or its connection closed: the server drops the call), and the heartbeats
//! start counting for every rank when the world completes.

use std::fs;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use proto::tonic;
use proto::tonic::transport::{Identity, Server, ServerTlsConfig};
use proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use proto::v1::{
    Ack, Command, HeartbeatReply, HeartbeatRequest, Job, JobResult, NcclId, RegisterReply, RegisterRequest, ResultKind,
    Session, ShardChunk, ShardEntry, ShardRequest, StepMetrics,
};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::UnboundedSender;
use tonic::{Request, Response, Status, Streaming};

use super::index::Work;
use super::TrainArgs;

/// What the service tells the supervisor.
#[derive(Debug)]
pub enum Event {
    Registered {
        generation: u64,
        rank: usize,
        host: String,
        pid: u32,
    },
    /// A registrant whose call ended before its world was complete (it died, or its connection
    /// closed): its slot is free again.
    Left {
        generation: u64,
        rank: usize,
    },
    Metrics {
        generation: u64,
        m: StepMetrics,
    },
    Checkpoint {
        generation: u64,
        step: u64,
        path: String,
    },
    Done {
        generation: u64,
        rank: usize,
        loss: f64,
    },
    /// `permanent`: the worker says a restart cannot change it.
    /// `lost_peer`: the rank says it lost that peer (the failure is the peer's).
    Failed {
        generation: u64,
        rank: usize,
        message: String,
        permanent: bool,
        lost_peer: Option<usize>,
    },
    Validation {
        generation: u64,
        rank: usize,
        step: u64,
        path: String,
    },
}

pub struct Registration {
    pub ring_addr: String,
    /// The secret given to this registration: every later call for its rank carries it.
    pub secret: String,
    pub host: String,
    pub pid: u32,
}

pub struct Inner {
    pub generation: u64,
    /// Whether registrations are taken (false while restarting and after the run).
    pub open: bool,
    pub regs: Vec<Option<Registration>>,
    /// Whether the generation's world is complete (every rank registered): from then on a
    /// rank's heartbeats count, and a registrant's slot is no longer given back.
    pub complete: bool,
    /// When the generation stops waiting for its world (`--register-timeout` after its start).
    pub register_deadline: Instant,
    pub job: Job,
    pub command: Command,
    /// Each rank's last heartbeat, from the moment the world is complete.
    pub last_seen: Vec<Option<Instant>>,
    pub nccl_id: Option<Vec<u8>>,
    /// The last step whose metrics were taken in this generation (from its resume step).
    pub progress: u64,
    /// The last checkpoint reported in this generation (from its resume step).
    pub checkpointed: u64,
}

impl Inner {
    /// The registrations of the generation so far, for a line: "rank 0 from node2 (pid 12)".
    pub fn registered(&self) -> Vec<String> {
        self.regs
            .iter()
            .enumerate()
            .filter_map(|(k, r)| {
                r.as_ref().map(|r| format!("rank {k} from {} (pid {})", proto::printable(&r.host), r.pid))
            })
            .collect()
    }
}

pub struct Shared {
    pub token: String,
    pub run_id: String,
    pub world: usize,
    /// What the workers are fed (training pairs, or items to embed).
    pub work: Work,
    pub inner: Mutex<Inner>,
    pub events: UnboundedSender<Event>,
    /// How long a registration waits for the rest of the world.
    pub register_wait: Duration,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock must not wedge the whole run.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn token_ok(&self, token: &str) -> bool {
        // Constant time: the comparison takes as long whatever prefix matches.
        let (a, b) = (token.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }

    /// Checks a session: right token and run, a rank of the world, and in the current
    /// generation the secret of that rank's registration. Returns whether it belongs to the
    /// current generation (an older one's calls get an abort, never a say).
    pub(super) fn check(&self, s: Option<&Session>) -> Result<bool, Status> {
        let s = s.ok_or_else(|| Status::invalid_argument("missing session"))?;
        if !self.token_ok(&s.token) {
            return Err(Status::unauthenticated("wrong run token"));
        }
        if s.run_id != self.run_id {
            return Err(Status::unauthenticated("session of another run"));
        }
        if s.rank as usize >= self.world {
            return Err(Status::invalid_argument(format!("rank {} outside a world of {}", s.rank, self.world)));
        }
        let g = self.lock();
        if s.generation != g.generation {
            return Ok(false);
        }
        let own = g.regs[s.rank as usize].as_ref().is_some_and(|r| secret_eq(&r.secret, &s.secret));
        if !own {
            return Err(Status::unauthenticated(format!(
                "this session is not rank {}'s registration (no or wrong session secret)",
                s.rank
            )));
        }
        Ok(true)
    }

    /// Takes a metrics line of the current generation: rank 0's (the only one that sends
    /// them), of the run's next step, with a finite loss.
    pub(super) fn take_metrics(&self, m: &StepMetrics) -> Result<(), Status> {
        let (rank, generation) = m.session.as_ref().map_or((0, 0), |s| (s.rank, s.generation));
        if rank != 0 {
            return Err(Status::permission_denied("only rank 0 reports the step metrics"));
        }
        let mut g = self.lock();
        if g.generation != generation {
            return Err(stale());
        }
        if m.step != g.progress + 1 || m.step > g.job.steps {
            return Err(Status::invalid_argument(format!(
                "metrics of step {} refused: the run's next step is {} of {}",
                m.step,
                g.progress + 1,
                g.job.steps
            )));
        }
        if !m.loss.is_finite() {
            return Err(Status::invalid_argument(format!("metrics of step {} refused: a loss of {}", m.step, m.loss)));
        }
        g.progress = m.step;
        Ok(())
    }

    /// Checks a result of the current generation against the run: a checkpoint from rank 0,
    /// after the last one, at most the run's steps, in the folder the run writes it to; a
    /// validation part of a step of the run in its place; done at the run's last step.
    fn take_result(&self, r: &JobResult, rank: usize, generation: u64) -> Result<(), Status> {
        let mut g = self.lock();
        if g.generation != generation {
            return Err(stale());
        }
        let run_dir = std::path::PathBuf::from(&g.job.run_dir);
        let refuse = |what: &str| Err(Status::invalid_argument(format!("{what} refused")));
        match ResultKind::try_from(r.kind) {
            Ok(ResultKind::ResultCheckpoint) => {
                let want = worker::job::checkpoint_dir(&run_dir, r.step);
                if rank != 0 || r.step <= g.checkpointed || r.step > g.job.steps || r.path != want.to_string_lossy() {
                    return refuse(&format!(
                        "a checkpoint of step {} from rank {rank} (the last was step {} of {})",
                        r.step, g.checkpointed, g.job.steps
                    ));
                }
                g.checkpointed = r.step;
            }
            Ok(ResultKind::ResultValidation) => {
                let dir = run_dir.join("valid").join(format!("step-{:06}", r.step));
                if r.step > g.job.steps || r.path != worker::embed::part_path(&dir, rank).to_string_lossy() {
                    return refuse(&format!("a validation part of step {} from rank {rank}", r.step));
                }
            }
            Ok(ResultKind::ResultDone) if r.step != g.job.steps => {
                return refuse(&format!("done at step {} (the run has {})", r.step, g.job.steps));
            }
            Ok(ResultKind::ResultFailed) if r.lost_peer.is_some_and(|p| p as usize >= self.world) => {
                return refuse("a failure naming a rank outside the world");
            }
            _ => {}
        }
        Ok(())
    }
}

/// Compares two secrets in constant time.
fn secret_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A registration waiting for its world: when its call ends without the world (the worker died
/// or its connection closed, which drops the call; the generation's wait ran out), the slot is
/// given back, unless the world completed meanwhile or another generation began.
struct Waiting {
    shared: Arc<Shared>,
    generation: u64,
    rank: usize,
    secret: String,
    /// Cleared once the reply is on its way.
    armed: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.shared.lock();
        let mine = g.regs[self.rank].as_ref().is_some_and(|r| r.secret == self.secret);
        if g.generation == self.generation && !g.complete && mine {
            g.regs[self.rank] = None;
            drop(g);
            let _ = self.shared.events.send(Event::Left { generation: self.generation, rank: self.rank });
        }
    }
}

/// How long past the generation's registration deadline a registration waits before it gives
/// up by itself (the supervisor ends the wait at the deadline).
const REGISTER_GRACE: Duration = Duration::from_secs(5);

pub struct Service {
    pub shared: Arc<Shared>,
}

const MAX_FIELD: usize = 256;

fn stale() -> Status {
    Status::aborted("the job was restarted; this worker's generation is over")
}

type ShardStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ShardChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let r = req.into_inner();
        let sh = &self.shared;
        if r.protocol_version != proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this coordinator speaks cxrclip.v1 revision {}; use matching builds",
                r.protocol_version,
                proto::PROTOCOL_VERSION
            )));
        }
        if !sh.token_ok(&r.token) {
            return Err(Status::unauthenticated("wrong run token"));
        }
        if r.host.len() > MAX_FIELD || r.device.len() > MAX_FIELD || r.capabilities.len() > 64 {
            return Err(Status::invalid_argument("registration fields too long"));
        }
        if r.ring_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!("ring address '{}' is not host:port", r.ring_addr)));
        }
        let secret = super::folder::random_hex(16);
        let (generation, rank) = {
            let mut g = sh.lock();
            if !g.open {
                return Err(Status::unavailable("the run is not taking workers now (restarting or finished)"));
            }
            // A rank on the other backend would wait in collectives the rest never join.
            if r.device != g.job.device {
                return Err(Status::failed_precondition(format!(
                    "this run computes on {}; start the worker with --device {}",
                    g.job.device, g.job.device
                )));
            }
            let free = |k: usize| g.regs[k].is_none();
            let rank = match r.preferred_rank {
                p if p >= 0 && (p as usize) < sh.world && free(p as usize) => p as usize,
                p if p >= 0 && (p as usize) < sh.world => {
                    return Err(Status::already_exists(format!("rank {p} is taken")));
                }
                _ => (0..sh.world).find(|&k| free(k)).ok_or_else(|| {
                    Status::resource_exhausted(format!("the run already has its {} workers", sh.world))
                })?,
            };
            g.regs[rank] = Some(Registration {
                ring_addr: r.ring_addr.clone(),
                secret: secret.clone(),
                host: r.host.clone(),
                pid: r.pid,
            });
            if g.regs.iter().all(Option::is_some) {
                // The world is complete: from now on every rank's heartbeats count.
                g.complete = true;
                let now = Instant::now();
                g.last_seen.iter_mut().for_each(|t| *t = Some(now));
            }
            (g.generation, rank)
        };
        let _ = sh.events.send(Event::Registered { generation, rank, host: r.host.clone(), pid: r.pid });
        let mut waiting = Waiting { shared: sh.clone(), generation, rank, secret: secret.clone(), armed: true };
        // Wait for the rest of the world (polling keeps this simple and free of lost wake-ups).
        loop {
            {
                let g = sh.lock();
                if g.generation != generation {
                    return Err(stale());
                }
                if g.complete {
                    let peers =
                        g.regs.iter().map(|x| x.as_ref().map(|x| x.ring_addr.clone()).unwrap_or_default()).collect();
                    waiting.armed = false;
                    return Ok(Response::new(RegisterReply {
                        rank: rank as u32,
                        world_size: sh.world as u32,
                        run_id: sh.run_id.clone(),
                        generation,
                        peer_addrs: peers,
                        job: Some(g.job.clone()),
                        session_secret: secret,
                    }));
                }
                if !g.open {
                    return Err(Status::unavailable("the run stopped waiting for workers"));
                }
                if Instant::now() > g.register_deadline + REGISTER_GRACE {
                    return Err(Status::deadline_exceeded("the other workers did not register in time"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn put_nccl_id(&self, req: Request<NcclId>) -> Result<Response<Ack>, Status> {
        let r = req.into_inner();
        if !self.shared.check(r.session.as_ref())? {
            return Err(stale());
        }
        if r.session.as_ref().is_some_and(|s| s.rank != 0) || r.id.len() != 128 {
            return Err(Status::invalid_argument("only rank 0 publishes a 128-byte NCCL id"));
        }
        self.shared.lock().nccl_id = Some(r.id);
        Ok(Response::new(Ack {}))
    }

    async fn get_nccl_id(&self, req: Request<Session>) -> Result<Response<NcclId>, Status> {
        let s = req.into_inner();
        if !self.shared.check(Some(&s))? {
            return Err(stale());
        }
        let deadline = Instant::now() + self.shared.register_wait;
        loop {
            {
                let g = self.shared.lock();
                if g.generation != s.generation {
                    return Err(stale());
                }
                if let Some(id) = &g.nccl_id {
                    return Ok(Response::new(NcclId { session: None, id: id.clone() }));
                }
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded("rank 0 did not publish the NCCL id in time"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    type GetShardStream = ShardStream;

    async fn get_shard(&self, req: Request<ShardRequest>) -> Result<Response<ShardStream>, Status> {
        let r = req.into_inner();
        let s = r.session.as_ref();
        if !self.shared.check(s)? {
            return Err(stale());
        }
        let rank = s.map_or(0, |s| s.rank as usize);
        let (entries, spares) = if r.part.is_empty() {
            (self.shared.work.shard(r.epoch, rank, self.shared.world), self.shared.work.spares(r.epoch))
        } else {
            (self.shared.work.part(&r.part, rank, self.shared.world).map_err(Status::invalid_argument)?, Vec::new())
        };
        // The spares first, in a chunk of their own, then the entries in chunks of bounded size.
        let spares = ShardChunk { entries: Vec::new(), spares };
        let chunks: Vec<Result<ShardChunk, Status>> = std::iter::once(spares)
            .chain(shard_chunks(entries).into_iter().map(|entries| ShardChunk { entries, spares: Vec::new() }))
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let current = self.shared.check(r.session.as_ref())?;
        let mut g = self.shared.lock();
        let command = if current {
            let rank = r.session.as_ref().map_or(0, |s| s.rank as usize);
            g.last_seen[rank] = Some(Instant::now());
            g.command
        } else if g.command == Command::Shutdown {
            Command::Shutdown
        } else {
            Command::Abort
        };
        Ok(Response::new(HeartbeatReply { command: command as i32 }))
    }

    async fn stream_metrics(&self, req: Request<Streaming<StepMetrics>>) -> Result<Response<Ack>, Status> {
        let mut stream = req.into_inner();
        while let Some(m) = stream.message().await? {
            let generation = m.session.as_ref().map_or(0, |s| s.generation);
            if !self.shared.check(m.session.as_ref())? {
                return Err(stale());
            }
            self.shared.take_metrics(&m)?;
            let _ = self.shared.events.send(Event::Metrics { generation, m });
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_result(&self, req: Request<JobResult>) -> Result<Response<Ack>, Status> {
        let r = req.into_inner();
        if !self.shared.check(r.session.as_ref())? {
            return Err(stale());
        }
        let (generation, rank) = r.session.as_ref().map_or((0, 0), |s| (s.generation, s.rank as usize));
        if r.message.len() > 64 * 1024 || r.path.len() > 4096 {
            return Err(Status::invalid_argument("result fields too long"));
        }
        self.shared.take_result(&r, rank, generation)?;
        let ev = match ResultKind::try_from(r.kind) {
            Ok(ResultKind::ResultCheckpoint) => Event::Checkpoint { generation, step: r.step, path: r.path },
            Ok(ResultKind::ResultDone) => Event::Done { generation, rank, loss: r.final_loss },
            Ok(ResultKind::ResultFailed) => Event::Failed {
                generation,
                rank,
                message: r.message,
                permanent: r.permanent,
                lost_peer: r.lost_peer.map(|p| p as usize),
            },
            Ok(ResultKind::ResultValidation) => Event::Validation { generation, rank, step: r.step, path: r.path },
            _ => return Err(Status::invalid_argument("unknown result kind")),
        };
        let _ = self.shared.events.send(ev);
        Ok(Response::new(Ack {}))
    }
}

/// Text and path bytes per shard chunk: a quarter of the message bound, so that long reports
/// never make a chunk the worker must refuse.
const CHUNK_BYTES: usize = proto::MAX_MESSAGE_BYTES / 4;

/// `entries` cut into chunks of at most [`proto::SHARD_CHUNK`] entries and about [`CHUNK_BYTES`].
fn shard_chunks(entries: Vec<ShardEntry>) -> Vec<Vec<ShardEntry>> {
    let mut out = Vec::new();
    let (mut cur, mut bytes) = (Vec::new(), 0);
    for e in entries {
        let size = e.text.len() + e.image.len() + 2 * e.label_values.len() + 16;
        if !cur.is_empty() && (cur.len() == proto::SHARD_CHUNK || bytes + size > CHUNK_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Binds the server (TLS when asked) and serves in the background; returns its URL.
pub(super) async fn serve(a: &TrainArgs, shared: Arc<Shared>) -> anyhow::Result<String> {
    let addr: SocketAddr = a.listen.parse().map_err(|e| anyhow::anyhow!("--listen {}: {e}", a.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let mut builder = Server::builder();
    let tls = a.tls_cert.is_some();
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let c = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let k = fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(c, k)))?;
    } else if !bound.ip().is_loopback() {
        eprintln!("coordinator: warning: serving on {bound} without TLS; the run token travels in clear text");
    }
    let svc = CoordinatorServer::new(Service { shared })
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = builder
        .concurrency_limit_per_connection(64)
        // A connection whose pings go unanswered (a worker's host gone, a partition) is closed
        // within 20 s, which also ends a registration waiting on it.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc);
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            eprintln!("coordinator: the gRPC server stopped: {e}");
        }
    });
    let host = if bound.ip().is_unspecified() { "127.0.0.1".to_string() } else { bound.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("{}://{host}:{}", if tls { "https" } else { "http" }, bound.port()))
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    #[test]
    fn chunks_keep_order_and_stay_under_the_message_bound() {
        let long = "x".repeat(20_000);
        let entries: Vec<ShardEntry> = (0..3000u64)
            .map(|i| ShardEntry {
                pair_id: i,
                image: format!("files/p10/p100/s{i}/a.jpg"),
                text: if i % 3 == 0 { long.clone() } else { "short".into() },
                label_values: if i % 2 == 0 { vec![2; 14] } else { Vec::new() },
            })
            .collect();
        let chunks = shard_chunks(entries.clone());
        assert!(chunks.len() > 3000 / proto::SHARD_CHUNK);
        assert_eq!(chunks.concat(), entries);
        for c in &chunks {
            assert!(c.len() <= proto::SHARD_CHUNK);
            let msg = ShardChunk { entries: c.clone(), spares: Vec::new() };
            assert!(proto::prost::Message::encoded_len(&msg) < proto::MAX_MESSAGE_BYTES / 2);
        }
    }
}
