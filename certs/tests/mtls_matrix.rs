//! The mTLS matrix over real quinn connections on 127.0.0.1: the right pair is accepted, and
//! every wrong peer is refused with a typed reason that names the cause.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate_protocol::error_chain::chain;

use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::{Pki, RevokeTarget, Validity};
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{
    Expectation, PeerRejection, RejectionLog, Role, SpiffeId, TlsIdentity, TrustStore,
};

const ALPN: &[u8] = b"tollgate-test/1";
const LIMIT: Duration = Duration::from_secs(10);

struct Fleet {
    _dir: tempfile::TempDir,
    pki: Pki,
}

impl Fleet {
    fn new(name: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), name).unwrap();
        Fleet { _dir: dir, pki }
    }

    fn identity(&self, role: Role, name: Option<&str>) -> TlsIdentity {
        self.identity_with(role, name, Validity::default())
    }

    /// Issues (replacing any earlier file) and loads into memory.
    fn identity_with(&self, role: Role, name: Option<&str>, v: Validity) -> TlsIdentity {
        let issued = self
            .pki
            .issue_with(role, name, v, Overwrite::Replace)
            .unwrap();
        TlsIdentity::load(&issued.cert_path, &issued.key_path).unwrap()
    }

    fn trust(&self) -> TrustStore {
        TrustStore::load(&self.pki.ca_cert_path(), &self.pki.crl_path()).unwrap()
    }

    fn id(&self, role: Role, name: Option<&str>) -> SpiffeId {
        SpiffeId::new(self.pki.fleet(), role, name).unwrap()
    }
}

#[derive(Debug)]
struct Attempt {
    server: Result<SpiffeId, String>,
    client: Result<(), String>,
    server_log: RejectionLog,
    client_log: RejectionLog,
}

/// One connection: the server answers "pong" to "ping" at the application level, so a client
/// only counts as accepted once the server has actually answered.
async fn attempt(
    server_cfg: quinn::ServerConfig,
    client_cfg: quinn::ClientConfig,
    server_name: &str,
    server_log: RejectionLog,
    client_log: RejectionLog,
) -> Attempt {
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let peer = quic::peer_id(&conn).map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let msg = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
        assert_eq!(msg, b"ping");
        send.write_all(b"pong").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        conn.closed().await;
        Ok::<_, String>(peer)
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_cfg);
    let client_res = async {
        let conn = client
            .connect(addr, server_name)
            .map_err(|e| chain(&e))?
            .await
            .map_err(|e| chain(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| chain(&e))?;
        send.write_all(b"ping").await.map_err(|e| chain(&e))?;
        send.finish().map_err(|e| chain(&e))?;
        let answer = recv.read_to_end(64).await.map_err(|e| chain(&e))?;
        conn.close(0u32.into(), b"done");
        if answer == b"pong" {
            Ok(())
        } else {
            Err(format!("bad answer {answer:?}"))
        }
    };
    let client = tokio::time::timeout(LIMIT, client_res)
        .await
        .unwrap_or(Err("client timed out".into()));
    let server = tokio::time::timeout(LIMIT, server_task)
        .await
        .map_err(|_| "server timed out".to_string())
        .and_then(|j| j.map_err(|e| e.to_string()))
        .and_then(|r| r);
    Attempt {
        server,
        client,
        server_log,
        client_log,
    }
}

/// An agent `web1` server expecting the coordinator, dialled by `client` who expects web1.
async fn dial_agent(
    fleet: &Fleet,
    agent_trust: TrustStore,
    client: &TlsIdentity,
    client_trust: &TrustStore,
) -> Attempt {
    let agent = fleet.identity(Role::Agent, Some("web1"));
    let slog = RejectionLog::new();
    let clog = RejectionLog::new();
    let scfg = quic::server_config(
        &agent,
        &agent_trust,
        Expectation::Exactly(fleet.id(Role::Coordinator, None)),
        ALPN,
        slog.clone(),
        QuicTimeouts::default(),
    )
    .unwrap();
    let web1 = fleet.id(Role::Agent, Some("web1"));
    let ccfg = quic::client_config(
        client,
        client_trust,
        web1.clone(),
        ALPN,
        clog.clone(),
        QuicTimeouts::default(),
    )
    .unwrap();
    attempt(scfg, ccfg, &web1.server_name(), slog, clog).await
}

