//! The TCP ring's collectives on in-process worlds of 1 to 4 ranks, against sums computed
//! directly, and their reproducibility.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::comm::ring::loopback_world;
use worker::comm::{HostCollectives, TcpRing};

/// Runs `f` on every rank of a loopback world, each in a thread; returns the ranks' results.
fn on_world<R: Send + 'static>(world: usize, f: impl Fn(&mut TcpRing) -> R + Send + Sync + Clone + 'static) -> Vec<R> {
    let rings = loopback_world(world, Duration::from_secs(20)).expect("ring set-up");
    let handles: Vec<_> = rings
        .into_iter()
        .map(|mut r| {
            let f = f.clone();
            std::thread::spawn(move || f(&mut r))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn data(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + rank as u64);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn close(a: f32, b: f64) -> bool {
    !a.is_nan() && (a as f64 - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

#[test]
fn all_reduce_sums_every_length() {
    for world in 1..=4 {
        // Lengths below, at and above the world size, not multiples of it.
        for len in [1usize, 3, 4, 7, 1000, 10_007] {
            let seed = (world * 100 + len) as u64;
            let out = on_world(world, move |r| {
                let mut v = data(r.rank(), len, seed);
                r.all_reduce(&mut v).expect("all_reduce");
                v
            });
            for i in 0..len {
                let want: f64 = (0..world).map(|k| data(k, len, seed)[i] as f64).sum();
                for o in &out {
                    assert!(close(o[i], want), "world {world} len {len} [{i}]: {} vs {want}", o[i]);
                }
            }
            // Every rank holds the same bits.
            assert!(out.iter().all(|o| o.iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits())));
        }
    }
}

/// The maximum over the ranks, exact, for lengths around the world size; a NaN on one rank
/// reaches every rank (the column maxima of a diverged loss must not hide it).
#[test]
fn all_reduce_max_every_length() {
    for world in 1..=4 {
        for len in [1usize, 3, 5, 1000] {
            let seed = (world * 100 + len) as u64 + 7;
            let out = on_world(world, move |r| {
                let mut v = data(r.rank(), len, seed);
                r.all_reduce_max(&mut v).expect("all_reduce_max");
                v
            });
            for i in 0..len {
                let want = (0..world).map(|k| data(k, len, seed)[i]).fold(f32::NEG_INFINITY, f32::max);
                for o in &out {
                    assert_eq!(o[i].to_bits(), want.to_bits(), "world {world} len {len} [{i}]");
                }
            }
        }
        let out = on_world(world, move |r| {
            let mut v = data(r.rank(), 9, 5);
            if r.rank() == world - 1 {
                v[4] = f32::NAN;
            }
            r.all_reduce_max(&mut v).expect("all_reduce_max");
            v
        });
        for o in &out {
            assert!(o[4].is_nan() && o.iter().enumerate().all(|(i, x)| i == 4 || !x.is_nan()), "{o:?}");
        }
    }
}

#[test]
fn all_gather_reduce_scatter_broadcast_barrier() {
    for world in 1..=4 {
        let n = 37;
        let out = on_world(world, move |r| {
            let rank = r.rank();
            let mine = data(rank, n, 1);
            let mut all = vec![0.0; n * r.world()];
            r.all_gather(&mine, &mut all).expect("all_gather");
            let send = data(rank, n * r.world(), 2);
            let mut part = vec![0.0; n];
            r.reduce_scatter(&send, &mut part).expect("reduce_scatter");
            let mut b = if rank == world - 1 { data(99, n, 3) } else { vec![0.0; n] };
            r.broadcast(&mut b, world - 1).expect("broadcast");
            r.barrier().expect("barrier");
            (rank, all, part, b)
        });
        for (rank, all, part, b) in out {
            for k in 0..world {
                assert_eq!(&all[k * n..(k + 1) * n], data(k, n, 1).as_slice());
            }
            for (i, p) in part.iter().enumerate() {
                let want: f64 = (0..world).map(|k| data(k, n * world, 2)[rank * n + i] as f64).sum();
                assert!(close(*p, want));
            }
            assert_eq!(b, data(99, n, 3));
        }
    }
}

#[test]
fn sums_reproduce_bit_for_bit() {
    let run = || {
        on_world(3, |r| {
            let mut v = data(r.rank(), 50_001, 7);
            for _ in 0..3 {
                r.all_reduce(&mut v).expect("all_reduce");
            }
            v
        })
    };
    let (a, b) = (run(), run());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    let mut rings = loopback_world(2, Duration::from_secs(5)).expect("ring set-up");
    let dead = rings.pop().expect("two ranks");
    drop(dead);
    let mut v = vec![1.0f32; 100];
    let err = rings[0].all_reduce(&mut v).expect_err("peer is gone");
    assert!(format!("{err:#}").contains("rank 1"), "{err:#}");
}
