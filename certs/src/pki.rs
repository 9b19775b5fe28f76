//! The fleet CA on disk, as used by `tollgate certs init|issue|revoke|crl`.
//!
//! Layout of a PKI directory:
//!
//! | file | what |
//! |---|---|
//! | `fleet.json` | fleet name, CRL number, CRL lifetime, revoked serials |
//! | `ca.crt` / `ca.key` | the fleet CA (key 0600) |
//! | `crl.pem` | the current CRL, re-signed by every `revoke` and `crl` |
//! | `coordinator.crt` / `.key` | `spiffe://FLEET/coordinator` |
//! | `agent-NAME.crt` / `.key` | `spiffe://FLEET/agent/NAME` |
//! | `operator-NAME.crt` / `.key` | `spiffe://FLEET/operator/NAME` |
//!
//! Every write is atomic; keys are 0600 from creation; an existing file is replaced only when
//! the caller says so ([`Overwrite::Replace`]).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::CertError;
use crate::files::{Overwrite, Visibility, read, write_atomic};
use crate::identity::{Role, SpiffeId, validate_label};

pub const FLEET_FILE: &str = "fleet.json";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CRL_FILE: &str = "crl.pem";

/// Default lifetimes.
pub const DEFAULT_CA_DAYS: i64 = 3650;
pub const DEFAULT_LEAF_DAYS: i64 = 365;
pub const DEFAULT_CRL_DAYS: i64 = 30;

/// Certificates are valid from a little before "now", to absorb clock skew between hosts.
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    fleet: String,
    crl_number: u64,
    crl_days: i64,
    revoked: Vec<RevokedEntry>,
}

/// One revoked certificate, as remembered in `fleet.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedEntry {
    pub serial: String,
    pub identity: String,
    pub revoked_at: i64,
}

/// A leaf certificate and key written to disk.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// Validity window of a new leaf; `None` means "now - 5 min" and "now + DEFAULT_LEAF_DAYS".
#[derive(Debug, Clone, Copy, Default)]
pub struct Validity {
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
}

impl Validity {
    pub fn days(days: i64) -> Self {
        Validity {
            not_before: None,
            not_after: Some(OffsetDateTime::now_utc() + Duration::days(days)),
        }
    }
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    Identity(SpiffeId),
    /// Hex serial number, as printed by `issue`.
    Serial(String),
}

/// A PKI directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    fleet: String,
}

