//! The worker's command line: one rank of a cxrclip run. Registers with the coordinator (with the run's token
//! from `CXRCLIP_TOKEN`), builds its communicator (a TCP ring on CPUs, NCCL on GPUs), runs the
//! job it is given, reports metrics and results, and heartbeats from a task of its own so that a
//! long step never looks dead.
//!
//! Exit status: 0 when the job is done or the run was shut down, 1 on an error, 3 when the
//! coordinator aborted the job (another worker died) and `--rejoin` was not given, 4 when the
//! coordinator stopped answering.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::comm::{self, OverHost, RingHello, TcpRing};
use crate::failure::{self, Permanent};
use crate::job::{self, Link};
use crate::Device;
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use proto::tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{Command, HeartbeatRequest, NcclId, RegisterReply, RegisterRequest, ResultKind, Session};

/// The worker's options. The `worker` binary parses them from its command line; the
/// `coordinator worker` subcommand takes the same ones, so that a single binary can run both
/// roles (a fresh `cargo run -p coordinator` needs no separate worker build).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "worker",
    version,
    about = "One rank of a cxrclip run (started by the coordinator, or by hand on other nodes)"
)]
pub struct Args {
    /// The coordinator's URL, e.g. http://10.0.0.1:50051 (https:// with --tls-ca).
    #[arg(long)]
    pub coordinator: String,
    /// cpu, or cuda (the GPU is CUDA_VISIBLE_DEVICES' first, or SLURM_LOCALID's).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Address other ranks reach this one at for the CPU ring (its port is chosen freely).
    #[arg(long, default_value = "127.0.0.1")]
    pub ring_host: String,
    /// PEM certificate of the authority that signed the coordinator's TLS certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// After an abort (another worker died), register again for the restarted job instead of
    /// exiting: for workers started by hand on other nodes.
    #[arg(long)]
    pub rejoin: bool,
    /// Ask for this rank (defaults to SLURM_PROCID under Slurm).
    #[arg(long)]
    pub rank: Option<u32>,
    /// Seconds without an answer from the coordinator before giving up.
    #[arg(long, default_value_t = 30)]
    pub coordinator_timeout: u64,
}

const HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs one rank with `args`; returns the process exit status (see the module note).
pub fn main_with(args: Args) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("worker: error: {e:#}");
            1
        }
    }
}

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

async fn connect(args: &Args) -> Result<CoordinatorClient<Channel>> {
    let mut ep = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| anyhow!("--coordinator {}: {e}", args.coordinator))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        ep = ep.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    } else if args.coordinator.starts_with("https://") {
        // No system roots are compiled in, so this could only fail later as "transport error".
        bail!(
            "the coordinator at {} serves TLS: give the certificate of the authority that signed its \
             certificate with --tls-ca",
            args.coordinator
        );
    }
    // The coordinator may still be starting: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(args.coordinator_timeout);
    let channel = loop {
        match ep.connect().await {
            Ok(c) => break c,
            // A failed TLS handshake (the certificate is not trusted, or the coordinator does not
            // speak TLS) will fail the same way on every try: say why now.
            Err(e) if is_tls_failure(&e) => {
                bail!("TLS with the coordinator at {} failed: {}", args.coordinator, error_chain(&e))
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => bail!("cannot reach the coordinator at {}: {}", args.coordinator, error_chain(&e)),
        }
    };
    Ok(CoordinatorClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES))
}

/// An error and its sources, "a: b: c" (tonic's own text is only "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Whether a connection failed in the TLS handshake: the TLS stack reports its errors (an
/// untrusted certificate, a peer that is not TLS) as I/O errors of kind `InvalidData`, while a
/// coordinator that is not up yet gives `ConnectionRefused`.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData) {
            return true;
        }
        cur = err.source();
    }
    false
}

