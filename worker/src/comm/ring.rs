//! Collectives for CPU ranks: a ring over TCP, each rank sending to the next and receiving from
//! the previous one.
//!
//! All-reduce is a reduce-scatter followed by an all-gather (each rank sends `2 (N-1)/N` of the
//! buffer, the bandwidth-optimal amount), never a gather at rank 0. In the reduce-scatter the
//! partial sum of chunk `c` starts at rank `c+1` and travels the ring once, adding each rank's
//! values in ring order, so the result does not depend on timing: the same world reproduces
//! its sums bit for bit.
//!
//! Every transfer is framed (magic, collective sequence number, element count), so ranks that
//! disagree on which collective comes next fail with an error instead of mixing buffers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{chunks, HostCollectives};

#[cfg(target_endian = "big")]
compile_error!("the TCP ring sends f32 values in the machine's byte order and assumes little-endian peers");

const MAGIC: u32 = 0x4358_5252; // "CXRR"
const HELLO_MAGIC: u32 = 0x4358_4845; // "CXHE"

/// What a rank says when it connects to its successor, so that a stray or stale connection
/// (another run, an older generation of this one) is not taken for the ring neighbour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingHello {
    /// A number identifying the run (derived from its id).
    pub run: u64,
    /// The run's restart generation.
    pub generation: u64,
}

pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To rank `rank + 1`.
    next: Option<TcpStream>,
    /// From rank `rank - 1`.
    prev: Option<TcpStream>,
    /// Collectives done so far; each frame carries it.
    seq: u64,
    scratch: Vec<f32>,
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: every bit pattern is a valid f32 (NaNs included), so filling the bytes is sound.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn header(seq: u64, len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn write_frame(mut s: &TcpStream, seq: u64, data: &[f32]) -> std::io::Result<()> {
    s.write_all(&header(seq, data.len()))?;
    s.write_all(as_bytes(data))?;
    s.flush()
}

fn read_frame(mut s: &TcpStream, seq: u64, out: &mut [f32], from: usize) -> Result<()> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).map_err(|e| peer_error(e, from))?;
    let magic = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let got_seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(h[12..].try_into().expect("8 bytes"));
    ensure!(magic == MAGIC, "ring: rank {from} sent a frame with a bad magic number");
    ensure!(
        got_seq == seq && len == out.len() as u64,
        "ring: rank {from} is at collective {got_seq} with {len} values, this rank at {seq} with {}",
        out.len()
    );
    s.read_exact(as_bytes_mut(out)).map_err(|e| peer_error(e, from))?;
    Ok(())
}

fn peer_error(e: std::io::Error, from: usize) -> anyhow::Error {
    // Marked as rank `from`'s failure, not this rank's (see failure::PeerLost).
    use crate::failure::PeerLost;
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            PeerLost::error(from, format!("ring: rank {from} closed its connection (it stopped or died)"))
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            PeerLost::error(from, format!("ring: no data from rank {from} within the timeout"))
        }
        _ => anyhow!("ring: reading from rank {from}: {e}"),
    }
}

/// How a reduction combines two ranks' values.
type Combine = fn(f32, f32) -> f32;

fn sum(a: f32, b: f32) -> f32 {
    a + b
}

/// The maximum, NaN if either is (`f32::max` would drop a NaN silently).
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// `(&v[a], &mut v[b])` for disjoint ranges.
fn split_pair(v: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    if a.start < b.start {
        let (x, y) = v.split_at_mut(b.start);
        (&x[a], &mut y[..b.len()])
    } else {
        let (x, y) = v.split_at_mut(a.start);
        (&y[..a.len()], &mut x[b])
    }
}

