//! The coordinator's agent connector under fleet-sized load: its UDP socket buffers are raised
//! (a small receive buffer drops the answers of a fleet probed at once), and handshakes wait for
//! a slot, with their connect timeout starting only once they have one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use tollgate_certs::{Role, SpiffeId};
use tollgate_coordinator::transport::agent::{LinkError, UDP_BUFFER_BYTES};
use tollgate_tests::fleet::{AgentOptions, AgentProcess, TestPki};

#[cfg(target_os = "linux")]
#[tokio::test]
async fn socket_buffers_are_raised_as_far_as_the_system_allows() {
    let pki = TestPki::new().unwrap();
    pki.identity(Role::Coordinator, None).unwrap();
    let connector = pki.coordinator().unwrap();
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let got = connector.socket_buffers();
    // Linux reports twice what was set (bookkeeping overhead), capped by rmem_max * 2.
    assert!(
        got.receive >= UDP_BUFFER_BYTES.min(rmem_max),
        "receive buffer {} < min({UDP_BUFFER_BYTES}, rmem_max {rmem_max})",
        got.receive
    );
    assert!(got.receive > 212_992 * 2 || rmem_max <= 212_992, "{got:?}");
}

#[tokio::test]
async fn handshakes_wait_for_a_slot_and_the_timeout_starts_with_it() {
    let pki = TestPki::new().unwrap();
    let connector = pki
        .coordinator()
        .unwrap()
        .with_handshake_limit(2, Duration::from_secs(60));
    // Three peers that never answer: every handshake runs into its own timeout.
    let holes: Vec<std::net::UdpSocket> = (0..3)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let timeout = Duration::from_millis(300);
    let id = SpiffeId::agent("test", "web1").unwrap();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for h in &holes {
        let (c, id, addr) = (connector.clone(), id.clone(), h.local_addr().unwrap());
        set.spawn(async move {
            let r = c.connect(addr, &id, timeout).await;
            (r.err(), started.elapsed())
        });
    }
    let mut results = set.join_all().await;
    results.sort_by_key(|(_, t)| *t);
    for (err, _) in &results {
        assert!(
            matches!(err, Some(LinkError::Timeout(_))),
            "a silent peer must time out: {err:?}"
        );
    }
    // Two run at once; the third starts when one of them gives up, so it cannot end before two
    // full timeouts have passed. Without the limit all three end after one.
    assert!(
        results[2].1 >= timeout * 2,
        "third handshake ended after {:?}, before two timeouts ({:?}): it did not wait for a slot",
        results[2].1,
        timeout * 2
    );
    assert!(results[0].1 >= timeout && results[1].1 >= timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_gives_its_slot_back_so_a_live_one_behind_it_connects() {
    let pki = TestPki::new().unwrap();
    let agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 41))
        .await
        .unwrap();
    let connector = pki
        .coordinator()
        .unwrap()
        .with_handshake_limit(1, Duration::from_millis(200));
    // A dead host takes the only slot first, with a long connect timeout of its own.
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = {
        let (c, addr) = (connector.clone(), hole.local_addr().unwrap());
        let id = SpiffeId::agent("test", "gone").unwrap();
        tokio::spawn(async move { c.connect(addr, &id, Duration::from_secs(30)).await })
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while connector.free_handshake_slots() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the dead host's dial never took the slot");
    // Without the lease, the live agent would wait the dead host's 30 s out.
    let live = tokio::time::timeout(
        Duration::from_secs(15),
        connector.connect(agent.addr, &agent.id, Duration::from_secs(10)),
    )
    .await
    .expect("the live agent waited behind a silent host")
    .expect("the live agent connects");
    assert_eq!(live.peer(), &agent.id);
    assert!(
        !dead.is_finished(),
        "the dead host's own timeout still runs"
    );
    dead.abort();
}