fn assert_refused_by_server(a: &Attempt, want: PeerRejection) {
    assert!(a.client.is_err(), "client must not get an answer: {a:?}");
    assert!(a.server.is_err(), "server must not accept: {a:?}");
    assert_eq!(a.server_log.last(), Some(want.clone()), "{a:?}");
    // The refusing side's error names the cause too.
    let server_err = a.server.as_ref().unwrap_err();
    let causes: &[&str] = match want {
        PeerRejection::Expired => &["certificate expired"],
        PeerRejection::Revoked => &["Revoked"],
        // Same CA name, other key: webpki finds "the" issuer and the signature fails.
        PeerRejection::UnknownIssuer => &["UnknownIssuer", "BadSignature"],
        PeerRejection::RevocationListExpired => &["revocation list expired"],
        PeerRejection::WrongRole { .. } => &["WrongRole"],
        PeerRejection::WrongIdentity { .. } => &["WrongIdentity"],
        _ => &["?"],
    };
    let cause = causes.iter().find(|c| server_err.contains(*c));
    assert!(
        cause.is_some(),
        "server error {server_err:?} should name one of {causes:?}"
    );
    // The client learns why too: the close reason carries the cause.
    let client_err = a.client.as_ref().unwrap_err();
    assert!(
        causes.iter().any(|c| client_err.contains(c)),
        "client error {client_err:?} should name {causes:?}"
    );
}

