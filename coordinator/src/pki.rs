//! `tollgate certs init|issue|revoke|crl`: the operator-facing side of the fleet PKI.
//! All the work is in `tollgate-certs`; this module only turns results into sentences.

use std::path::Path;

use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::{Pki, RevokeTarget, Validity};
use tollgate_certs::{CertError, Role, SpiffeId};

/// `tollgate certs init`: a new fleet CA and an empty CRL.
pub fn init(out: &Path, fleet: &str) -> Result<Vec<String>, CertError> {
    let pki = Pki::init(out, fleet)?;
    Ok(vec![
        format!("created fleet CA for spiffe://{fleet} in {}", out.display()),
        format!(
            "  {}  (CA certificate: give it to every agent, coordinator and operator)",
            pki.ca_cert_path().display()
        ),
        format!(
            "  {}  (CA key, mode 0600: keep it off the fleet)",
            out.join(tollgate_certs::pki::CA_KEY).display()
        ),
        format!(
            "  {}  (CRL, valid {} days; refresh with `tollgate certs crl`)",
            pki.crl_path().display(),
            tollgate_certs::pki::DEFAULT_CRL_DAYS
        ),
    ])
}

/// `tollgate certs issue`: a leaf certificate for one role and name.
pub fn issue(
    dir: &Path,
    role: Role,
    name: Option<&str>,
    days: Option<i64>,
    force: bool,
) -> Result<Vec<String>, CertError> {
    let pki = Pki::open(dir)?;
    let validity = days.map(Validity::days).unwrap_or_default();
    let overwrite = if force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    let issued = pki.issue_with(role, name, validity, overwrite)?;
    Ok(vec![
        format!("issued {} (serial {})", issued.id, issued.serial),
        format!("  certificate {}", issued.cert_path.display()),
        format!("  key         {}  (mode 0600)", issued.key_path.display()),
        format!("  valid until {}", issued.not_after),
    ])
}

/// `tollgate certs revoke`: adds a certificate to the CRL and re-signs it.
pub fn revoke(dir: &Path, target: RevokeTarget) -> Result<Vec<String>, CertError> {
    let pki = Pki::open(dir)?;
    let entry = pki.revoke(&target)?;
    Ok(vec![
        format!("revoked serial {} ({})", entry.serial, entry.identity),
        format!(
            "  CRL re-signed: {} — copy it to every agent and the coordinator",
            pki.crl_path().display()
        ),
    ])
}

/// `tollgate certs crl`: re-signs the CRL so it does not expire.
pub fn refresh_crl(dir: &Path) -> Result<Vec<String>, CertError> {
    let pki = Pki::open(dir)?;
    let path = pki.refresh_crl()?;
    Ok(vec![format!("CRL re-signed: {}", path.display())])
}

/// Parses `--role` plus optional `--name` into an identity of the PKI's fleet.
pub fn identity(dir: &Path, role: Role, name: Option<&str>) -> Result<SpiffeId, CertError> {
    let pki = Pki::open(dir)?;
    SpiffeId::new(pki.fleet(), role, name)
}
