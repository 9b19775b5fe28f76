//! Revocation while the process runs, over real quinn connections on 127.0.0.1: a re-signed CRL
//! refuses new handshakes of the revoked peer and closes its open connections, on both sides
//! of a link, with no config rebuilt and nothing restarted. A broken CRL file leaves the last
//! good one in force.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::{Pki, RevokeTarget};
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::trust::{self, CLOSE_UNTRUSTED, Closed, Reload};
use tollgate_certs::{
    Expectation, PeerRejection, RejectionLog, Role, SpiffeId, TlsIdentity, TrustStore,
};

const ALPN: &[u8] = b"tollgate-test/1";
const LIMIT: Duration = Duration::from_secs(10);

struct Fleet {
    _dir: tempfile::TempDir,
    pki: Pki,
    /// The operators' own store (they check the server), loaded once.
    clients: TrustStore,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), "prod").unwrap();
        let clients = TrustStore::load(&pki.ca_cert_path(), &pki.crl_path()).unwrap();
        Fleet {
            _dir: dir,
            pki,
            clients,
        }
    }

    fn identity(&self, role: Role, name: Option<&str>) -> TlsIdentity {
        let issued = self.pki.issue(role, name, Overwrite::Replace).unwrap();
        TlsIdentity::load(&issued.cert_path, &issued.key_path).unwrap()
    }

    fn trust(&self) -> TrustStore {
        TrustStore::load(&self.pki.ca_cert_path(), &self.pki.crl_path()).unwrap()
    }

    fn id(&self, role: Role, name: Option<&str>) -> SpiffeId {
        SpiffeId::new(self.pki.fleet(), role, name).unwrap()
    }

    fn revoke(&self, role: Role, name: Option<&str>) {
        self.pki
            .revoke(&RevokeTarget::Identity(self.id(role, name)))
            .unwrap();
    }
}

/// A control-port-like server: any operator of the fleet, each accepted connection watched.
/// It answers every stream with "pong" so a client knows it was really accepted.
fn operator_server(fleet: &Fleet, trust: &TrustStore, log: RejectionLog) -> SocketAddr {
    let me = fleet.identity(Role::Coordinator, None);
    let cfg = quic::server_config(
        &me,
        trust,
        Expectation::AnyOf {
            fleet: "prod".into(),
            role: Role::Operator,
        },
        ALPN,
        log,
        QuicTimeouts::default(),
    )
    .unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let trust = trust.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let trust = trust.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                trust.watch_client(&conn);
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = recv.read_to_end(64).await;
                    let _ = send.write_all(b"pong").await;
                    let _ = send.finish();
                }
            });
        }
    });
    addr
}

/// Connects as `who` and does one ping/pong; returns the live connection.
async fn dial(
    fleet: &Fleet,
    who: &TlsIdentity,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let server = fleet.id(Role::Coordinator, None);
    let cfg = quic::client_config(
        who,
        &fleet.clients,
        server.clone(),
        ALPN,
        RejectionLog::new(),
        QuicTimeouts::default(),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(cfg);
    let attempt = async {
        let conn = endpoint
            .connect(addr, &server.server_name())
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        ping(&conn).await?;
        Ok(conn)
    };
    tokio::time::timeout(LIMIT, attempt)
        .await
        .unwrap_or(Err("timed out".into()))
}

async fn ping(conn: &quinn::Connection) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"ping").await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
    if answer == b"pong" {
        Ok(())
    } else {
        Err(format!("bad answer {answer:?}"))
    }
}

/// Waits (bounded) for `conn` to be closed by its peer with [`CLOSE_UNTRUSTED`].
async fn closed_as_untrusted(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(LIMIT, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, CLOSE_UNTRUSTED.into(), "{close:?}");
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        Ok(other) => panic!("closed, but not as untrusted: {other:?}"),
        Err(_) => panic!("the connection was not closed within {LIMIT:?}"),
    }
}

#[tokio::test]
async fn a_revoked_operator_is_cut_off_and_refused_without_a_restart() {
    let fleet = Fleet::new();
    let trust = fleet.trust();
    let log = RejectionLog::new();
    let addr = operator_server(&fleet, &trust, log.clone());
    let alice = fleet.identity(Role::Operator, Some("alice"));
    let bob = fleet.identity(Role::Operator, Some("bob"));
    let alice_conn = dial(&fleet, &alice, addr).await.unwrap();
    let bob_conn = dial(&fleet, &bob, addr).await.unwrap();
    assert_eq!(trust.watched(), 2);

    // Nothing changed: a re-read changes nothing.
    assert!(matches!(
        trust.reload().unwrap(),
        Reload::Unchanged { closed } if closed.is_empty()
    ));

    fleet.revoke(Role::Operator, Some("alice"));
    let reload = trust.reload().unwrap();
    assert_eq!(
        reload,
        Reload::Changed {
            closed: vec![Closed {
                peer: "spiffe://prod/operator/alice".into(),
                reason: PeerRejection::Revoked,
            }]
        }
    );
    let why = closed_as_untrusted(&alice_conn).await;
    assert!(why.contains("revoked"), "{why}");
    // Bob's connection is untouched and still served.
    ping(&bob_conn).await.unwrap();
    assert_eq!(trust.watched(), 1);

    // A new handshake by alice is refused by the very same server config; bob still gets in.
    let again = dial(&fleet, &alice, addr).await;
    assert!(again.is_err(), "a revoked operator got in: {again:?}");
    assert_eq!(log.last(), Some(PeerRejection::Revoked));
    dial(&fleet, &bob, addr).await.unwrap();
}