#[tokio::test]
async fn right_pair_is_accepted_and_identities_are_seen() {
    let fleet = Fleet::new("prod");
    let coord = fleet.identity(Role::Coordinator, None);
    let a = dial_agent(&fleet, fleet.trust(), &coord, &fleet.trust()).await;
    assert_eq!(a.client, Ok(()), "{a:?}");
    assert_eq!(
        a.server.as_ref().unwrap(),
        &fleet.id(Role::Coordinator, None)
    );
    assert!(a.server_log.snapshot().is_empty() && a.client_log.snapshot().is_empty());
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let fleet = Fleet::new("prod");
    let agent = fleet.identity(Role::Agent, Some("web1"));
    let slog = RejectionLog::new();
    let scfg = quic::server_config(
        &agent,
        &fleet.trust(),
        Expectation::Exactly(fleet.id(Role::Coordinator, None)),
        ALPN,
        slog.clone(),
        QuicTimeouts::default(),
    )
    .unwrap();
    // A client that trusts the fleet CA but presents nothing: built by hand, because the certs
    // crate cannot build such a config.
    let mut roots = rustls::RootCertStore::empty();
    for c in tollgate_certs::tls::load_certs(&fleet.pki.ca_cert_path()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(tollgate_certs::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let ccfg = quinn::ClientConfig::new(Arc::new(crypto));
    let a = attempt(
        scfg,
        ccfg,
        "web1.agent.prod.tollgate",
        slog,
        RejectionLog::new(),
    )
    .await;
    assert!(a.client.is_err() && a.server.is_err(), "{a:?}");
    let server_err = a.server.unwrap_err();
    assert!(
        server_err.contains("no certificate"),
        "server error should name the cause: {server_err}"
    );
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let fleet = Fleet::new("prod");
    let rogue = Fleet::new("prod"); // same fleet name, different CA
    let coord = rogue.identity(Role::Coordinator, None);
    let a = dial_agent(&fleet, fleet.trust(), &coord, &fleet.trust()).await;
    assert_refused_by_server(&a, PeerRejection::UnknownIssuer);
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let fleet = Fleet::new("prod");
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let coord = fleet.identity_with(
        Role::Coordinator,
        None,
        Validity {
            not_before: Some(past - time::Duration::days(30)),
            not_after: Some(past),
        },
    );
    let a = dial_agent(&fleet, fleet.trust(), &coord, &fleet.trust()).await;
    assert_refused_by_server(&a, PeerRejection::Expired);
}

#[tokio::test]
async fn revoked_certificate_is_refused() {
    let fleet = Fleet::new("prod");
    let coord = fleet.identity(Role::Coordinator, None);
    fleet
        .pki
        .revoke(&RevokeTarget::Identity(fleet.id(Role::Coordinator, None)))
        .unwrap();
    let a = dial_agent(&fleet, fleet.trust(), &coord, &fleet.trust()).await;
    assert_refused_by_server(&a, PeerRejection::Revoked);
    // A freshly issued coordinator certificate (new serial) is accepted again.
    let fresh = fleet.identity(Role::Coordinator, None);
    let a = dial_agent(&fleet, fleet.trust(), &fresh, &fleet.trust()).await;
    assert_eq!(a.client, Ok(()), "{a:?}");
}

#[tokio::test]
async fn expired_crl_is_refused() {
    let fleet = Fleet::new("prod");
    let coord = fleet.identity(Role::Coordinator, None);
    let coordinator_trust = fleet.trust(); // loaded while the CRL is fresh
    let now = time::OffsetDateTime::now_utc();
    fleet
        .pki
        .write_crl(
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let a = dial_agent(&fleet, fleet.trust(), &coord, &coordinator_trust).await;
    assert_refused_by_server(&a, PeerRejection::RevocationListExpired);
}

#[tokio::test]
async fn operator_certificate_dialling_an_agent_is_refused() {
    let fleet = Fleet::new("prod");
    let op = fleet.identity(Role::Operator, Some("alice"));
    let a = dial_agent(&fleet, fleet.trust(), &op, &fleet.trust()).await;
    assert_refused_by_server(
        &a,
        PeerRejection::WrongRole {
            expected: Role::Coordinator,
            got: "spiffe://prod/operator/alice".into(),
        },
    );
}

#[tokio::test]
async fn agent_certificate_posing_as_coordinator_is_refused() {
    let fleet = Fleet::new("prod");
    let imposter = fleet.identity(Role::Agent, Some("web2"));
    let a = dial_agent(&fleet, fleet.trust(), &imposter, &fleet.trust()).await;
    assert_refused_by_server(
        &a,
        PeerRejection::WrongRole {
            expected: Role::Coordinator,
            got: "spiffe://prod/agent/web2".into(),
        },
    );
}

#[tokio::test]
async fn agent_answering_for_another_host_is_refused_by_the_coordinator() {
    let fleet = Fleet::new("prod");
    let coord = fleet.identity(Role::Coordinator, None);
    // web2 serves where the coordinator dials web1.
    let web2 = fleet.identity(Role::Agent, Some("web2"));
    let slog = RejectionLog::new();
    let clog = RejectionLog::new();
    let scfg = quic::server_config(
        &web2,
        &fleet.trust(),
        Expectation::Exactly(fleet.id(Role::Coordinator, None)),
        ALPN,
        slog.clone(),
        QuicTimeouts::default(),
    )
    .unwrap();
    let web1 = fleet.id(Role::Agent, Some("web1"));
    let ccfg = quic::client_config(
        &coord,
        &fleet.trust(),
        web1.clone(),
        ALPN,
        clog.clone(),
        QuicTimeouts::default(),
    )
    .unwrap();
    let a = attempt(scfg, ccfg, &web1.server_name(), slog, clog).await;
    assert!(a.client.is_err() && a.server.is_err(), "{a:?}");
    assert_eq!(
        a.client_log.last(),
        Some(PeerRejection::WrongIdentity {
            expected: "spiffe://prod/agent/web1".into(),
            got: "spiffe://prod/agent/web2".into()
        }),
        "{a:?}"
    );
    let client_err = a.client.unwrap_err();
    assert!(
        client_err.contains("WrongIdentity"),
        "client error should name the cause: {client_err}"
    );
}

#[tokio::test]
async fn operator_any_of_role_is_accepted_on_control_port_but_agents_are_not() {
    let fleet = Fleet::new("prod");
    let coord = fleet.identity(Role::Coordinator, None);
    let expect = Expectation::AnyOf {
        fleet: "prod".into(),
        role: Role::Operator,
    };
    for (client, ok) in [
        (fleet.identity(Role::Operator, Some("alice")), true),
        (fleet.identity(Role::Agent, Some("web1")), false),
    ] {
        let slog = RejectionLog::new();
        let scfg = quic::server_config(
            &coord,
            &fleet.trust(),
            expect.clone(),
            ALPN,
            slog.clone(),
            QuicTimeouts::default(),
        )
        .unwrap();
        let cid = fleet.id(Role::Coordinator, None);
        let ccfg = quic::client_config(
            &client,
            &fleet.trust(),
            cid.clone(),
            ALPN,
            RejectionLog::new(),
            QuicTimeouts::default(),
        )
        .unwrap();
        let a = attempt(scfg, ccfg, &cid.server_name(), slog, RejectionLog::new()).await;
        assert_eq!(a.client.is_ok(), ok, "{a:?}");
        if !ok {
            assert!(
                matches!(a.server_log.last(), Some(PeerRejection::WrongRole { .. })),
                "{a:?}"
            );
        }
    }
}
