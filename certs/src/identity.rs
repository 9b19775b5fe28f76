//! SPIFFE-style identities: `spiffe://FLEET/coordinator`, `spiffe://FLEET/agent/HOST`,
//! `spiffe://FLEET/operator/NAME`.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

use crate::CertError;

/// What a certificate holder is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Coordinator,
    Agent,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            _ => Err(CertError::InvalidName {
                what: "role",
                value: s.to_string(),
                reason: "expected coordinator, agent or operator",
            }),
        }
    }
}

/// Checks a fleet or holder name: 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or
/// ending with `-` (a DNS label, so it can also form the TLS server name).
pub fn validate_label(what: &'static str, value: &str) -> Result<(), CertError> {
    let bad = |reason| {
        Err(CertError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() || value.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    Ok(())
}

/// A parsed, validated identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    fleet: String,
    role: Role,
    name: Option<String>,
}

impl SpiffeId {
    /// Builds an identity. The coordinator has no name; agents and operators must have one.
    pub fn new(fleet: &str, role: Role, name: Option<&str>) -> Result<Self, CertError> {
        validate_label("fleet name", fleet)?;
        match (role, name) {
            (Role::Coordinator, None) => {}
            (Role::Coordinator, Some(n)) => {
                return Err(CertError::InvalidName {
                    what: "coordinator name",
                    value: n.to_string(),
                    reason: "the coordinator identity has no name part",
                });
            }
            (_, None) => {
                return Err(CertError::InvalidName {
                    what: "name",
                    value: String::new(),
                    reason: "agents and operators need a name",
                });
            }
            (_, Some(n)) => validate_label("name", n)?,
        }
        Ok(SpiffeId {
            fleet: fleet.to_string(),
            role,
            name: name.map(str::to_string),
        })
    }

    pub fn coordinator(fleet: &str) -> Result<Self, CertError> {
        Self::new(fleet, Role::Coordinator, None)
    }

    pub fn agent(fleet: &str, host: &str) -> Result<Self, CertError> {
        Self::new(fleet, Role::Agent, Some(host))
    }

    pub fn operator(fleet: &str, name: &str) -> Result<Self, CertError> {
        Self::new(fleet, Role::Operator, Some(name))
    }

    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The DNS name a server certificate for this identity carries, and that a client dials:
    /// `NAME.ROLE.FLEET.tollgate` (or `coordinator.FLEET.tollgate`).
    pub fn server_name(&self) -> String {
        match &self.name {
            Some(n) => format!("{n}.{}.{}.tollgate", self.role, self.fleet),
            None => format!("{}.{}.tollgate", self.role, self.fleet),
        }
    }

    /// Reads the single SPIFFE id from a certificate's URI SANs.
    pub fn from_cert(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| CertError::PeerCertificate(format!("unparsable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::PeerCertificate(format!("bad SAN extension: {e}")))?
            .ok_or_else(|| CertError::PeerCertificate("no subjectAltName extension".into()))?;
        let mut found = None;
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                if found.is_some() {
                    return Err(CertError::PeerCertificate("more than one SPIFFE id".into()));
                }
                found = Some(uri.parse::<SpiffeId>()?);
            }
        }
        found.ok_or_else(|| CertError::PeerCertificate("no spiffe:// URI SAN".into()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.fleet, self.role)?;
        if let Some(n) = &self.name {
            write!(f, "/{n}")?;
        }
        Ok(())
    }
}

impl FromStr for SpiffeId {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| CertError::InvalidSpiffeId {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (fleet, role, name) = match parts.as_slice() {
            [fleet, role] => (*fleet, *role, None),
            [fleet, role, name] => (*fleet, *role, Some(*name)),
            _ => {
                return Err(bad(
                    "expected spiffe://FLEET/ROLE or spiffe://FLEET/ROLE/NAME",
                ));
            }
        };
        let role: Role = role.parse().map_err(|e: CertError| bad(&e.to_string()))?;
        SpiffeId::new(fleet, role, name).map_err(|e| bad(&e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for text in [
            "spiffe://prod/coordinator",
            "spiffe://prod/agent/web-1",
            "spiffe://p/operator/alice",
        ] {
            let id: SpiffeId = text.parse().unwrap();
            assert_eq!(id.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed_ids_with_reasons() {
        for (text, needle) in [
            ("http://prod/coordinator", "spiffe://"),
            ("spiffe://prod/coordinator/x", "no name part"),
            ("spiffe://prod/agent", "need a name"),
            ("spiffe://prod/wizard/x", "role"),
            ("spiffe://Prod/agent/x", "lowercase"),
            ("spiffe://prod/agent/a/b", "expected"),
            ("spiffe://prod/agent/-x", "start or end"),
        ] {
            let err = text.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn server_names_are_dns_names() {
        let id = SpiffeId::agent("prod", "web1").unwrap();
        assert_eq!(id.server_name(), "web1.agent.prod.tollgate");
        assert!(rustls_pki_types::ServerName::try_from(id.server_name()).is_ok());
        let c = SpiffeId::coordinator("prod").unwrap();
        assert_eq!(c.server_name(), "coordinator.prod.tollgate");
    }
}
