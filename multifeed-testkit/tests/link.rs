//! The fault-injecting link: delivery, determinism, backpressure and every fault kind.

use std::io::ErrorKind;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use multifeed_testkit::{link, tcp_pair, Direction, LinkConfig, LinkEnd, Seed};
use rand::{Rng, SeedableRng};

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    async_std::future::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

async fn read_all(mut reader: futures::io::ReadHalf<LinkEnd>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = reader.read_to_end(&mut out).await;
    out
}

async fn send_all(mut writer: futures::io::WriteHalf<LinkEnd>, data: Vec<u8>) {
    let _ = writer.write_all(&data).await;
    let _ = writer.close().await;
}

/// Sends `data` both ways at once; returns what each side received (until EOF or error).
async fn exchange(a: LinkEnd, b: LinkEnd, data: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let (ar, aw) = a.split();
    let (br, bw) = b.split();
    let (_, _, at_b, at_a) = futures::join!(
        send_all(aw, data.clone()),
        send_all(bw, data),
        read_all(br),
        read_all(ar)
    );
    (at_a, at_b)
}

#[async_std::test]
async fn bytes_arrive_intact_and_in_order_through_chunking_and_latency() {
    let seed = Seed::from_env_or_random();
    let data = payload(seed.0, 1 << 20);
    let config = LinkConfig::reliable()
        .seed(seed)
        .chunking(1500)
        .latency(Duration::from_micros(50), Duration::from_micros(200))
        .buffer(64 * 1024);
    let (a, b) = link(config);
    let (at_a, at_b) = bounded("a 1 MiB exchange", exchange(a, b, data.clone())).await;
    assert_eq!(at_a, data);
    assert_eq!(at_b, data);
}

#[async_std::test]
async fn the_same_seed_gives_the_same_faults() {
    let run = |seed: u64| async move {
        let (mut a, mut b) = link(
            LinkConfig::reliable()
                .seed(Seed(seed))
                .chunking(9)
                .corrupt(0.05),
        );
        let data = vec![0u8; 4000];
        let mut writes = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = a.write(&data[at..]).await.expect("write");
            writes.push(n);
            at += n;
        }
        a.close().await.expect("close");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        let flipped: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, _)| i)
            .collect();
        (writes, flipped, a.stats())
    };
    let (w1, f1, s1) = bounded("run 1", run(7)).await;
    let (w2, f2, s2) = bounded("run 2", run(7)).await;
    let (w3, f3, _) = bounded("run 3", run(8)).await;
    assert_eq!(
        (w1.clone(), f1.clone()),
        (w2, f2),
        "same seed, same schedule"
    );
    assert_eq!(s1, s2);
    assert!(!f1.is_empty(), "corruption happened");
    assert!(w1 != w3 || f1 != f3, "another seed gives another schedule");
    assert_eq!(s1.corrupted[0] as usize, f1.len());
}

#[async_std::test]
async fn a_full_buffer_makes_the_writer_wait_until_read() {
    let (mut a, mut b) = link(LinkConfig::reliable().buffer(100));
    assert_eq!(a.write(&[1; 100]).await.expect("fits"), 100);
    let mut blocked = Box::pin(a.write(&[2; 10]));
    assert!(
        futures::poll!(&mut blocked).is_pending(),
        "no room: the writer waits"
    );
    let mut buf = [0u8; 50];
    b.read_exact(&mut buf).await.expect("read");
    let n = bounded("the writer to resume", blocked)
        .await
        .expect("write after read");
    assert_eq!(n, 10);
}

#[async_std::test]
async fn disconnect_after_n_bytes() {
    let (mut a, mut b) = link(LinkConfig::reliable().disconnect_after(Direction::AtoB, 1000));
    let written = a.write_all(&[7; 5000]).await;
    assert_eq!(
        written.expect_err("the link breaks").kind(),
        ErrorKind::BrokenPipe
    );
    let mut got = Vec::new();
    let err = b
        .read_to_end(&mut got)
        .await
        .expect_err("the reader sees the break");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert_eq!(got.len(), 1000, "exactly the bytes before the cut");
    assert_eq!(
        b.write(&[1]).await.expect_err("both ways broken").kind(),
        ErrorKind::BrokenPipe
    );
    assert!(a.stats().disconnected);
}