impl TcpRing {
    /// A world of one: every collective is a copy or nothing.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, next: None, prev: None, seq: 0, scratch: Vec::new() }
    }

    /// Joins the ring: connects to rank `rank + 1` at `addrs[rank + 1]` and accepts rank
    /// `rank - 1` on `listener` (bound before the addresses were exchanged). `timeout` bounds
    /// the set-up and every later read, so a peer that hangs turns into an error.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addrs: &[String],
        hello: RingHello,
        timeout: Duration,
    ) -> Result<Self> {
        let world = addrs.len();
        ensure!(rank < world, "ring: rank {rank} outside a world of {world}");
        if world == 1 {
            return Ok(Self::single());
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next = loop {
            match TcpStream::connect(&addrs[next_rank]) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    let what = format!("ring: cannot reach rank {next_rank} at {}: {e}", addrs[next_rank]);
                    return Err(crate::failure::PeerLost::error(next_rank, what));
                }
            }
        };
        next.set_nodelay(true)?;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        h.extend_from_slice(&hello.run.to_le_bytes());
        h.extend_from_slice(&hello.generation.to_le_bytes());
        h.extend_from_slice(&(rank as u64).to_le_bytes());
        (&next).write_all(&h).with_context(|| format!("ring: greeting rank {next_rank}"))?;

        listener.set_nonblocking(true)?;
        let prev = loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut got = [0u8; 28];
                    if (&s).read_exact(&mut got).is_err() {
                        continue;
                    }
                    let word = |i: usize| u64::from_le_bytes(got[i..i + 8].try_into().expect("8 bytes"));
                    let ok = u32::from_le_bytes(got[..4].try_into().expect("4 bytes")) == HELLO_MAGIC
                        && word(4) == hello.run
                        && word(12) == hello.generation
                        && word(20) == prev_rank as u64;
                    // A connection that is not our predecessor of this generation is dropped.
                    if ok {
                        break s;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let what = format!("ring: rank {prev_rank} did not connect in time");
                        return Err(crate::failure::PeerLost::error(prev_rank, what));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => bail!("ring: accepting rank {prev_rank}: {e}"),
            }
        };
        prev.set_nodelay(true)?;
        prev.set_read_timeout(Some(timeout))?;
        next.set_write_timeout(Some(timeout))?;
        Ok(Self { rank, world, next: Some(next), prev: Some(prev), seq: 0, scratch: Vec::new() })
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends `send` to the next rank while receiving `recv` from the previous one (both at
    /// once: two ranks writing large frames to each other would otherwise both block).
    fn exchange(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (next, prev) = (self.next.as_ref().expect("ring peers"), self.prev.as_ref().expect("ring peers"));
        let (seq, from) = (self.seq, self.prev_rank());
        let next_rank = (self.rank + 1) % self.world;
        std::thread::scope(|s| {
            let writer = s.spawn(move || write_frame(next, seq, send));
            let read = read_frame(prev, seq, recv, from);
            let wrote = writer.join().map_err(|_| anyhow!("ring: the sending thread panicked"))?;
            read?;
            wrote.map_err(|e| {
                let what = format!("ring: sending to rank {next_rank}: {e}");
                match e.kind() {
                    std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut => crate::failure::PeerLost::error(next_rank, what),
                    _ => anyhow!(what),
                }
            })
        })
    }

    /// Reduce-scatter in place: afterwards `work[ranges[rank]]` holds the values of every rank
    /// combined by `op` (a sum or a maximum).
    fn reduce_scatter_in_place(&mut self, work: &mut [f32], ranges: &[Range<usize>], op: Combine) -> Result<()> {
        let n = self.world;
        let mut scratch = std::mem::take(&mut self.scratch);
        for s in 0..n - 1 {
            let send = ranges[(self.rank + 2 * n - s - 1) % n].clone();
            let recv = ranges[(self.rank + 2 * n - s - 2) % n].clone();
            scratch.resize(recv.len(), 0.0);
            let r = self.exchange(&work[send], &mut scratch[..recv.len()]);
            if let Err(e) = r {
                self.scratch = scratch;
                return Err(e);
            }
            // The partial result that arrived combined with this rank's values: the ring order
            // (f32 addition and the maximum commute, so the order of the operands is moot).
            for (w, x) in work[recv].iter_mut().zip(&scratch) {
                *w = op(*w, *x);
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    /// All-gather in place: `work[ranges[rank]]` is this rank's; afterwards all are filled.
    fn all_gather_in_place(&mut self, work: &mut [f32], ranges: &[Range<usize>]) -> Result<()> {
        let n = self.world;
        for s in 0..n - 1 {
            let send = ranges[(self.rank + n - s) % n].clone();
            let recv = ranges[(self.rank + 2 * n - s - 1) % n].clone();
            let (a, b) = split_pair(work, send, recv);
            self.exchange(a, b)?;
        }
        Ok(())
    }

    fn begin(&mut self) {
        self.seq += 1;
    }

    /// All-reduce in place: a reduce-scatter combining with `op`, then an all-gather.
    fn all_reduce_with(&mut self, buf: &mut [f32], op: Combine) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.begin();
        let ranges = chunks(buf.len(), self.world);
        self.reduce_scatter_in_place(buf, &ranges, op)?;
        self.all_gather_in_place(buf, &ranges)
    }
}

impl HostCollectives for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = send.len();
        ensure!(
            recv.len() == n * self.world,
            "all_gather: {} values to receive, expected {}",
            recv.len(),
            n * self.world
        );
        recv[self.rank * n..(self.rank + 1) * n].copy_from_slice(send);
        if self.world == 1 {
            return Ok(());
        }
        self.begin();
        let ranges: Vec<_> = (0..self.world).map(|k| k * n..(k + 1) * n).collect();
        self.all_gather_in_place(recv, &ranges)
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = recv.len();
        ensure!(
            send.len() == n * self.world,
            "reduce_scatter: {} values to send, expected {}",
            send.len(),
            n * self.world
        );
        if self.world == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        self.begin();
        let ranges: Vec<_> = (0..self.world).map(|k| k * n..(k + 1) * n).collect();
        let mut work = send.to_vec();
        self.reduce_scatter_in_place(&mut work, &ranges, sum)?;
        recv.copy_from_slice(&work[ranges[self.rank].clone()]);
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_with(buf, sum)
    }

    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_with(buf, max_nan)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast: root {root} outside a world of {}", self.world);
        if self.world == 1 {
            return Ok(());
        }
        self.begin();
        let seq = self.seq;
        let next_rank = (self.rank + 1) % self.world;
        // Down the ring from the root: each rank receives, then forwards unless the next is
        // the root (the chain ends there).
        if self.rank != root {
            let from = self.prev_rank();
            read_frame(self.prev.as_ref().expect("ring peers"), seq, buf, from)?;
        }
        if next_rank != root {
            write_frame(self.next.as_ref().expect("ring peers"), seq, buf)
                .map_err(|e| anyhow!("ring: sending to rank {next_rank}: {e}"))?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut all = vec![0.0; self.world];
        // Every rank hears from every other one in an all-gather: no rank leaves early.
        self.all_gather(&[self.rank as f32], &mut all)
    }
}

/// A whole ring of `world` ranks on loopback inside this process (for tests and in-process
/// runs): the listeners are bound first, then every rank connects from a thread of its own.
pub fn loopback_world(world: usize, timeout: Duration) -> Result<Vec<TcpRing>> {
    let listeners: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    let addrs: Vec<String> =
        listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<std::io::Result<_>>()?;
    let hello = RingHello { run: 0x5eed, generation: 0 };
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || TcpRing::connect(rank, l, &addrs, hello, timeout))
        })
        .collect();
    handles.into_iter().map(|h| h.join().map_err(|_| anyhow!("ring set-up thread panicked"))?).collect()
}