fn run(args: Args) -> Result<i32> {
    let token = std::env::var("CXRCLIP_TOKEN")
        .map_err(|_| anyhow!("CXRCLIP_TOKEN is not set: the worker needs the run's token"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut client = rt.block_on(connect(&args))?;
    let listener = TcpListener::bind((args.ring_host.as_str(), 0))
        .with_context(|| format!("binding the ring listener on {}", args.ring_host))?;
    let ring_addr = listener.local_addr()?.to_string();
    let preferred = args.rank.or_else(|| env_u32("SLURM_PROCID")).map_or(-1, |r| r as i32);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let req = RegisterRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        token: token.clone(),
        host,
        pid: std::process::id(),
        device: args.device.name().into(),
        capabilities: vec![
            "cls-train".into(),
            "finetune".into(),
            "embed".into(),
            match args.device {
                Device::Cpu => "tcp-ring",
                Device::Cuda => "nccl",
            }
            .into(),
        ],
        ring_addr,
        preferred_rank: preferred,
    };
    let reply: RegisterReply =
        rt.block_on(client.register(req)).map_err(|s| anyhow!("registration refused: {}", s.message()))?.into_inner();
    let job = reply.job.clone().ok_or_else(|| anyhow!("the coordinator sent no job"))?;
    if let Some(n) = env_u32("SLURM_NTASKS") {
        if n != reply.world_size {
            eprintln!("worker: warning: SLURM_NTASKS is {n} but the run's world has {} ranks", reply.world_size);
        }
    }
    let session = Session { token, run_id: reply.run_id.clone(), rank: reply.rank, generation: reply.generation };
    spawn_heartbeat(&rt, client.clone(), session.clone(), args.rejoin, args.coordinator_timeout);

    let rank = reply.rank as usize;
    let world = reply.world_size as usize;
    let link = Link { client: client.clone(), session: session.clone(), handle: rt.handle().clone() };
    let result = match args.device {
        Device::Cpu => {
            let hello = RingHello { run: run_number(&reply.run_id), generation: reply.generation };
            let ring = TcpRing::connect(rank, listener, &reply.peer_addrs, hello, Duration::from_secs(600))?;
            job::run(kernels::Cpu, &job, &mut OverHost::new(ring), &link)
        }
        Device::Cuda => train_cuda(&rt, &mut client, &session, rank, world, &job, &link),
    };
    match result {
        Ok(loss) => {
            link.report(ResultKind::ResultDone, job.steps, "", "", loss as f64)?;
            Ok(0)
        }
        Err(e) => {
            // Tell the coordinator why, so that its log says more than "exited with 1".
            // Whether a restart can change it decides whether the coordinator retries.
            let _ = link.report_failure(&format!("{e:#}"), failure::is_permanent(&e));
            Err(e)
        }
    }
}

/// A number naming the run, for the ring's greeting (FNV-1a of its id).
fn run_number(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn train_cuda(
    rt: &tokio::runtime::Runtime,
    client: &mut CoordinatorClient<Channel>,
    session: &Session,
    rank: usize,
    world: usize,
    job: &proto::v1::Job,
    link: &Link,
) -> Result<f32> {
    comm::nccl_library().context("--device cuda").context(Permanent("this worker cannot use its GPU"))?;
    let ordinal = if std::env::var_os("CUDA_VISIBLE_DEVICES").is_some() {
        0
    } else {
        env_u32("SLURM_LOCALID").unwrap_or(0) as usize
    };
    let id = if rank == 0 {
        let id = comm::nccl::unique_id()?;
        rt.block_on(client.put_nccl_id(NcclId { session: Some(session.clone()), id: id.clone() }))
            .map_err(|s| anyhow!("publishing the NCCL id: {}", s.message()))?;
        id
    } else {
        rt.block_on(client.get_nccl_id(session.clone()))
            .map_err(|s| anyhow!("fetching the NCCL id: {}", s.message()))?
            .into_inner()
            .id
    };
    let mut nccl = comm::NcclComm::new(ordinal, rank, world, &id)?;
    let be = kernels::Cuda::new(ordinal).context(Permanent("this worker cannot use its GPU"))?;
    let r = job::run(be, job, &mut nccl, link);
    // Only a rank that finished waits for the others: a failed one returns at once, so that
    // its report reaches the coordinator (which aborts the others) instead of it sitting in a
    // collective its peers never enter.
    if r.is_ok() {
        nccl.barrier()?;
    }
    r
}

/// Heartbeats every second from the runtime's own thread; acts on the coordinator's command.
fn spawn_heartbeat(
    rt: &tokio::runtime::Runtime,
    mut client: CoordinatorClient<Channel>,
    session: Session,
    rejoin: bool,
    timeout_s: u64,
) {
    rt.spawn(async move {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let req = HeartbeatRequest { session: Some(session.clone()), step: 0 };
            match client.heartbeat(req).await {
                Ok(r) => {
                    last_ok = Instant::now();
                    match Command::try_from(r.into_inner().command).unwrap_or(Command::Continue) {
                        Command::Continue => {}
                        Command::Shutdown => {
                            eprintln!("worker {}: the coordinator shut the run down", session.rank);
                            comm::abort_all();
                            std::process::exit(0);
                        }
                        Command::Abort => abort(session.rank, rejoin),
                    }
                }
                Err(s) if s.code() == proto::tonic::Code::Unauthenticated => {
                    eprintln!("worker {}: the coordinator no longer knows this worker: {}", session.rank, s.message());
                    abort(session.rank, rejoin);
                }
                Err(_) if last_ok.elapsed() > Duration::from_secs(timeout_s) => {
                    eprintln!("worker {}: no answer from the coordinator for {timeout_s} s; exiting", session.rank);
                    comm::abort_all();
                    std::process::exit(4);
                }
                Err(_) => {}
            }
        }
    });
}

/// Stops this job at once: the process image is replaced (rejoining) or the process exits, so
/// no thread blocked in a collective outlives the job.
fn abort(rank: u32, rejoin: bool) -> ! {
    comm::abort_all();
    if rejoin {
        eprintln!("worker {rank}: job aborted; registering again");
        use std::os::unix::process::CommandExt;
        if let Ok(exe) = std::env::current_exe() {
            let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
            eprintln!("worker {rank}: cannot restart itself: {err}");
        }
        std::process::exit(3);
    }
    eprintln!("worker {rank}: job aborted by the coordinator");
    std::process::exit(3);
}
