//! Property tests ("fuzzing" on stable Rust) of what the coordinator's gRPC service accepts:
//! every request type decoded from arbitrary bytes, and sequences of calls (registrations,
//! heartbeats, NCCL ids, shard requests, metrics, results) whose sessions carry the right or a
//! wrong token, run id, rank, generation and secret, with extreme steps, paths and strings.
//! Whatever arrives, a call returns a reply or a status, never panics; nothing without the
//! token and its registration's secret changes the run; the run's progress and last checkpoint
//! never pass its steps or go back.
//!
//! CI runs a modest number of cases; a long run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=20000 cargo test --release -p coordinator run::server_fuzz`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proto::prost::Message;
use proto::tonic::Request;
use proto::v1::coordinator_server::Coordinator;
use proto::v1::{
    Command, HeartbeatRequest, Job, JobResult, NcclId, RegisterRequest, ResultKind, Session, ShardRequest, StepMetrics,
};

use super::index::Work;
use super::server::{Inner, Service, Shared};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const RUN: &str = "run-fuzz";
const STEPS: u64 = 10;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn service(world: usize) -> (Service, tokio::sync::mpsc::UnboundedReceiver<super::server::Event>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { steps: STEPS, run_dir: "/nonexistent/run".into(), device: "cpu".into(), ..Job::default() };
    let shared = Arc::new(Shared {
        token: TOKEN.into(),
        run_id: RUN.into(),
        world,
        work: Work::Items(Vec::new()),
        inner: Mutex::new(Inner {
            generation: 0,
            open: true,
            regs: (0..world).map(|_| None).collect(),
            complete: false,
            register_deadline: Instant::now() + Duration::from_secs(60),
            job,
            command: Command::Continue,
            last_seen: vec![None; world],
            nccl_id: None,
            progress: 0,
            checkpointed: 0,
        }),
        events: tx,
        register_wait: Duration::from_millis(30),
    });
    (Service { shared }, rx)
}

/// Strings a hostile peer sends: empty, long, control characters, paths.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("\u{1b}[2J\u{1b}[31mforged\r\n".to_string()),
        Just("/nonexistent/run/checkpoints/step-000004".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("x".repeat(70_000)),
        any::<String>(),
    ]
}

/// Which token, run, secret a call carries.
#[derive(Debug, Clone)]
struct Who {
    token_ok: bool,
    run_ok: bool,
    rank: u32,
    generation: u64,
    /// 0: the secret its rank was given, 1: none, 2: another.
    secret: u8,
}

fn who() -> impl Strategy<Value = Who> {
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.9),
        prop_oneof![8 => 0u32..3, 1 => any::<u32>()],
        prop_oneof![8 => Just(0u64), 1 => Just(1), 1 => any::<u64>()],
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)],
    )
        .prop_map(|(token_ok, run_ok, rank, generation, secret)| Who {
            token_ok,
            run_ok,
            rank,
            generation,
            secret,
        })
}

#[derive(Debug, Clone)]
enum Call {
    Register { who: Who, host: String, ring: String, device: String, preferred: i32 },
    Heartbeat(Who),
    PutNccl(Who, usize),
    GetNccl(Who),
    Shard(Who, u64, String),
    Metrics(Who, u64, f64),
    Result(Who, i32, u64, String, String, Option<u32>),
}

fn call() -> impl Strategy<Value = Call> {
    let step = prop_oneof![0u64..=STEPS + 2, Just(u64::MAX), Just(1_000_000_000_000_000_000)];
    prop_oneof![
        3 => (who(), text(), prop_oneof![Just("127.0.0.1:9".to_string()), text()],
              prop_oneof![Just("cpu".to_string()), Just("cuda:0".to_string()), text()], -2i32..4)
            .prop_map(|(who, host, ring, device, preferred)| Call::Register { who, host, ring, device, preferred }),
        2 => who().prop_map(Call::Heartbeat),
        1 => (who(), prop_oneof![Just(128usize), 0usize..300]).prop_map(|(w, n)| Call::PutNccl(w, n)),
        1 => who().prop_map(Call::GetNccl),
        1 => (who(), any::<u64>(), text()).prop_map(|(w, e, p)| Call::Shard(w, e, p)),
        3 => (who(), step.clone(), prop_oneof![Just(1.5f64), Just(f64::NAN), Just(f64::INFINITY), any::<f64>()])
            .prop_map(|(w, s, l)| Call::Metrics(w, s, l)),
        3 => (who(), -1i32..7, step, text(), text(), prop::option::of(prop_oneof![0u32..3, any::<u32>()]))
            .prop_map(|(w, k, s, p, m, lost)| Call::Result(w, k, s, p, m, lost)),
    ]
}

/// The session a call carries, from the secrets handed out so far.
fn session(w: &Who, secrets: &[Option<String>]) -> Session {
    let own = secrets.get(w.rank as usize).cloned().flatten().unwrap_or_default();
    Session {
        token: if w.token_ok { TOKEN.into() } else { "wrong".into() },
        run_id: if w.run_ok { RUN.into() } else { "other".into() },
        rank: w.rank,
        generation: w.generation,
        secret: match w.secret {
            0 => own,
            1 => String::new(),
            _ => "f".repeat(32),
        },
    }
}

