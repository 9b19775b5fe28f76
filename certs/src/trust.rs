//! The fleet CA and its CRL, with revocation that takes effect while the process runs.
//!
//! A [`TrustStore`] is shared by every config a process builds. Each handshake asks it for the
//! verifier of the CRL in force *now*, so a re-signed `crl.pem` refuses new handshakes of a
//! revoked peer as soon as it is read. Connections that are already open are registered with
//! [`TrustStore::watch_client`] / [`TrustStore::watch_server`]; on every CRL change (and once a
//! minute anyway, so a certificate or CRL that expires mid-connection is noticed) their peer
//! chains are verified again and the connections of peers that no longer verify are closed with
//! [`CLOSE_UNTRUSTED`].
//!
//! The CRL is re-read by [`watch`]: periodically (a changed file is found by its content, so a
//! replaced, renamed-over or edited file all count), and at once on SIGHUP on Unix. A CRL that
//! cannot be read or parsed leaves the last good one in force and is reported every time it
//! changes; the last good one still expires at its `nextUpdate`, after which every handshake is
//! refused (fail closed). The CA certificate itself is read once: replacing the CA needs a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use crate::CertError;
use crate::identity::SpiffeId;
use crate::tls::{PeerRejection, classify, load_certs, provider};

/// QUIC application close code of a connection whose peer no longer verifies (revoked, or its
/// certificate or the CRL expired).
pub const CLOSE_UNTRUSTED: u32 = 0x52;

/// Open connections are re-checked at least this often even when the CRL does not change.
const RECHECK_AFTER: Duration = Duration::from_secs(60);

/// The CRL in force and the verifiers built from it.
#[derive(Debug)]
struct Snapshot {
    digest: [u8; 32],
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

/// Which side of a watched connection the peer is.
#[derive(Debug)]
enum PeerSide {
    /// The peer dialled us and presented a client certificate.
    Client,
    /// We dialled the peer, which presented a server certificate for this name.
    Server(ServerName<'static>),
}

#[derive(Debug)]
struct Watched {
    conn: quinn::Connection,
    peer: String,
    chain: Vec<CertificateDer<'static>>,
    side: PeerSide,
}

#[derive(Debug)]
struct Inner {
    crl_path: PathBuf,
    roots: Arc<RootCertStore>,
    current: RwLock<Arc<Snapshot>>,
    watched: Mutex<Vec<Watched>>,
    /// The last reload error reported, so a broken file is logged when it changes, not on
    /// every re-read.
    last_error: Mutex<Option<String>>,
    last_recheck: Mutex<Instant>,
}

/// The fleet CA and the CRL currently in force. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct TrustStore {
    inner: Arc<Inner>,
}

/// A connection closed because its peer no longer verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The peer's SPIFFE id (or its certificate's subject, if it carries none).
    pub peer: String,
    pub reason: PeerRejection,
}

/// What one re-read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Same CRL as before; `closed` is non-empty only when the periodic re-check found a
    /// peer that no longer verifies (an expired certificate or CRL).
    Unchanged { closed: Vec<Closed> },
    /// A new CRL is in force; every open connection was re-checked.
    Changed { closed: Vec<Closed> },
}

