//! The worker's command line: one rank of a cxrclip run. Registers with the coordinator (with the run's token
//! from `CXRCLIP_TOKEN`), builds its communicator (a TCP ring on CPUs, NCCL on GPUs), runs the
//! job it is given, reports metrics and results, and heartbeats from a task of its own so that a
//! long step never looks dead.
//!
//! Exit status: 0 when the job is done or the run was shut down, 1 on an error, 3 when the
//! coordinator aborted the job (another worker died) and `--rejoin` was not given, 4 when the
//! coordinator stopped answering (without `--rejoin`). With `--rejoin` a worker registers again
//! instead, after an abort, a lost peer or a silent coordinator (`register`, retried for
//! `--rejoin-timeout` s).

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::comm::{self, OverHost, RingHello, TcpRing};
use crate::failure::{self, Permanent};
use crate::job::{self, Link};
use crate::{rpc, Device};
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use proto::tonic::transport::Channel;
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
    /// Survive a dead peer or a failed network: after an abort (another worker died), a lost
    /// peer or a coordinator that stopped answering, register again for the restarted job
    /// (trying for --rejoin-timeout s) instead of exiting: for workers started by hand on
    /// other nodes.
    #[arg(long)]
    pub rejoin: bool,
    /// Ask for this rank (defaults to SLURM_PROCID under Slurm).
    #[arg(long)]
    pub rank: Option<u32>,
    /// Seconds without an answer from the coordinator before giving up on the job (with
    /// --rejoin: before registering again).
    #[arg(long, default_value_t = 30)]
    pub coordinator_timeout: u64,
    /// With --rejoin: seconds to keep trying to register (the coordinator unreachable or
    /// restarting the job) before giving up.
    #[arg(long, default_value_t = 600)]
    pub rejoin_timeout: u64,
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

