//! Every call after registration is tied to its registration: the run's token alone does not let
//! anyone speak as a rank. A client written here registers as a run's only worker, then sends
//! what a forger with the token would (metrics, a checkpoint report, heartbeats without the
//! session's secret or with another one) and what a confused or hostile rank would (a step far
//! beyond the run, a step going back, a checkpoint where the run does not write one): all are
//! refused and none reaches `metrics.jsonl` or `run.json`. Strings it sends (its host name, a
//! failure message) are printed with their control characters escaped.

use std::time::Duration;

use e2e::*;
use proto::tonic::Code;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{HeartbeatRequest, JobResult, RegisterRequest, ResultKind, Session, StepMetrics};

#[test]
fn forged_and_out_of_step_reports_are_refused_and_network_strings_printed_escaped() {
    let _g = serial();
    let dir = fresh_dir("forged");
    let run = dir.join("run");
    let mut cmd = coordinator();
    cmd.args(remote_args(&run, 1, 4)).args(["--max-restarts", "0"]);
    let (mut coord, url, token) = serve(cmd, &run, &dir.join("coordinator.log"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut c = CoordinatorClient::connect(url.clone()).await.expect("connect");
        let reply = c
            .register(RegisterRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                token: token.clone(),
                host: "evil\u{1b}[2J\u{1b}[31mhost".into(),
                pid: 4242,
                device: "cpu".into(),
                capabilities: Vec::new(),
                ring_addr: "127.0.0.1:9".into(),
                preferred_rank: -1,
            })
            .await
            .expect("register")
            .into_inner();
        assert_eq!(reply.session_secret.len(), 32, "a 16-byte secret in hex");
        let session = |secret: &str| Session {
            token: token.clone(),
            run_id: reply.run_id.clone(),
            rank: 0,
            generation: reply.generation,
            secret: secret.to_string(),
        };
        let run_dir = reply.job.as_ref().expect("job").run_dir.clone();
        let metrics =
            |s: Session, step: u64, loss: f64| StepMetrics { session: Some(s), step, loss, ..Default::default() };
        let checkpoint = |s: Session, step: u64, path: String| JobResult {
            session: Some(s),
            kind: ResultKind::ResultCheckpoint as i32,
            step,
            path,
            ..Default::default()
        };
        let good_path = format!("{run_dir}/checkpoints/step-000004");

        // The token without the registration's secret (none, or another one): refused.
        for secret in ["", "00112233445566778899aabbccddeeff"] {
            let e = c.stream_metrics(tokio_stream::iter(vec![metrics(session(secret), 1, 2.0)])).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "metrics with secret {secret:?}: {e:?}");
            let e = c.report_result(checkpoint(session(secret), 4, good_path.clone())).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "checkpoint with secret {secret:?}: {e:?}");
            let e = c.heartbeat(HeartbeatRequest { session: Some(session(secret)), step: 0 }).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "heartbeat with secret {secret:?}: {e:?}");
        }

        // With the secret, the steps must follow the run.
        let own = || session(&reply.session_secret);
        c.heartbeat(HeartbeatRequest { session: Some(own()), step: 0 }).await.expect("own heartbeat");
        for (step, loss) in [(1_000_000_000_000_000_000u64, 2.0), (1, f64::NAN), (2, 2.0)] {
            let e = c.stream_metrics(tokio_stream::iter(vec![metrics(own(), step, loss)])).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "step {step}, loss {loss}: {e:?}");
        }
        c.stream_metrics(tokio_stream::iter(vec![metrics(own(), 1, 2.5)])).await.expect("step 1");
        let e = c.stream_metrics(tokio_stream::iter(vec![metrics(own(), 1, 2.4)])).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "step 1 again: {e:?}");
        for (step, path) in [
            (4, format!("{good_path}\u{1b}[31m")),
            (4, "/tmp/elsewhere".to_string()),
            (1_000_000, format!("{run_dir}/checkpoints/step-1000000")),
        ] {
            let e = c.report_result(checkpoint(own(), step, path)).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "checkpoint of step {step}: {e:?}");
        }

        // A failure message full of escapes: the run stops with it (marked permanent), printed
        // escaped.
        let failed = JobResult {
            session: Some(own()),
            kind: ResultKind::ResultFailed as i32,
            message: "boom \u{1b}[31mred\u{1b}[0m\r\ncoordinator: done".into(),
            permanent: true,
            ..Default::default()
        };
        c.report_result(failed).await.expect("failure report");
    });
    let status = coord.wait(Duration::from_secs(60));
    let err = coord.text();
    assert!(!status.success(), "{err}");
    assert!(!err.contains('\u{1b}') && !err.contains('\r'), "raw control characters printed:\n{err:?}");
    assert!(err.contains("joined from evil\\u{1b}[2J\\u{1b}[31mhost (pid 4242)"), "{err}");
    assert!(err.contains("rank 0 failed: boom \\u{1b}[31mred\\u{1b}[0m\\r\\ncoordinator: done"), "{err}");
    // Only the one step the registered rank reported in order is in the metrics; no checkpoint
    // was recorded.
    assert_eq!(losses(&run), [(1, 2.5)], "{err}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(record["last_checkpoint"], 0, "{record}");
}