fn ca_params(fleet: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tollgate");
    dn.push(DnType::CommonName, format!("Tollgate fleet CA {fleet}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Generate("system random generator failed".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never a leading zero byte
    Ok(SerialNumber::from_slice(&bytes))
}

/// File stem of a leaf: `coordinator`, `agent-NAME`, `operator-NAME`.
pub fn leaf_stem(id: &SpiffeId) -> String {
    match id.name() {
        Some(n) => format!("{}-{n}", id.role()),
        None => id.role().to_string(),
    }
}

impl Pki {
    /// Creates a fleet CA in `dir` (created if missing). Refuses if a CA is already there.
    pub fn init(dir: &Path, fleet: &str) -> Result<Pki, CertError> {
        validate_label("fleet name", fleet)?;
        std::fs::create_dir_all(dir).map_err(|e| CertError::io(dir, e))?;
        for f in [CA_KEY, CA_CERT, FLEET_FILE] {
            let p = dir.join(f);
            if p.exists() {
                return Err(CertError::AlreadyExists { path: p });
            }
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params(fleet);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(DEFAULT_CA_DAYS);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        // Key first: a CA certificate without its key would be useless.
        write_atomic(
            &dir.join(CA_KEY),
            key.serialize_pem().as_bytes(),
            Visibility::Private,
            Overwrite::Refuse,
        )?;
        write_atomic(
            &dir.join(CA_CERT),
            cert.pem().as_bytes(),
            Visibility::Public,
            Overwrite::Refuse,
        )?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            fleet: fleet.to_string(),
        };
        let ff = FleetFile {
            fleet: fleet.to_string(),
            crl_number: 0,
            crl_days: DEFAULT_CRL_DAYS,
            revoked: vec![],
        };
        pki.write_fleet_file(&ff, Overwrite::Refuse)?;
        pki.refresh_crl()?;
        Ok(pki)
    }

    /// Opens an existing PKI directory.
    pub fn open(dir: &Path) -> Result<Pki, CertError> {
        let ff = Self::read_fleet_file(dir)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            fleet: ff.fleet,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    /// Paths of the certificate and key of `id` in this directory.
    pub fn leaf_paths(&self, id: &SpiffeId) -> (PathBuf, PathBuf) {
        let stem = leaf_stem(id);
        (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
        )
    }

    fn read_fleet_file(dir: &Path) -> Result<FleetFile, CertError> {
        let path = dir.join(FLEET_FILE);
        let bytes = read(&path)?;
        let ff: FleetFile = serde_json::from_slice(&bytes).map_err(|e| CertError::bad(&path, e))?;
        validate_label("fleet name", &ff.fleet).map_err(|e| CertError::bad(&path, e))?;
        Ok(ff)
    }

    fn write_fleet_file(&self, ff: &FleetFile, overwrite: Overwrite) -> Result<(), CertError> {
        let path = self.dir.join(FLEET_FILE);
        let text = serde_json::to_vec_pretty(ff).map_err(|e| CertError::bad(&path, e))?;
        write_atomic(&path, &text, Visibility::Public, overwrite)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let key_path = self.dir.join(CA_KEY);
        let pem = String::from_utf8(read(&key_path)?).map_err(|e| CertError::bad(&key_path, e))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| CertError::bad(&key_path, e))?;
        Ok(Issuer::new(ca_params(&self.fleet), key))
    }

    /// Issues a leaf for `role`/`name` with the default lifetime.
    pub fn issue(
        &self,
        role: Role,
        name: Option<&str>,
        overwrite: Overwrite,
    ) -> Result<Issued, CertError> {
        self.issue_with(role, name, Validity::default(), overwrite)
    }

    /// Issues a leaf whose URI SAN is the SPIFFE id and whose DNS SAN is its server name.
    /// Extended key usage follows the role: agents serve, operators dial, the coordinator both.
    pub fn issue_with(
        &self,
        role: Role,
        name: Option<&str>,
        validity: Validity,
        overwrite: Overwrite,
    ) -> Result<Issued, CertError> {
        let id = SpiffeId::new(&self.fleet, role, name)?;
        let (cert_path, key_path) = self.leaf_paths(&id);
        if overwrite == Overwrite::Refuse {
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    return Err(CertError::AlreadyExists { path: p.clone() });
                }
            }
        }
        let issuer = self.issuer()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tollgate");
        dn.push(DnType::CommonName, id.to_string());
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(id.to_string())?;
        let dns = rcgen::string::Ia5String::try_from(id.server_name())?;
        params.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Coordinator => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        };
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = validity.not_before.unwrap_or(now - BACKDATE);
        params.not_after = validity
            .not_after
            .unwrap_or(now + Duration::days(DEFAULT_LEAF_DAYS));
        let serial = random_serial()?;
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params.signed_by(&key, &issuer)?;
        write_atomic(
            &key_path,
            key.serialize_pem().as_bytes(),
            Visibility::Private,
            overwrite,
        )?;
        write_atomic(
            &cert_path,
            cert.pem().as_bytes(),
            Visibility::Public,
            overwrite,
        )?;
        Ok(Issued {
            id,
            cert_path,
            key_path,
            serial: serial_hex,
            not_after: params.not_after,
        })
    }

    /// Revokes a certificate and re-signs the CRL. Revoking twice is harmless.
    pub fn revoke(&self, target: &RevokeTarget) -> Result<RevokedEntry, CertError> {
        let (serial, identity) = match target {
            RevokeTarget::Serial(s) => {
                let s = s.trim().to_ascii_lowercase();
                if s.is_empty() || s.len() > 40 || hex::decode(&s).is_err() {
                    return Err(CertError::InvalidName {
                        what: "serial",
                        value: s,
                        reason: "expected up to 20 bytes of hex",
                    });
                }
                (s, String::from("(by serial)"))
            }
            RevokeTarget::Identity(id) => {
                let (cert_path, _) = self.leaf_paths(id);
                (serial_of(&cert_path)?, id.to_string())
            }
        };
        let mut ff = Self::read_fleet_file(&self.dir)?;
        let entry = match ff.revoked.iter().find(|r| r.serial == serial) {
            Some(existing) => existing.clone(),
            None => {
                let entry = RevokedEntry {
                    serial,
                    identity,
                    revoked_at: OffsetDateTime::now_utc().unix_timestamp(),
                };
                ff.revoked.push(entry.clone());
                self.write_fleet_file(&ff, Overwrite::Replace)?;
                entry
            }
        };
        self.refresh_crl()?;
        Ok(entry)
    }

    /// Re-signs the CRL valid from now for the fleet's CRL lifetime.
    pub fn refresh_crl(&self) -> Result<PathBuf, CertError> {
        let ff = Self::read_fleet_file(&self.dir)?;
        let now = OffsetDateTime::now_utc();
        self.write_crl(now - BACKDATE, now + Duration::days(ff.crl_days))
    }

    /// Re-signs the CRL with an explicit window (tests use it to make an expired CRL).
    pub fn write_crl(
        &self,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<PathBuf, CertError> {
        let mut ff = Self::read_fleet_file(&self.dir)?;
        ff.crl_number += 1;
        let mut revoked = Vec::with_capacity(ff.revoked.len());
        for r in &ff.revoked {
            let bytes =
                hex::decode(&r.serial).map_err(|e| CertError::bad(self.dir.join(FLEET_FILE), e))?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at)
                    .unwrap_or(this_update),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(ff.crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        let path = self.crl_path();
        write_atomic(
            &path,
            crl.pem()?.as_bytes(),
            Visibility::Public,
            Overwrite::Replace,
        )?;
        self.write_fleet_file(&ff, Overwrite::Replace)?;
        Ok(path)
    }

    /// Serials revoked so far.
    pub fn revoked(&self) -> Result<Vec<RevokedEntry>, CertError> {
        Ok(Self::read_fleet_file(&self.dir)?.revoked)
    }
}

/// Hex serial number of the first certificate in a PEM file.
pub fn serial_of(cert_path: &Path) -> Result<String, CertError> {
    let der = crate::tls::load_certs(cert_path)?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::bad(cert_path, "no certificate in file"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::bad(cert_path, e))?;
    Ok(hex::encode(cert.raw_serial()))
}
