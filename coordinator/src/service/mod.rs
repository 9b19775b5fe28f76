//! `tollgate serve`: loads the configuration, starts the actors, closes runs a previous process
//! left open, and serves the control port.

pub mod ctl;
pub mod recovery;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tollgate_certs::files::{Overwrite, Visibility, write_atomic};
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{Expectation, RejectionLog, Role as CertRole, TlsIdentity, TrustStore};
use tollgate_protocol::CTL_ALPN;

use crate::config::{self, ConfigError, CoordinatorConfig, Inventory, Operations};
use crate::core::token::TokenIssuer;
use crate::journal::index::RunIndex;
use crate::runtime::clock::Clock;
use crate::runtime::coordinator::{Coordinator, Setup};
use crate::runtime::host::HostActor;
use crate::runtime::nonces::NonceStore;
use crate::runtime::recorder::Recorder;
use crate::transport::agent::AgentConnector;
use crate::transport::{Reach, ReachContext};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Certs(#[from] tollgate_certs::CertError),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// Everything `serve` needs, loaded and validated.
#[derive(Debug)]
pub struct Loaded {
    pub config: CoordinatorConfig,
    pub config_file: String,
    pub inventory: Inventory,
    pub operations: Operations,
    pub identity: Arc<TlsIdentity>,
    pub trust: TrustStore,
    pub signing_pkcs8: Vec<u8>,
}

/// Reads the token signing key, creating it (0600) the first time.
fn signing_key(path: &Path) -> Result<Vec<u8>, ServiceError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| ServiceError::Io {
                path: path.to_path_buf(),
                reason: format!("not an Ed25519 PKCS#8 key: {e}"),
            })?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| ServiceError::Io {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ServiceError::Io {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            write_atomic(path, doc.as_ref(), Visibility::Private, Overwrite::Refuse)?;
            tracing::info!(path = %path.display(), "created the token signing key");
            Ok(doc.as_ref().to_vec())
        }
        Err(e) => Err(ServiceError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Where the public half of the signing key lives: beside it, `.pub`, hex. Auditors verify
/// runs offline with it (`tollgate runs verify --dir RUN_DIR --key FILE`).
pub fn public_key_path(signing_key: &Path) -> PathBuf {
    signing_key.with_extension("pub")
}

fn write_public_key(signing_key: &Path, key: &Ed25519KeyPair) -> Result<(), ServiceError> {
    let path = public_key_path(signing_key);
    let text = format!("{}\n", hex::encode(key.public_key().as_ref()));
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    write_atomic(
        &path,
        text.as_bytes(),
        Visibility::Public,
        Overwrite::Replace,
    )?;
    Ok(())
}

/// Loads `coordinator.toml` and everything it points at.
pub fn load(config_path: &Path) -> Result<Loaded, ServiceError> {
    let config = config::load_coordinator(config_path)?;
    let file = config_path.display().to_string();
    let inventory = config::load_inventory_of(&config)?;
    let operations = config::load_operations(&config.operations)?;
    config::validate_operations(&operations, &inventory)?;
    let crl = config.tls.crl.clone().ok_or_else(|| {
        ConfigError::invalid(
            &file,
            "tls.crl",
            "required: the coordinator refuses to run without checking revocation",
        )
    })?;
    let identity = TlsIdentity::load(&config.tls.cert, &config.tls.key)?;
    if identity.id.role() != CertRole::Coordinator {
        return Err(ConfigError::invalid(
            &file,
            "tls.cert",
            format!("{} is not a coordinator certificate", identity.id),
        )
        .into());
    }
    let trust = TrustStore::load(&config.tls.ca, &crl)?;
    let signing_pkcs8 = signing_key(&config.tokens.signing_key)?;
    Ok(Loaded {
        config,
        config_file: file,
        inventory,
        operations,
        identity: Arc::new(identity),
        trust,
        signing_pkcs8,
    })
}

/// How each inventory host is reached: each transport reads its own inventory entry.
fn reach_of(loaded: &Loaded) -> Result<BTreeMap<String, Reach>, ServiceError> {
    let mut out = BTreeMap::new();
    for (i, h) in loaded.inventory.hosts().iter().enumerate() {
        let at = ReachContext {
            inventory: loaded.inventory.source(),
            key: format!("hosts[{i}].transport"),
            fleet: loaded.identity.id.fleet(),
            pwsh: &loaded.config.pwsh,
            psremoting: &loaded.config.psremoting,
        };
        out.insert(h.name.clone(), Reach::of(&h.transport, &at)?);
    }
    Ok(out)
}

/// A running service.
#[derive(Debug)]
pub struct Running {
    pub ctl_addr: SocketAddr,
    pub coordinator: Addr<Coordinator>,
    pub endpoint: quinn::Endpoint,
    pub public_key: Vec<u8>,
    pub runs_dir: PathBuf,
}

/// Starts everything. Must be called inside an actix `System`.
pub async fn start(loaded: Loaded, clock: Clock) -> Result<Running, ServiceError> {
    let state_dir = loaded.config.state_dir.clone();
    let runs_dir = state_dir.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(|e| ServiceError::Io {
        path: runs_dir.clone(),
        reason: e.to_string(),
    })?;
    let issuer = TokenIssuer::from_pkcs8(&loaded.signing_pkcs8).map_err(|e| ServiceError::Io {
        path: loaded.config.tokens.signing_key.clone(),
        reason: e.to_string(),
    })?;
    let signer =
        Ed25519KeyPair::from_pkcs8(&loaded.signing_pkcs8).map_err(|e| ServiceError::Io {
            path: loaded.config.tokens.signing_key.clone(),
            reason: e.to_string(),
        })?;
    let public_key = signer.public_key().as_ref().to_vec();
    write_public_key(&loaded.config.tokens.signing_key, &signer)?;
    let signer = Arc::new(signer);
    let nonces = NonceStore::open(&state_dir).map_err(|e| ServiceError::Io {
        path: state_dir.clone(),
        reason: e.to_string(),
    })?;

    // The journal writer gets a thread of its own: an fsync never stalls a decision.
    let recorder_arbiter = Arbiter::new();
    let index = RunIndex::open(&runs_dir, &public_key).map_err(|e| ServiceError::Io {
        path: runs_dir.join(crate::journal::index::FILE),
        reason: format!(
            "{e}; the signed run index cannot be trusted, so the coordinator does not start (move it aside to inspect it; every run it named will then read as unindexed)"
        ),
    })?;
    let indexed = index.ids().clone();
    let rd = runs_dir.clone();
    let key = signer.clone();
    let recorder = Recorder::start_in_arbiter(&recorder_arbiter.handle(), move |_| {
        Recorder::new(rd, key, index)
    });

    let connector = AgentConnector::new(
        loaded.identity.clone(),
        loaded.trust.clone(),
        "0.0.0.0:0".parse().map_err(|_| ServiceError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "bad bind address".into(),
        })?,
    )
    .map_err(|e| ServiceError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        reason: e.to_string(),
    })?;
    let mut hosts = BTreeMap::new();
    for (name, reach) in reach_of(&loaded)? {
        let actor = HostActor::new(name.clone(), reach, connector.clone(), clock.clone()).start();
        hosts.insert(name, actor);
    }

    let setup = Setup {
        config: loaded.config.clone(),
        inventory: loaded.inventory.clone(),
        operations: loaded.operations.clone(),
        clock: clock.clone(),
        issuer: Arc::new(issuer),
        signer,
        public_key: public_key.clone(),
    };
    // Every run is read and every open one closed before the coordinator takes an intent.
    let recovered = recovery::recover(&runs_dir, &indexed, &hosts, &recorder, &setup).await;
    let mut coordinator_state =
        Coordinator::new(setup.clone(), hosts.clone(), recorder.clone(), nonces);
    for (report, record, started_ms) in recovered.closed {
        coordinator_state.adopt_closed(report, record, started_ms);
    }
    for (run_id, known) in recovered.damaged {
        coordinator_state.adopt_damaged(run_id, known);
    }
    let coordinator = coordinator_state.start();

    let server_cfg = quic::server_config(
        &loaded.identity,
        &loaded.trust,
        Expectation::AnyOf {
            fleet: loaded.identity.id.fleet().to_string(),
            role: CertRole::Operator,
        },
        CTL_ALPN,
        RejectionLog::new(),
        QuicTimeouts::default(),
    )?;
    let listen = loaded.config.listen;
    let endpoint = quinn::Endpoint::server(server_cfg, listen).map_err(|e| ServiceError::Bind {
        addr: listen,
        reason: e.to_string(),
    })?;
    let ctl_addr = endpoint.local_addr().map_err(|e| ServiceError::Bind {
        addr: listen,
        reason: e.to_string(),
    })?;
    let ctx = Arc::new(ctl::CtlContext {
        coordinator: coordinator.clone(),
        recorder: recorder.clone(),
        authorization: loaded.config.authorization.clone(),
        runs_dir: runs_dir.clone(),
        public_key: public_key.clone(),
        trust: loaded.trust.clone(),
    });
    actix::spawn(ctl::serve(endpoint.clone(), ctx));
    // Revocation without a restart: the CRL is re-read periodically and on SIGHUP; new
    // handshakes of revoked peers are refused and their open connections (operators on the
    // control port, links to agents) closed.
    actix::spawn(tollgate_certs::trust::watch(
        loaded.trust.clone(),
        std::time::Duration::from_millis(loaded.config.tls.crl_check_ms),
    ));
    Ok(Running {
        ctl_addr,
        coordinator,
        endpoint,
        public_key,
        runs_dir,
    })
}