fn run(args: Args) -> Result<i32> {
    let token = std::env::var("CXRCLIP_TOKEN")
        .map_err(|_| anyhow!("CXRCLIP_TOKEN is not set: the worker needs the run's token"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
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
    let (mut client, reply) = rt.block_on(register(&args, req))?;
    let job = reply.job.clone().ok_or_else(|| anyhow!("the coordinator sent no job"))?;
    if let Some(n) = env_u32("SLURM_NTASKS") {
        if n != reply.world_size {
            eprintln!("worker: warning: SLURM_NTASKS is {n} but the run's world has {} ranks", reply.world_size);
        }
    }
    let session = Session {
        token,
        run_id: reply.run_id.clone(),
        rank: reply.rank,
        generation: reply.generation,
        secret: reply.session_secret.clone(),
    };
    spawn_heartbeat(&rt, client.clone(), session.clone(), args.rejoin, args.coordinator_timeout);

    let rank = reply.rank as usize;
    let world = reply.world_size as usize;
    let link = Link { client: client.clone(), session: session.clone(), handle: rt.handle().clone() };
    let result = match args.device {
        Device::Cpu => {
            let hello = RingHello { run: run_number(&reply.run_id), generation: reply.generation };
            TcpRing::connect(rank, listener, &reply.peer_addrs, hello, Duration::from_secs(600))
                .and_then(|ring| job::run(kernels::Cpu, &job, &mut OverHost::new(ring), &link))
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
            // Whether a restart can change it decides whether the coordinator retries, and a
            // lost peer is named so that the coordinator blames that rank, not this one.
            let permanent = failure::is_permanent(&e);
            let _ = link.report_failure(&format!("{e:#}"), permanent, failure::lost_peer(&e));
            if args.rejoin && !permanent {
                // The coordinator restarts the job (a peer died, the network failed): this rank
                // takes part in the restarted one.
                abort(reply.rank, true, &format!("{e:#}"), 1);
            }
            Err(e)
        }
    }
}

/// Registers with the coordinator and waits for the world; returns the channel and the reply.
/// With `--rejoin`, what may pass is tried again for up to `--rejoin-timeout` seconds, pausing
/// 0.5 s and doubling up to 5 s: the coordinator unreachable (a partition, a restart of its
/// own), restarting the job, its world still full of an old session. A refusal that cannot
/// change (the token, the protocol, the device, TLS) ends the worker at once.
async fn register(args: &Args, req: RegisterRequest) -> Result<(CoordinatorClient<Channel>, RegisterReply)> {
    let give_up = Instant::now() + Duration::from_secs(args.rejoin_timeout);
    let mut pause = Duration::from_millis(500);
    let mut said = String::new();
    loop {
        let connect_for = Duration::from_secs(args.coordinator_timeout);
        let why = match rpc::connect(&args.coordinator, args.tls_ca.as_deref(), connect_for).await {
            Ok(mut client) => match rpc::with_deadline(rpc::WORLD_DEADLINE, client.register(req.clone())).await {
                Ok(reply) => return Ok((client, reply.into_inner())),
                Err(s) => {
                    let text = rpc::explain(&args.coordinator, &s).await;
                    if !(args.rejoin && rpc::retryable(&s)) || text.contains("serves TLS") {
                        bail!("registration refused: {text}");
                    }
                    text
                }
            },
            Err(e) if args.rejoin && rpc::is_unreachable(&e) => format!("{e:#}"),
            Err(e) => return Err(e),
        };
        if Instant::now() + pause > give_up {
            bail!("not registered within {} s (--rejoin-timeout): {why}", args.rejoin_timeout);
        }
        if why != said {
            eprintln!("worker: not registered yet ({why}); trying again");
            said = why;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
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
        let req = NcclId { session: Some(session.clone()), id: id.clone() };
        rt.block_on(rpc::with_deadline(rpc::REPORT_DEADLINE, client.put_nccl_id(req)))
            .map_err(|s| anyhow!("publishing the NCCL id: {}", rpc::status_text(&s)))?;
        id
    } else {
        rt.block_on(rpc::with_deadline(rpc::WORLD_DEADLINE, client.get_nccl_id(session.clone())))
            .map_err(|s| anyhow!("fetching the NCCL id: {}", rpc::status_text(&s)))?
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

/// Heartbeats every second from the runtime's own thread, each call with a deadline; acts on
/// the coordinator's command. No answer for `timeout_s` seconds ends the job: the worker
/// registers again with `--rejoin` (the coordinator has restarted the job without it, or will
/// when it sees it again), and exits with status 4 without.
fn spawn_heartbeat(
    rt: &tokio::runtime::Runtime,
    mut client: CoordinatorClient<Channel>,
    session: Session,
    rejoin: bool,
    timeout_s: u64,
) {
    rt.spawn(async move {
        let mut last_ok = Instant::now();
        let deadline = rpc::HEARTBEAT_DEADLINE.min(Duration::from_secs(timeout_s.max(1)));
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let req = HeartbeatRequest { session: Some(session.clone()), step: 0 };
            match rpc::with_deadline(deadline, client.heartbeat(req)).await {
                Ok(r) => {
                    last_ok = Instant::now();
                    match Command::try_from(r.into_inner().command).unwrap_or(Command::Continue) {
                        Command::Continue => {}
                        Command::Shutdown => {
                            eprintln!("worker {}: the coordinator shut the run down", session.rank);
                            comm::abort_all();
                            std::process::exit(0);
                        }
                        Command::Abort => abort(session.rank, rejoin, "the coordinator aborted the job", 3),
                    }
                }
                Err(s) if s.code() == proto::tonic::Code::Unauthenticated => {
                    let why = format!("the coordinator no longer knows this worker: {}", rpc::status_text(&s));
                    abort(session.rank, rejoin, &why, 3);
                }
                Err(_) if last_ok.elapsed() > Duration::from_secs(timeout_s) => {
                    let why = format!("no answer from the coordinator for {timeout_s} s");
                    abort(session.rank, rejoin, &why, 4);
                }
                Err(_) => {}
            }
        }
    });
}

/// Stops this job at once, saying `why`: the process image is replaced (`rejoin`: the new image
/// registers again) or the process exits with status `code`, so no thread blocked in a
/// collective outlives the job.
fn abort(rank: u32, rejoin: bool, why: &str, code: i32) -> ! {
    comm::abort_all();
    if rejoin {
        eprintln!("worker {rank}: {why}; registering again");
        use std::os::unix::process::CommandExt;
        if let Ok(exe) = std::env::current_exe() {
            let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
            eprintln!("worker {rank}: cannot restart itself: {err}");
        }
        std::process::exit(code);
    }
    eprintln!("worker {rank}: {why}; exiting");
    std::process::exit(code);
}
