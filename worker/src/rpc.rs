//! The worker's side of the gRPC connection: the channel (TLS when asked, HTTP/2 keep-alive so a
//! dead link is noticed in seconds), a deadline on every unary call, and the errors a worker can
//! retry told apart from the ones it cannot.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use proto::tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use proto::tonic::{Code, Status};
use proto::v1::coordinator_client::CoordinatorClient;

/// Deadlines of the calls (a partitioned link must turn into an error, never a call that
/// hangs until the link is back): a heartbeat...
pub const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(5);
/// ...a result report (a checkpoint, done, a failure) or the NCCL id published...
pub const REPORT_DEADLINE: Duration = Duration::from_secs(30);
/// ...an epoch's shard, streamed in chunks...
pub const SHARD_DEADLINE: Duration = Duration::from_secs(120);
/// ...and the calls that wait for the rest of the world: registration (the coordinator ends its
/// own wait at `--register-timeout`, 300 s by default) and rank 0's NCCL id.
pub const WORLD_DEADLINE: Duration = Duration::from_secs(900);

/// HTTP/2 pings on an idle or busy channel: a connection whose pings go unanswered this long
/// is closed and the next call connects again (the metrics stream, which lives as long as the
/// job, has no deadline of its own and relies on this).
const KEEPALIVE: Duration = Duration::from_secs(5);

/// `call` with `deadline`: past it, a `DEADLINE_EXCEEDED` status (the call is dropped, which
/// resets its stream).
pub async fn with_deadline<T>(deadline: Duration, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} s", deadline.as_secs()))),
    }
}

/// The text of a status from the coordinator, fit to print (see [`proto::printable`]).
pub fn status_text(s: &Status) -> String {
    proto::printable(s.message()).into_owned()
}

/// Whether a refused or failed call may succeed when tried again: the run is restarting, the
/// world is full or a rank taken until an old session goes, the link or the coordinator is down.
/// A wrong token, another protocol revision or device, a malformed request never will.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::AlreadyExists
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// The channel to the coordinator at `url`, retrying for `timeout` while it does not answer
/// (it may still be starting). `tls_ca`: the authority of the coordinator's certificate.
pub async fn connect(
    url: &str,
    tls_ca: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<CoordinatorClient<Channel>> {
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow!("--coordinator {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true);
    let tls = url.starts_with("https://");
    match (tls_ca, tls) {
        (Some(ca), true) => {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            ep = ep.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
        }
        (Some(_), false) => bail!(
            "--tls-ca is for a coordinator that serves TLS, but --coordinator {url} is plain http://: \
             use https:// (or leave --tls-ca out)"
        ),
        // No system roots are compiled in, so this could only fail later as "transport error".
        (None, true) => bail!(
            "the coordinator at {url} serves TLS: give the certificate of the authority that signed its \
             certificate with --tls-ca"
        ),
        (None, false) => {}
    }
    let deadline = Instant::now() + timeout;
    let channel = loop {
        match ep.connect().await {
            Ok(c) => break c,
            // A failed TLS handshake (the certificate is not trusted, or the coordinator does not
            // speak TLS) will fail the same way on every try: say why now.
            Err(e) if is_tls_failure(&e) => {
                bail!("TLS with the coordinator at {url} failed: {}", error_chain(&e))
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => {
                let why = format!("cannot reach the coordinator at {url}: {}", error_chain(&e));
                return Err(anyhow::Error::new(Unreachable(why)));
            }
        }
    };
    Ok(CoordinatorClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES))
}

/// The coordinator did not answer a connection (down, restarting, or a partition between):
/// a `--rejoin` worker tries again, where a refusal (TLS, a bad URL) ends it.
#[derive(Debug)]
pub struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Whether connecting failed only because the coordinator did not answer.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
}

/// When a plain `http://` call to `url` failed in transport: whether the coordinator there serves
/// TLS. It is asked directly: a TLS server answers the HTTP/2 preface with a TLS alert record
/// (content type 21, version 3.x) where an HTTP/2 server sends its settings.
pub async fn serves_tls(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(authority) = url.strip_prefix("http://").map(|r| r.split('/').next().unwrap_or(r)) else {
        return false;
    };
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.ok()?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.ok()?;
        Some(head[0] == 0x15 && head[1] == 0x03)
    };
    tokio::time::timeout(Duration::from_secs(3), probe).await.ok().flatten().unwrap_or(false)
}

/// The line for a call to `url` that failed with `s`: a plain `http://` URL whose coordinator
/// serves TLS says so (tonic's own text is only "transport error").
pub async fn explain(url: &str, s: &Status) -> String {
    if matches!(s.code(), Code::Unknown | Code::Unavailable | Code::Internal) && serves_tls(url).await {
        return format!("the coordinator at {url} serves TLS: use https:// and --tls-ca");
    }
    status_text(s)
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
    proto::printable(&parts.join(": ")).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_deadline_is_an_error_not_a_hang() {
        let t = Instant::now();
        let never = std::future::pending::<Result<(), Status>>();
        let e = with_deadline(Duration::from_millis(50), never).await.unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn refusals_that_cannot_change_are_not_retried() {
        assert!(retryable(&Status::unavailable("the run is not taking workers now")));
        assert!(retryable(&Status::resource_exhausted("the run already has its 2 workers")));
        assert!(!retryable(&Status::unauthenticated("wrong run token")));
        assert!(!retryable(&Status::failed_precondition("this run computes on cuda")));
        assert!(!retryable(&Status::invalid_argument("ring address")));
    }

    #[tokio::test]
    async fn tls_with_a_plain_url_is_refused() {
        let e = connect("http://127.0.0.1:1", Some(std::path::Path::new("/nonexistent.pem")), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("use https://"), "{e}");
    }
}