impl Reload {
    pub fn closed(&self) -> &[Closed] {
        match self {
            Reload::Unchanged { closed } | Reload::Changed { closed } => closed,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Parses a CRL file and builds the verifiers that enforce it.
fn snapshot(
    roots: &Arc<RootCertStore>,
    crl_path: &Path,
    bytes: &[u8],
) -> Result<Snapshot, CertError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::bad(crl_path, format!("not a PEM CRL file: {e}")))?;
    if crls.is_empty() {
        return Err(CertError::bad(
            crl_path,
            "no CRL in file (run `tollgate certs crl`)",
        ));
    }
    let provider = provider();
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| CertError::bad(crl_path, format!("unusable CRL: {e}")))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| CertError::bad(crl_path, format!("unusable CRL: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut d = [0u8; 32];
    d.copy_from_slice(digest.as_ref());
    Ok(Snapshot {
        digest: d,
        client,
        server,
    })
}

impl TrustStore {
    /// Reads the CA certificate(s) and the CRL; both must be usable.
    pub fn load(ca_path: &Path, crl_path: &Path) -> Result<Self, CertError> {
        let mut roots = RootCertStore::empty();
        for cert in load_certs(ca_path)? {
            roots
                .add(cert)
                .map_err(|e| CertError::bad(ca_path, format!("unusable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let bytes = crate::files::read(crl_path)?;
        let snap = snapshot(&roots, crl_path, &bytes)?;
        Ok(TrustStore {
            inner: Arc::new(Inner {
                crl_path: crl_path.to_path_buf(),
                roots,
                current: RwLock::new(Arc::new(snap)),
                watched: Mutex::new(Vec::new()),
                last_error: Mutex::new(None),
                last_recheck: Mutex::new(Instant::now()),
            }),
        })
    }

    fn current(&self) -> Arc<Snapshot> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The client-certificate verifier of the CRL in force.
    pub(crate) fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current().client.clone()
    }

    /// The server-certificate verifier of the CRL in force.
    pub(crate) fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.current().server.clone()
    }

    /// Re-checks `conn`'s peer (a client that dialled us) on every CRL change until it closes.
    pub fn watch_client(&self, conn: &quinn::Connection) {
        self.watch(conn, PeerSide::Client);
    }

    /// Re-checks `conn`'s peer (a server we dialled as `expected`) on every CRL change until
    /// it closes.
    pub fn watch_server(&self, conn: &quinn::Connection, expected: &SpiffeId) {
        match ServerName::try_from(expected.server_name()) {
            Ok(name) => self.watch(conn, PeerSide::Server(name)),
            Err(e) => {
                // Cannot happen for a name the handshake just accepted; fail closed anyway.
                tracing::error!(peer = %expected, error = %e, "cannot re-check this peer: closing");
                conn.close(CLOSE_UNTRUSTED.into(), b"peer cannot be re-checked");
            }
        }
    }

    fn watch(&self, conn: &quinn::Connection, side: PeerSide) {
        let chain = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| *b)
            .unwrap_or_default();
        if chain.is_empty() {
            conn.close(CLOSE_UNTRUSTED.into(), b"peer presented no certificate");
            return;
        }
        let peer = SpiffeId::from_cert(&chain[0])
            .map(|id| id.to_string())
            .unwrap_or_else(|_| "(no SPIFFE id)".to_string());
        let entry = Watched {
            conn: conn.clone(),
            peer,
            chain,
            side,
        };
        // The CRL may have changed between the handshake and now: check against the current one.
        let snap = self.current();
        if let Err(reason) = recheck(&snap, &entry) {
            close(&entry, &reason);
            return;
        }
        let mut w = lock(&self.inner.watched);
        w.retain(|x| x.conn.close_reason().is_none());
        w.push(entry);
    }

    /// Open connections being watched (closed ones are dropped on the next reload).
    pub fn watched(&self) -> usize {
        lock(&self.inner.watched)
            .iter()
            .filter(|x| x.conn.close_reason().is_none())
            .count()
    }

    /// Re-reads the CRL. A changed one goes into force and every open connection is re-checked;
    /// a file that cannot be read or parsed leaves the last good CRL in force and is an error.
    pub fn reload(&self) -> Result<Reload, CertError> {
        let read = crate::files::read(&self.inner.crl_path).and_then(|bytes| {
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            if digest.as_ref() == self.current().digest {
                return Ok(None);
            }
            snapshot(&self.inner.roots, &self.inner.crl_path, &bytes).map(Some)
        });
        let fresh = match read {
            Ok(f) => {
                *lock(&self.inner.last_error) = None;
                f
            }
            Err(e) => {
                let text = e.to_string();
                let mut last = lock(&self.inner.last_error);
                if last.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "cannot re-read the CRL; the last good one stays in force until it expires");
                    *last = Some(text);
                }
                return Err(e);
            }
        };
        match fresh {
            Some(snap) => {
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
                let closed = self.recheck_all();
                // Logged once every open connection was re-checked (tests wait on this line).
                tracing::info!(crl = %self.inner.crl_path.display(), closed = closed.len(), "new CRL in force");
                Ok(Reload::Changed { closed })
            }
            None => {
                let due = lock(&self.inner.last_recheck).elapsed() >= RECHECK_AFTER;
                let closed = if due { self.recheck_all() } else { Vec::new() };
                Ok(Reload::Unchanged { closed })
            }
        }
    }

    /// Verifies every open watched connection's peer again; closes those that fail.
    fn recheck_all(&self) -> Vec<Closed> {
        *lock(&self.inner.last_recheck) = Instant::now();
        let snap = self.current();
        let mut closed = Vec::new();
        let mut w = lock(&self.inner.watched);
        w.retain(|entry| {
            if entry.conn.close_reason().is_some() {
                return false;
            }
            match recheck(&snap, entry) {
                Ok(()) => true,
                Err(reason) => {
                    close(entry, &reason);
                    closed.push(Closed {
                        peer: entry.peer.clone(),
                        reason,
                    });
                    false
                }
            }
        });
        closed
    }
}

fn recheck(snap: &Snapshot, entry: &Watched) -> Result<(), PeerRejection> {
    let Some((end_entity, intermediates)) = entry.chain.split_first() else {
        return Err(PeerRejection::NoCertificate);
    };
    let now = UnixTime::now();
    let result = match &entry.side {
        PeerSide::Client => snap
            .client
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ()),
        PeerSide::Server(name) => snap
            .server
            .verify_server_cert(end_entity, intermediates, name, &[], now)
            .map(|_| ()),
    };
    result.map_err(|e| classify(&e))
}

fn close(entry: &Watched, reason: &PeerRejection) {
    tracing::warn!(peer = %entry.peer, %reason, "closing the connection of a peer that no longer verifies");
    entry
        .conn
        .close(CLOSE_UNTRUSTED.into(), reason.to_string().as_bytes());
}

/// Re-reads the CRL every `every` and, on Unix, at once on SIGHUP, for as long as the process
/// runs. Spawn it on the runtime that serves the connections.
pub async fn watch(trust: TrustStore, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the store was just loaded
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the CRL is re-read periodically only");
            None
        }
    };
    loop {
        #[cfg(unix)]
        {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = hup => tracing::info!("SIGHUP: re-reading the CRL"),
            }
        }
        #[cfg(not(unix))]
        tick.tick().await;
        // Errors are reported inside `reload`; the last good CRL stays in force.
        let _ = trust.reload();
    }
}
