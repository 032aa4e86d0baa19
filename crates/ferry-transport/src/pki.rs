//! A small PKI for a ferry mesh: one CA; one certificate per agent (used both as TLS
//! server and client identity) and per operator or reader (client only), each carrying
//! its role and name as a SAN URI ([`crate::identity`]). `ferryctl certs` and the test
//! suites use it.

use crate::identity::Role;
use crate::TransportError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// PEM text of a certificate and its private key.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A host's TLS identity: its certificate chain, its key, and the CA it trusts.
#[derive(Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads PEM files from disk.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, TransportError> {
        let read = |what, p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TransportError::ReadFile {
                what,
                path: p.display().to_string(),
                source,
            })
        };
        let id = Identity {
            ca_pem: read("CA certificate", ca)?,
            cert_pem: read("certificate", cert)?,
            key_pem: read("private key", key)?,
        };
        // Parse now so a bad file is reported at start-up, naming the file.
        id.certs().map_err(|_| TransportError::EmptyPem {
            what: "certificate",
            path: cert.display().to_string(),
        })?;
        id.roots().map_err(|_| TransportError::EmptyPem {
            what: "CA certificate",
            path: ca.display().to_string(),
        })?;
        id.key().map_err(|_| TransportError::EmptyPem {
            what: "private key",
            path: key.display().to_string(),
        })?;
        Ok(id)
    }

    /// The role and name our own certificate carries, with its serial and expiry.
    pub fn peer_identity(
        &self,
    ) -> Result<crate::identity::PeerIdentity, crate::identity::IdentityError> {
        let certs = self
            .certs()
            .map_err(|e| crate::identity::IdentityError::Parse(e.to_string()))?;
        crate::identity::PeerIdentity::from_der(certs[0].as_ref())
    }

    pub(crate) fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TransportError> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(TransportError::EmptyPem {
                what: "certificate",
                path: "<identity>".into(),
            });
        }
        Ok(certs)
    }

    pub(crate) fn key(&self) -> Result<PrivateKeyDer<'static>, TransportError> {
        rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or(TransportError::EmptyPem {
                what: "private key",
                path: "<identity>".into(),
            })
    }

    pub(crate) fn roots(&self) -> Result<rustls::RootCertStore, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for c in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()).filter_map(Result::ok) {
            roots.add(c)?;
            n += 1;
        }
        if n == 0 {
            return Err(TransportError::EmptyPem {
                what: "CA certificate",
                path: "<identity>".into(),
            });
        }
        Ok(roots)
    }
}

/// Creates a new mesh CA.
pub fn generate_ca(common_name: &str) -> Result<PemPair, TransportError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "ferry mesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Default validity of the certificates [`write_dev_pki`] issues.
pub const DEFAULT_VALID_DAYS: u32 = 365;

/// Issues an agent certificate valid for TLS server and client use. `sans` are DNS names
/// or IP addresses the host is reached at; `localhost` and 127.0.0.1 are always added.
pub fn issue_host_cert(
    ca: &PemPair,
    host: &str,
    sans: &[String],
) -> Result<PemPair, TransportError> {
    issue_cert(ca, Role::Agent, host, sans, DEFAULT_VALID_DAYS)
}

