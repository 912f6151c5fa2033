//! The coordinator's gRPC service (`cxrclip.v1.Coordinator`) and the state it shares with the
//! supervisor.
//!
//! Every call but registration carries a session (token, run id, rank, generation) checked
//! here; a message of an older generation (a worker of a job that was aborted) gets an abort
//! command or an error, never a say in the current job. Bad input gets an error status: a
//! malformed or hostile message never takes the coordinator down.

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
    Failed {
        generation: u64,
        rank: usize,
        message: String,
        permanent: bool,
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
}

pub struct Inner {
    pub generation: u64,
    /// Whether registrations are taken (false while restarting and after the run).
    pub open: bool,
    pub regs: Vec<Option<Registration>>,
    pub job: Job,
    pub command: Command,
    pub last_seen: Vec<Option<Instant>>,
    pub nccl_id: Option<Vec<u8>>,
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

    /// Checks a session: right token and run, a registered rank. Returns whether it belongs to
    /// the current generation.
    fn check(&self, s: Option<&Session>) -> Result<bool, Status> {
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
        Ok(s.generation == self.lock().generation)
    }
}

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
            g.regs[rank] = Some(Registration { ring_addr: r.ring_addr.clone() });
            g.last_seen[rank] = Some(Instant::now());
            (g.generation, rank)
        };
        let _ = sh.events.send(Event::Registered { generation, rank, host: r.host.clone(), pid: r.pid });
        // Wait for the rest of the world (polling keeps this simple and free of lost wake-ups).
        let deadline = Instant::now() + sh.register_wait;
        loop {
            {
                let g = sh.lock();
                if g.generation != generation {
                    return Err(stale());
                }
                if g.regs.iter().all(Option::is_some) {
                    let peers =
                        g.regs.iter().map(|x| x.as_ref().map(|x| x.ring_addr.clone()).unwrap_or_default()).collect();
                    return Ok(Response::new(RegisterReply {
                        rank: rank as u32,
                        world_size: sh.world as u32,
                        run_id: sh.run_id.clone(),
                        generation,
                        peer_addrs: peers,
                        job: Some(g.job.clone()),
                    }));
                }
            }
            if Instant::now() > deadline {
                let mut g = sh.lock();
                if g.generation == generation {
                    g.regs[rank] = None;
                }
                return Err(Status::deadline_exceeded("the other workers did not register in time"));
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
        let ev = match ResultKind::try_from(r.kind) {
            Ok(ResultKind::ResultCheckpoint) => Event::Checkpoint { generation, step: r.step, path: r.path },
            Ok(ResultKind::ResultDone) => Event::Done { generation, rank, loss: r.final_loss },
            Ok(ResultKind::ResultFailed) => {
                Event::Failed { generation, rank, message: r.message, permanent: r.permanent }
            }
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
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
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
