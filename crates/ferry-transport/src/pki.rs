//! A small PKI for a ferry mesh: one CA, one certificate per host (used both as TLS
//! server and client identity). `ferryctl certs` and the test suites use it.

use crate::TransportError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
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

/// Issues a host certificate valid for TLS server and client use. `sans` are DNS names
/// or IP addresses the host is reached at; `localhost` and 127.0.0.1 are always added.
pub fn issue_host_cert(
    ca: &PemPair,
    host: &str,
    sans: &[String],
) -> Result<PemPair, TransportError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let mut names: Vec<String> = vec![host.to_string(), "localhost".into(), "127.0.0.1".into()];
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, host);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
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

/// Writes a development PKI: `ca.pem`, `ca.key`, and `<host>.pem`/`<host>.key` per host.
/// An existing CA in `dir` is reused, so hosts can be added later.
pub fn write_dev_pki(dir: &Path, hosts: &[(String, Vec<String>)]) -> Result<(), TransportError> {
    std::fs::create_dir_all(dir).map_err(|source| TransportError::WriteFile {
        path: dir.display().to_string(),
        source,
    })?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = if ca_pem.exists() && ca_key.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TransportError::ReadFile {
                what: "CA file",
                path: p.display().to_string(),
                source,
            })
        };
        PemPair {
            cert_pem: read(&ca_pem)?,
            key_pem: read(&ca_key)?,
        }
    } else {
        let ca = generate_ca("ferry dev CA")?;
        write_private(&ca_pem, &ca.cert_pem, 0o644)?;
        write_private(&ca_key, &ca.key_pem, 0o600)?;
        ca
    };
    for (host, sans) in hosts {
        let pair = issue_host_cert(&ca, host, sans)?;
        let f = host_files(dir, host);
        write_private(&f.cert, &pair.cert_pem, 0o644)?;
        write_private(&f.key, &pair.key_pem, 0o600)?;
    }
    Ok(())
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