/// Issues a certificate for `name` in `role`, valid from an hour ago for `days` days,
/// with a random serial. Agents get server and client use and their `sans` (plus
/// `localhost` and 127.0.0.1); operators and readers are clients only.
pub fn issue_cert(
    ca: &PemPair,
    role: Role,
    name: &str,
    sans: &[String],
    days: u32,
) -> Result<PemPair, TransportError> {
    if !crate::identity::valid_name(name) {
        return Err(TransportError::BadName(name.to_string()));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let mut names: Vec<String> = Vec::new();
    if role == Role::Agent {
        names = vec![name.to_string(), "localhost".into(), "127.0.0.1".into()];
        for s in sans {
            if !names.contains(s) {
                names.push(s.clone());
            }
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .subject_alt_names
        .push(SanType::URI(role.uri(name).try_into()?));
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if role == Role::Agent {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    // Random, positive, 16 bytes: what a deny list names.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Paths of one host's files in a PKI directory.
pub struct HostFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where `write_dev_pki` puts the files of `host` under `dir`.
pub fn host_files(dir: &Path, host: &str) -> HostFiles {
    HostFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{host}.pem")),
        key: dir.join(format!("{host}.key")),
    }
}

/// Writes a development PKI: `ca.pem`, `ca.key`, and `<host>.pem`/`<host>.key` per agent.
/// An existing CA in `dir` is reused, so hosts can be added later.
pub fn write_dev_pki(dir: &Path, hosts: &[(String, Vec<String>)]) -> Result<(), TransportError> {
    write_dev_certs(dir, Role::Agent, hosts, DEFAULT_VALID_DAYS)
}

/// Writes `<name>.pem`/`<name>.key` in `role` for each of `names` (with their SANs, for
/// agents), valid for `days`, issued by the CA in `dir` (made first if there is none).
pub fn write_dev_certs(
    dir: &Path,
    role: Role,
    names: &[(String, Vec<String>)],
    days: u32,
) -> Result<(), TransportError> {
    let ca = load_or_create_ca(dir)?;
    for (name, sans) in names {
        let pair = issue_cert(&ca, role, name, sans, days)?;
        let f = host_files(dir, name);
        write_private(&f.cert, &pair.cert_pem, 0o644)?;
        write_private(&f.key, &pair.key_pem, 0o600)?;
    }
    Ok(())
}

/// The CA in `dir` (`ca.pem`, `ca.key`), created if absent.
pub fn load_or_create_ca(dir: &Path) -> Result<PemPair, TransportError> {
    std::fs::create_dir_all(dir).map_err(|source| TransportError::WriteFile {
        path: dir.display().to_string(),
        source,
    })?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if ca_pem.exists() && ca_key.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TransportError::ReadFile {
                what: "CA file",
                path: p.display().to_string(),
                source,
            })
        };
        return Ok(PemPair {
            cert_pem: read(&ca_pem)?,
            key_pem: read(&ca_key)?,
        });
    }
    let ca = generate_ca("ferry dev CA")?;
    write_private(&ca_pem, &ca.cert_pem, 0o644)?;
    write_private(&ca_key, &ca.key_pem, 0o600)?;
    Ok(ca)
}

fn write_private(path: &Path, text: &str, mode: u32) -> Result<(), TransportError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| TransportError::WriteFile {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(path, text).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PeerIdentity;

    #[test]
    fn certificates_carry_role_name_serial_and_expiry() {
        let ca = generate_ca("test CA").expect("CA");
        let agent = issue_cert(&ca, Role::Agent, "kvm1", &["10.0.0.1".into()], 30).expect("agent");
        let op = issue_cert(&ca, Role::Operator, "alice", &[], 30).expect("operator");
        let der = |p: &PemPair| {
            rustls_pemfile::certs(&mut p.cert_pem.as_bytes())
                .next()
                .expect("one cert")
                .expect("pem")
        };
        let a = PeerIdentity::from_der(der(&agent).as_ref()).expect("agent identity");
        assert_eq!((a.role, a.name.as_str()), (Role::Agent, "kvm1"));
        let o = PeerIdentity::from_der(der(&op).as_ref()).expect("operator identity");
        assert_eq!((o.role, o.name.as_str()), (Role::Operator, "alice"));
        assert_ne!(a.serial, o.serial, "random serials");
        assert_eq!(a.serial.len(), 32, "{}", a.serial);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let days = (a.not_after_unix - now) as f64 / 86400.0;
        assert!((29.9..30.1).contains(&days), "{days}");
        assert!(matches!(
            issue_cert(&ca, Role::Operator, "a:b", &[], 1),
            Err(TransportError::BadName(_))
        ));
        // A certificate without a role (as issued before roles) names none.
        let mut params = CertificateParams::new(vec!["old".to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, "old");
        let issuer =
            Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).expect("key"))
                .expect("issuer");
        let old = params
            .signed_by(&KeyPair::generate().expect("key"), &issuer)
            .expect("old cert");
        let e = PeerIdentity::from_der(old.der()).expect_err("no role");
        assert!(e.to_string().contains("carries no ferry role"), "{e}");
    }
}
