//! Registration of workers started by hand (`--expect-workers`): a worker that registered and
//! waits for its peers is not a dead worker, a world that never completes says who came, and a
//! worker killed while it waits gives its slot back at once.

use std::time::{Duration, Instant};

use e2e::*;

const STEPS: u64 = 4;

/// A worker that registered and waits (for longer than several heartbeat timeouts) for the
/// second one: no heartbeat is missed, no restart is spent, and the run finishes.
#[test]
fn a_registered_worker_waiting_for_its_peers_is_not_counted_dead() {
    let _g = serial();
    let dir = fresh_dir("slow-peers");
    let run = dir.join("run");
    let mut cmd = coordinator();
    cmd.args(remote_args(&run, 2, STEPS)).args(["--heartbeat-timeout", "2", "--max-restarts", "0"]);
    let (mut coord, url, token) = serve(cmd, &run, &dir.join("coordinator.log"));
    let mut first = join(&url, &token, &["--rejoin"], &dir.join("first.log"));
    assert!(wait_for(Duration::from_secs(30), || coord.text().contains("rank 0 joined")), "{}", coord.text());
    // More than three heartbeat timeouts while the first worker waits in registration.
    std::thread::sleep(Duration::from_secs(7));
    assert!(coord.running(), "the coordinator gave up on a waiting worker:\n{}", coord.text());
    let mut second = join(&url, &token, &[], &dir.join("second.log"));
    for w in [&mut first, &mut second] {
        let status = w.wait(Duration::from_secs(120));
        assert!(status.success(), "{status}\n{}\ncoordinator:\n{}", w.text(), coord.text());
    }
    let status = coord.wait(Duration::from_secs(60));
    let err = coord.text();
    assert!(status.success(), "{status}\n{err}");
    assert!(!err.contains("sent no heartbeat") && !err.contains("restarting"), "{err}");
    assert_eq!(losses(&run).iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{err}");
}

/// A world that does not complete within `--register-timeout` ends the run with the real count
/// and who came, never with a heartbeat missed by a worker held in registration.
#[test]
fn a_world_that_never_completes_says_who_registered() {
    let _g = serial();
    let dir = fresh_dir("short-world");
    let run = dir.join("run");
    let mut cmd = coordinator();
    cmd.args(remote_args(&run, 2, STEPS)).args(["--heartbeat-timeout", "1", "--register-timeout", "5"]);
    let (mut coord, url, token) = serve(cmd, &run, &dir.join("coordinator.log"));
    let mut lone = join(&url, &token, &[], &dir.join("lone.log"));
    let status = coord.wait(Duration::from_secs(60));
    let err = coord.text();
    assert!(!status.success(), "{err}");
    assert!(err.contains("only 1 of 2 workers registered within 5 s (rank 0 from "), "{err}");
    assert!(!err.contains("sent no heartbeat") && !err.contains("restarting"), "{err}");
    // The waiting worker is told, and stops.
    let status = lone.wait(Duration::from_secs(30));
    assert!(!status.success(), "{}", lone.text());
}

/// A worker killed while it waits in registration gives its slot back at once (its connection
/// closed): the next two workers take the run, well inside the 30 s heartbeat timeout.
#[test]
fn a_worker_killed_while_registering_frees_its_slot() {
    let _g = serial();
    let dir = fresh_dir("killed-registrant");
    let run = dir.join("run");
    let mut cmd = coordinator();
    cmd.args(remote_args(&run, 2, STEPS));
    let (mut coord, url, token) = serve(cmd, &run, &dir.join("coordinator.log"));
    let mut doomed = join(&url, &token, &[], &dir.join("doomed.log"));
    assert!(wait_for(Duration::from_secs(30), || coord.text().contains("rank 0 joined")), "{}", coord.text());
    sigkill(doomed.pid());
    doomed.wait(Duration::from_secs(10));
    assert!(
        wait_for(Duration::from_secs(10), || coord.text().contains("rank 0 left before the run started")),
        "{}",
        coord.text()
    );
    let t = Instant::now();
    let mut workers =
        [join(&url, &token, &[], &dir.join("second.log")), join(&url, &token, &[], &dir.join("third.log"))];
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(120));
        assert!(status.success(), "{status}\n{}\ncoordinator:\n{}", w.text(), coord.text());
    }
    let status = coord.wait(Duration::from_secs(60));
    let err = coord.text();
    assert!(status.success(), "{status}\n{err}");
    assert!(t.elapsed() < Duration::from_secs(25), "took {:?}:\n{err}", t.elapsed());
    assert_eq!(losses(&run).len() as u64, STEPS, "{err}");
}

/// Two remote workers on loopback, one killed mid-run: the coordinator has no child to watch and
/// learns it from the survivor, whose ring read failed. The failure is named after the killed
/// rank, not after the rank that noticed (it was "rank S failed: ring: rank K closed ...").
#[test]
fn a_killed_remote_worker_is_named_not_the_peer_that_noticed_it() {
    let _g = serial();
    let dir = fresh_dir("lost-peer");
    let run = dir.join("run");
    let mut cmd = coordinator();
    cmd.args(remote_args(&run, 2, 400)).args(["--max-restarts", "0"]);
    let (mut coord, url, token) = serve(cmd, &run, &dir.join("coordinator.log"));
    let mut workers = [join(&url, &token, &[], &dir.join("w0.log")), join(&url, &token, &[], &dir.join("w1.log"))];
    assert!(wait_for(Duration::from_secs(60), || losses(&run).len() >= 2), "{}", coord.text());
    let killed = workers[1].pid();
    sigkill(killed);
    let status = coord.wait(Duration::from_secs(60));
    let err = coord.text();
    assert!(!status.success(), "{err}");
    let joined = err.lines().find(|l| l.contains("joined from") && l.ends_with(&format!("(pid {killed})")));
    let rank: usize = joined.and_then(|l| l.split_whitespace().nth(2)).and_then(|r| r.parse().ok()).expect("rank");
    let survivor = 1 - rank;
    assert!(err.contains(&format!("rank {rank} was lost (rank {survivor}: ring: rank {rank} closed")), "{err}");
    assert!(!err.contains(&format!("rank {survivor} failed")), "{err}");
    workers[0].wait(Duration::from_secs(30));
}