/// Whether a session may change the run: its token, run, generation and its rank's secret.
fn genuine(s: &Session, secrets: &[Option<String>]) -> bool {
    s.token == TOKEN
        && s.run_id == RUN
        && s.generation == 0
        && secrets.get(s.rank as usize).cloned().flatten().is_some_and(|own| own == s.secret)
}

async fn play(world: usize, calls: Vec<Call>) {
    let (svc, mut events) = service(world);
    let mut secrets: Vec<Option<String>> = vec![None; world];
    for c in calls {
        let before = {
            let g = svc.shared.lock();
            (g.progress, g.checkpointed)
        };
        let mut trusted = false;
        match c {
            Call::Register { who, host, ring, device, preferred } => {
                let req = RegisterRequest {
                    protocol_version: proto::PROTOCOL_VERSION,
                    token: if who.token_ok { TOKEN.into() } else { "wrong".into() },
                    host,
                    pid: 7,
                    device,
                    capabilities: Vec::new(),
                    ring_addr: ring,
                    preferred_rank: preferred,
                };
                // A world of more than one waits for its peers: the wait is cut short, as a
                // worker that dies while registering cuts it.
                match tokio::time::timeout(Duration::from_millis(40), svc.register(Request::new(req))).await {
                    Ok(Ok(reply)) => {
                        let r = reply.into_inner();
                        assert!(!r.session_secret.is_empty() && (r.rank as usize) < world);
                        secrets[r.rank as usize] = Some(r.session_secret);
                    }
                    Ok(Err(_)) => {}
                    Err(_) => {
                        // Still waiting when dropped: its slot is given back unless the world is
                        // complete, so a secret is known only from a reply.
                    }
                }
            }
            Call::Heartbeat(w) => {
                let s = session(&w, &secrets);
                let _ = svc.heartbeat(Request::new(HeartbeatRequest { session: Some(s), step: 3 })).await;
            }
            Call::PutNccl(w, n) => {
                let s = session(&w, &secrets);
                trusted = genuine(&s, &secrets);
                let r = svc.put_nccl_id(Request::new(NcclId { session: Some(s), id: vec![7; n] })).await;
                assert!(trusted || r.is_err(), "an NCCL id taken from a session that is not a registration's");
            }
            Call::GetNccl(w) => {
                let s = session(&w, &secrets);
                let _ = svc.get_nccl_id(Request::new(s)).await;
            }
            Call::Shard(w, epoch, part) => {
                let s = session(&w, &secrets);
                let _ = svc.get_shard(Request::new(ShardRequest { session: Some(s), epoch, part })).await;
            }
            Call::Metrics(w, step, loss) => {
                // The stream's per-message path: the session check, then the run's checks.
                let s = session(&w, &secrets);
                trusted = genuine(&s, &secrets);
                let m = StepMetrics { session: Some(s), step, loss, ..StepMetrics::default() };
                let ok = svc.shared.check(m.session.as_ref()).is_ok_and(|current| current)
                    && svc.shared.take_metrics(&m).is_ok();
                assert!(trusted || !ok, "metrics taken from a session that is not a registration's");
                if ok {
                    assert!(loss.is_finite() && step == before.0 + 1 && step <= STEPS, "metrics of step {step} taken");
                }
            }
            Call::Result(w, kind, step, path, message, lost_peer) => {
                let s = session(&w, &secrets);
                trusted = genuine(&s, &secrets);
                let r = JobResult {
                    session: Some(s),
                    kind,
                    step,
                    path,
                    message,
                    final_loss: 0.5,
                    permanent: false,
                    lost_peer,
                };
                let is_checkpoint = kind == ResultKind::ResultCheckpoint as i32;
                let ok = svc.report_result(Request::new(r)).await.is_ok();
                assert!(trusted || !ok, "a result taken from a session that is not a registration's");
                if ok && is_checkpoint {
                    assert!(step > before.1 && step <= STEPS, "a checkpoint of step {step} taken");
                }
            }
        }
        let g = svc.shared.lock();
        assert!(
            g.progress <= STEPS && g.checkpointed <= STEPS,
            "progress {} checkpoint {}",
            g.progress,
            g.checkpointed
        );
        assert!(g.progress >= before.0 && g.checkpointed >= before.1, "the run went back");
        let _ = trusted;
    }
    events.close();
}

/// Each request type decoded from arbitrary bytes.
fn decode_all(bytes: &[u8]) {
    let _ = RegisterRequest::decode(bytes);
    let _ = HeartbeatRequest::decode(bytes);
    let _ = NcclId::decode(bytes);
    let _ = Session::decode(bytes);
    let _ = ShardRequest::decode(bytes);
    let _ = StepMetrics::decode(bytes);
    let _ = JobResult::decode(bytes);
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn requests_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn call_sequences_never_panic_or_pass_the_run(world in 1usize..3, calls in prop::collection::vec(call(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(play(world, calls));
    }
}
