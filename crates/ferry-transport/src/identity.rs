//! Who is at the other end of a mesh connection: the role and name its certificate
//! carries.
//!
//! Every certificate of a ferry mesh names its holder with one URI subject alternative
//! name, SPIFFE-style: `urn:ferry:agent:<host>` (a ferryd; the peer API and the data plane
//! serve only these), `urn:ferry:operator:<name>` (the control API, everything) or
//! `urn:ferry:reader:<name>` (the control API, read-only). The mesh CA vouches for the
//! name; an agent takes a peer's host name from here, never from a request field.

use std::fmt;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The prefix of the role URI.
pub const URI_PREFIX: &str = "urn:ferry:";

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A ferryd: peer API, data plane.
    Agent,
    /// A person or orchestrator: the whole control API.
    Operator,
    /// Monitoring: the control API's read-only calls.
    Reader,
}

impl Role {
    /// The role's name in the URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }

    /// The URI naming `name` in this role.
    pub fn uri(self, name: &str) -> String {
        format!("{URI_PREFIX}{}:{name}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "reader" => Ok(Role::Reader),
            other => Err(format!("unknown role {other:?} (agent, operator, reader)")),
        }
    }
}

/// Whether `name` may be used in a role URI and as a host or operator name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The holder of a verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    /// Host name (agents) or operator name.
    pub name: String,
    /// The certificate's serial number, lower-case hex without leading zeros (what a
    /// deny list names).
    pub serial: String,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (serial {})", self.role, self.name, self.serial)
    }
}

/// Why a certificate names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error(
        "certificate {subject} carries no ferry role (a SAN URI urn:ferry:<agent|operator|reader>:<name>): issue it with `ferryctl certs init`"
    )]
    NoRole { subject: String },
    #[error("certificate {subject} carries more than one ferry role")]
    TwoRoles { subject: String },
    #[error("certificate {subject}: bad ferry role URI {uri:?}: {why}")]
    BadUri {
        subject: String,
        uri: String,
        why: String,
    },
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate (one the TLS layer already verified).
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let subject = cert.subject().to_string();
        let mut found: Option<(Role, String)> = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                let GeneralName::URI(uri) = n else { continue };
                let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
                    continue;
                };
                let bad = |why: String| IdentityError::BadUri {
                    subject: subject.clone(),
                    uri: uri.to_string(),
                    why,
                };
                let (role, name) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected <role>:<name>".into()))?;
                let role: Role = role.parse().map_err(bad)?;
                if !valid_name(name) {
                    return Err(bad("the name must be 1-64 of [A-Za-z0-9._-]".into()));
                }
                if found.is_some() {
                    return Err(IdentityError::TwoRoles { subject });
                }
                found = Some((role, name.to_string()));
            }
        }
        let (role, name) = found.ok_or(IdentityError::NoRole { subject })?;
        Ok(PeerIdentity {
            role,
            name,
            serial: serial_hex(cert.raw_serial()),
            not_after_unix: cert.validity().not_after.timestamp(),
        })
    }
}

/// A serial number as lower-case hex without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed: &[u8] = match raw.iter().position(|&b| b != 0) {
        Some(i) => &raw[i..],
        None => &[0],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalises a serial as an operator may write it (`0A:1b:..`, `0x0a1b`, `a1b`).
pub fn normalise_serial(s: &str) -> String {
    let hex: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    let t = hex.trim_start_matches('0');
    let t = if t.is_empty() { "0" } else { t };
    // Whole bytes, as `serial_hex` prints them.
    if t.len() % 2 == 1 {
        format!("0{t}")
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_names_are_checked() {
        for r in [Role::Agent, Role::Operator, Role::Reader] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("admin".parse::<Role>().is_err());
        assert_eq!(Role::Agent.uri("kvm1"), "urn:ferry:agent:kvm1");
        assert!(valid_name("kvm-1.dc2"));
        assert!(!valid_name(""));
        assert!(!valid_name("a:b"));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn serials_compare_however_written() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0x1b]), "0a1b");
        assert_eq!(normalise_serial("0A:1B"), "0a1b");
        assert_eq!(normalise_serial("0x00a1b"), "0a1b");
        assert_eq!(normalise_serial("a1b"), "0a1b");
        assert_eq!(serial_hex(&[0]), "00");
        assert_eq!(normalise_serial("0"), "00");
    }
}
