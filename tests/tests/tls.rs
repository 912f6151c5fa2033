//! The coordinator over TLS on loopback: a self-signed certificate made here, a short run whose
//! worker trusts it, and workers that do not (no CA, or another CA) refused with a clear message
//! while the run goes on.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use e2e::*;

const STEPS: u64 = 6;

/// A self-signed certificate for the loopback address, as (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("generating a certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// A worker that joins the run at `url` with the run's token and `extra` flags, to its end.
fn join(url: &str, token: &str, extra: &[&str]) -> Output {
    worker()
        .args(["--coordinator", url, "--coordinator-timeout", "5"])
        .args(extra)
        .env("CXRCLIP_TOKEN", token)
        .output()
        .expect("starting worker")
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).trim().to_string()
}

#[test]
fn a_run_over_tls_completes_and_workers_without_the_ca_are_refused() {
    let _g = serial();
    let dir = fresh_dir("tls");
    // After fresh_dir, which builds the binaries when they are stale.
    let t0 = Instant::now();
    let (cert, key) = self_signed();
    let (other_ca, _) = self_signed();
    let (cert_path, key_path, other_path) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("other-ca.pem"));
    std::fs::write(&cert_path, cert).expect("cert.pem");
    std::fs::write(&key_path, key).expect("key.pem");
    std::fs::write(&other_path, other_ca).expect("other-ca.pem");

    // The worker is started here rather than spawned by the coordinator: that is how a worker on
    // another node joins, and it is where a worker is handed (or not handed) the CA.
    let run_dir = dir.join("run");
    let mut args = train_args(&run_dir, 1, STEPS);
    let at = args.iter().position(|a| a == "--workers").expect("--workers in the test flags");
    args[at] = "--expect-workers".into();
    args.extend(["--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()].map(String::from));
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let mut coord = coordinator().args(&args).stderr(Stdio::piped()).spawn().expect("coordinator");
    let url_file = run_dir.join("coordinator.url");
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n'))),
        "the coordinator did not start serving"
    );
    let url = read_trimmed(&url_file);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let token = read_trimmed(&run_dir.join("token"));

    let good = {
        let (url, token, ca) = (url.clone(), token.clone(), cert_path.clone());
        std::thread::spawn(move || join(&url, &token, &["--tls-ca", ca.to_str().unwrap()]))
    };
    assert!(wait_for(Duration::from_secs(60), || !losses(&run_dir).is_empty()), "the run did not start over TLS");

    // The run's token does not get a worker past TLS: without the CA, or with another one, it
    // is refused at once and says why.
    for (what, extra, expect) in
        [("no CA", vec![], "--tls-ca"), ("another CA", vec!["--tls-ca", other_path.to_str().unwrap()], "certificate")]
    {
        let t = Instant::now();
        let out = join(&url, &token, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a worker with {what} was accepted: {err}");
        assert!(err.contains(expect), "a worker with {what} should mention {expect:?}: {err}");
        assert!(err.trim().lines().count() == 1, "a worker with {what} should say why in one line: {err}");
        assert!(t.elapsed() < Duration::from_secs(4), "a worker with {what} took {:?} to give up", t.elapsed());
    }

    // A plain http:// URL for a coordinator that serves TLS, or --tls-ca with one, is refused
    // in one line that says what to use.
    let plain = url.replacen("https://", "http://", 1);
    for (what, extra, expect) in [
        ("http:// to a TLS coordinator", vec![], "serves TLS: use https:// and --tls-ca"),
        ("--tls-ca with http://", vec!["--tls-ca", cert_path.to_str().unwrap()], "use https://"),
    ] {
        let t = Instant::now();
        let out = join(&plain, &token, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} was accepted: {err}");
        assert!(err.contains(expect), "{what} should say {expect:?}: {err}");
        assert!(err.trim().lines().count() == 1, "{what} should say why in one line: {err}");
        assert!(t.elapsed() < Duration::from_secs(4), "{what} took {:?} to give up", t.elapsed());
    }

    let out = good.join().expect("worker thread");
    assert!(out.status.success(), "the TLS worker failed: {}", String::from_utf8_lossy(&out.stderr));
    let status = wait_child(&mut coord, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(coord.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert!(status.success(), "{status}\n{err}");
    // The join command it printed has what a worker on another node needs.
    assert!(err.contains(&format!("--tls-ca {} --rejoin", cert_path.display())), "{err}");
    assert_eq!(losses(&run_dir).iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{err}");
    eprintln!("tls run: {:.1} s", t0.elapsed().as_secs_f64());
}