#[async_std::test]
async fn half_close_gives_end_of_stream_one_way_only() {
    let (mut a, mut b) = link(LinkConfig::reliable().half_close_after(Direction::AtoB, 10));
    let _ = a.write_all(&[3; 50]).await;
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.expect("EOF, not an error");
    assert_eq!(got, vec![3; 10]);
    b.write_all(b"still works")
        .await
        .expect("the other way works");
    let mut buf = [0u8; 11];
    a.read_exact(&mut buf).await.expect("read back");
    assert_eq!(&buf, b"still works");
}

#[async_std::test]
async fn a_silent_peer_delivers_nothing_more() {
    let (mut a, mut b) = link(LinkConfig::reliable().silent_after(Direction::AtoB, 4));
    a.write_all(b"12345678")
        .await
        .expect("writes still succeed");
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.expect("first bytes");
    assert_eq!(&buf, b"1234");
    assert!(
        b.read(&mut buf).now_or_never().is_none(),
        "nothing more, no EOF either"
    );
}

#[async_std::test]
async fn dropping_an_end_is_end_of_stream_for_the_other() {
    let (a, mut b) = link(LinkConfig::reliable());
    drop(a);
    let mut got = Vec::new();
    assert_eq!(b.read_to_end(&mut got).await.expect("EOF"), 0);
    assert_eq!(
        b.write(&[1]).await.expect_err("nobody reads").kind(),
        ErrorKind::BrokenPipe
    );
}

#[async_std::test]
async fn tcp_pair_round_trip() {
    let (mut a, mut b) = tcp_pair().await.expect("loopback pair");
    a.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
}

/// The cap holds each direction to its rate (checked as a lower bound on the time taken: a slow
/// machine can only take longer), and bytes arrive intact.
#[async_std::test]
async fn the_bandwidth_cap_holds_each_direction_to_its_rate() {
    let seed = Seed::from_env_or_random();
    let data = payload(seed.0, 200 * 1024);
    let config = LinkConfig::reliable()
        .seed(seed)
        .chunking(4096)
        .bandwidth(2 * 1024 * 1024);
    let (a, b) = link(config);
    let started = std::time::Instant::now();
    let (at_a, at_b) = bounded("200 KiB at 2 MiB/s", exchange(a, b, data.clone())).await;
    let elapsed = started.elapsed();
    assert_eq!(at_a, data);
    assert_eq!(at_b, data);
    // 200 KiB at 2 MiB/s is 97.7 ms per direction (both directions run in parallel).
    assert!(
        elapsed >= Duration::from_millis(95),
        "the cap was not applied: {elapsed:?}"
    );
}

/// Stalls pause a direction without losing or reordering bytes; the same seed stalls the same
/// writes.
#[async_std::test]
async fn stalls_pause_without_losing_bytes() {
    let seed = Seed::from_env_or_random();
    let data = payload(seed.0, 64 * 1024);
    let config = || {
        LinkConfig::reliable()
            .seed(seed)
            .chunking(1024)
            .stalls(0.2, Duration::from_millis(3))
    };
    let mut counts = Vec::new();
    for _ in 0..2 {
        let (a, b) = link(config());
        let (ar, mut aw) = a.split();
        let (mut br, bw) = b.split();
        let sent = data.clone();
        let (_, received) = bounded("a stalled transfer", async {
            futures::join!(
                async {
                    aw.write_all(&sent).await.expect("write");
                    aw.close().await.expect("close");
                },
                async {
                    let mut out = Vec::new();
                    br.read_to_end(&mut out).await.expect("read");
                    out
                }
            )
        })
        .await;
        assert_eq!(received, data, "stalls lose or reorder nothing");
        let a = ar.reunite(aw).expect("same end");
        let stalls = a.stats().stalls;
        assert!(stalls[0] > 0, "some writes stalled: {stalls:?}");
        counts.push(stalls[0]);
        drop((a, bw));
    }
    assert_eq!(counts[0], counts[1], "the same seed stalls the same writes");
}