#[tokio::test]
async fn the_dialling_side_closes_its_link_to_a_revoked_server() {
    let fleet = Fleet::new();
    // The agent web1 accepts the coordinator; the coordinator dials with a live store.
    let agent = fleet.identity(Role::Agent, Some("web1"));
    let web1 = fleet.id(Role::Agent, Some("web1"));
    let agent_cfg = quic::server_config(
        &agent,
        &fleet.trust(),
        Expectation::Exactly(fleet.id(Role::Coordinator, None)),
        ALPN,
        RejectionLog::new(),
        QuicTimeouts::default(),
    )
    .unwrap();
    let server = quinn::Endpoint::server(agent_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = recv.read_to_end(64).await;
                    let _ = send.write_all(b"pong").await;
                    let _ = send.finish();
                }
            });
        }
    });
    let coordinator = fleet.identity(Role::Coordinator, None);
    let trust = fleet.trust();
    let clog = RejectionLog::new();
    let connect = |trust: &TrustStore| {
        let cfg = quic::client_config(
            &coordinator,
            trust,
            web1.clone(),
            ALPN,
            clog.clone(),
            QuicTimeouts::default(),
        )
        .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(cfg);
        let name = web1.server_name();
        async move {
            let conn = endpoint
                .connect(addr, &name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            ping(&conn).await?;
            Ok::<_, String>(conn)
        }
    };
    let link = tokio::time::timeout(LIMIT, connect(&trust))
        .await
        .unwrap()
        .unwrap();
    trust.watch_server(&link, &web1);

    fleet.revoke(Role::Agent, Some("web1"));
    let reload = trust.reload().unwrap();
    assert_eq!(
        reload.closed(),
        &[Closed {
            peer: web1.to_string(),
            reason: PeerRejection::Revoked,
        }]
    );
    assert!(
        matches!(
            link.close_reason(),
            Some(quinn::ConnectionError::LocallyClosed)
        ),
        "{:?}",
        link.close_reason()
    );
    // A new dial with the same (live) store refuses the agent.
    let again = tokio::time::timeout(LIMIT, connect(&trust)).await.unwrap();
    assert!(again.is_err(), "dialled a revoked agent: {again:?}");
    assert_eq!(clog.last(), Some(PeerRejection::Revoked));
}

#[tokio::test]
async fn the_watch_task_picks_up_a_changed_file_by_itself() {
    let fleet = Fleet::new();
    let trust = fleet.trust();
    let addr = operator_server(&fleet, &trust, RejectionLog::new());
    tokio::spawn(trust::watch(trust.clone(), Duration::from_millis(50)));
    let alice = fleet.identity(Role::Operator, Some("alice"));
    let conn = dial(&fleet, &alice, addr).await.unwrap();
    fleet.revoke(Role::Operator, Some("alice"));
    // No reload called here: the periodic re-read finds the new file and closes the link.
    let why = closed_as_untrusted(&conn).await;
    assert!(why.contains("revoked"), "{why}");
}

#[tokio::test]
async fn a_broken_crl_file_keeps_the_last_good_one_in_force() {
    let fleet = Fleet::new();
    let trust = fleet.trust();
    let log = RejectionLog::new();
    let addr = operator_server(&fleet, &trust, log.clone());
    let alice = fleet.identity(Role::Operator, Some("alice"));
    let bob = fleet.identity(Role::Operator, Some("bob"));
    fleet.revoke(Role::Operator, Some("alice"));
    trust.reload().unwrap();

    // An attacker (or a botched copy) replaces the CRL with garbage, then removes it.
    std::fs::write(fleet.pki.crl_path(), b"not a crl").unwrap();
    let err = trust.reload().unwrap_err();
    assert!(err.to_string().contains("crl.pem"), "names the file: {err}");
    std::fs::remove_file(fleet.pki.crl_path()).unwrap();
    assert!(trust.reload().is_err());

    // Alice stays revoked, bob still gets in: the last good CRL is in force.
    assert!(dial(&fleet, &alice, addr).await.is_err());
    assert_eq!(log.last(), Some(PeerRejection::Revoked));
    dial(&fleet, &bob, addr).await.unwrap();

    // A good CRL again: back in force on the next re-read.
    fleet.pki.refresh_crl().unwrap();
    assert!(matches!(trust.reload().unwrap(), Reload::Changed { .. }));
    assert!(dial(&fleet, &alice, addr).await.is_err());
    dial(&fleet, &bob, addr).await.unwrap();
}

#[tokio::test]
async fn an_expired_crl_read_later_closes_every_open_connection() {
    let fleet = Fleet::new();
    let trust = fleet.trust();
    let addr = operator_server(&fleet, &trust, RejectionLog::new());
    let bob = fleet.identity(Role::Operator, Some("bob"));
    let conn = dial(&fleet, &bob, addr).await.unwrap();
    // A CRL that is already past its nextUpdate (a stale copy put in place).
    let now = time::OffsetDateTime::now_utc();
    fleet
        .pki
        .write_crl(now - time::Duration::days(2), now - time::Duration::days(1))
        .unwrap();
    let reload = trust.reload().unwrap();
    assert_eq!(
        reload.closed(),
        &[Closed {
            peer: "spiffe://prod/operator/bob".into(),
            reason: PeerRejection::RevocationListExpired,
        }]
    );
    closed_as_untrusted(&conn).await;
    assert!(dial(&fleet, &bob, addr).await.is_err());
}
