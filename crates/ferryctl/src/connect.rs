//! Connecting to an agent: which TLS files to use, loading them, the mutual-TLS gRPC channel,
//! and turning gRPC errors into readable messages.

use crate::cli::TlsOpts;
use anyhow::{anyhow, bail, Context, Result};
use ferry_api::v1::ferry_control_client::FerryControlClient;
use ferry_transport::pki::Identity;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long to wait for the TCP + TLS handshake with an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The three PEM files of a client identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Mesh CA certificate.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client private key.
    pub key: PathBuf,
}

/// Decides which files to use: `--pki-dir DIR --identity NAME` gives `DIR/ca.pem`,
/// `DIR/NAME.pem`, `DIR/NAME.key`; `--ca`, `--cert`, `--key` override them one by one.
/// Does not touch the file system.
pub fn resolve_tls_files(opts: &TlsOpts) -> Result<TlsFiles> {
    let from_dir = match (&opts.pki_dir, &opts.identity) {
        (Some(dir), Some(name)) => Some(ferry_transport::pki::host_files(dir, name)),
        (Some(dir), None) => bail!(
            "--pki-dir {} needs --identity NAME (env FERRY_IDENTITY): the host certificate to use from it",
            dir.display()
        ),
        (None, _) => None,
    };
    let pick = |explicit: &Option<PathBuf>, dir: Option<&PathBuf>| {
        explicit.clone().or_else(|| dir.cloned())
    };
    let ca = pick(&opts.ca, from_dir.as_ref().map(|f| &f.ca));
    let cert = pick(&opts.cert, from_dir.as_ref().map(|f| &f.cert));
    let key = pick(&opts.key, from_dir.as_ref().map(|f| &f.key));
    match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => Ok(TlsFiles { ca, cert, key }),
        (None, None, None) => bail!(
            "no TLS identity given: the agent requires mutual TLS. Use --pki-dir DIR --identity NAME \
             (env FERRY_PKI_DIR, FERRY_IDENTITY) or --ca FILE --cert FILE --key FILE \
             (env FERRY_CA, FERRY_CERT, FERRY_KEY); `ferryctl certs init` makes a development PKI"
        ),
        (ca, cert, key) => {
            let missing: Vec<&str> = [("--ca", ca.is_none()), ("--cert", cert.is_none()), ("--key", key.is_none())]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
            bail!("incomplete TLS identity: missing {} (or use --pki-dir DIR --identity NAME)", missing.join(", "))
        }
    }
}

/// Loads the identity, saying which file is missing or unreadable.
pub fn load_identity(files: &TlsFiles) -> Result<Identity> {
    for (what, path) in [
        ("CA certificate", &files.ca),
        ("certificate", &files.cert),
        ("private key", &files.key),
    ] {
        if !path.exists() {
            bail!("TLS {what} {} does not exist", path.display());
        }
    }
    Identity::load(&files.ca, &files.cert, &files.key)
        .map_err(|e| anyhow!("loading TLS identity: {e}"))
}

/// Whether a host name or address (IPv6 with or without brackets) is this machine's
/// loopback: `localhost` or an address in 127.0.0.0/8 or `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host:port` (`[::1]:7701` gives `::1`), the name the agent's certificate
/// must carry.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']'])
}

/// Opens a mutual-TLS gRPC channel to the agent at `addr` (`host:port`).
pub async fn connect(addr: &str, id: &Identity) -> Result<FerryControlClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&id.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .domain_name(host_of(addr).to_string());
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("invalid agent address {addr:?} (expected host:port)"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .context("TLS configuration")?
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to agent at {addr}: {}", error_chain(&e)))?;
    Ok(FerryControlClient::new(channel))
}

/// Resolves and loads the TLS files, then connects.
pub async fn connect_with(addr: &str, opts: &TlsOpts) -> Result<FerryControlClient<Channel>> {
    let id = load_identity(&resolve_tls_files(opts)?)?;
    connect(addr, &id).await
}

/// `error: cause: cause` for an error and its sources, skipping repeats (tonic's transport
/// errors say little at the top and the useful part below).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A failed gRPC call as an error saying what was attempted and the agent's message (which
/// names the host, VM and step), not tonic's debug dump.
pub fn rpc_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let msg = status.message();
    let code = status.code();
    let text = if msg.is_empty() {
        format!("{code}")
    } else if matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unauthenticated
    ) {
        // Transport-level trouble: the code tells what kind.
        format!("{msg} ({code})")
    } else {
        msg.to_string()
    };
    anyhow!("{what}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> TlsOpts {
        TlsOpts::default()
    }

    #[test]
    fn no_identity_is_a_clear_error() {
        let e = resolve_tls_files(&opts())
            .expect_err("none given")
            .to_string();
        assert!(
            e.contains("no TLS identity") && e.contains("--pki-dir") && e.contains("FERRY_CA"),
            "{e}"
        );
    }

    #[test]
    fn pki_dir_needs_identity() {
        let o = TlsOpts {
            pki_dir: Some("/p".into()),
            ..opts()
        };
        let e = resolve_tls_files(&o).expect_err("no identity").to_string();
        assert!(e.contains("--identity"), "{e}");
    }

    #[test]
    fn pki_dir_and_overrides() {
        let o = TlsOpts {
            pki_dir: Some("/p".into()),
            identity: Some("ops".into()),
            ..opts()
        };
        let f = resolve_tls_files(&o).expect("resolved");
        assert_eq!(
            f,
            TlsFiles {
                ca: "/p/ca.pem".into(),
                cert: "/p/ops.pem".into(),
                key: "/p/ops.key".into()
            }
        );
        let o = TlsOpts {
            ca: Some("/other/ca.pem".into()),
            ..o
        };
        assert_eq!(
            resolve_tls_files(&o).expect("resolved").ca,
            PathBuf::from("/other/ca.pem")
        );
    }

    #[test]
    fn partial_files_name_what_is_missing() {
        let o = TlsOpts {
            ca: Some("/c".into()),
            ..opts()
        };
        let e = resolve_tls_files(&o).expect_err("partial").to_string();
        assert!(e.contains("missing --cert, --key"), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        ferry_transport::pki::write_dev_pki(dir.path(), &[("a".to_string(), vec![])]).expect("pki");
        let o = TlsOpts {
            pki_dir: Some(dir.path().into()),
            identity: Some("a".into()),
            ..opts()
        };
        load_identity(&resolve_tls_files(&o).expect("resolved")).expect("loads");
        let o = TlsOpts {
            identity: Some("zz".into()),
            ..o
        };
        let e = load_identity(&resolve_tls_files(&o).expect("resolved"))
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("certificate") && e.contains("zz.pem") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn hosts_and_errors() {
        assert_eq!(host_of("10.0.0.1:7701"), "10.0.0.1");
        assert_eq!(host_of("[::1]:7701"), "::1");
        assert_eq!(host_of("kvm02"), "kvm02");
        let e = rpc_error(
            "start VM web1",
            tonic::Status::not_found("alpha: VM web1 is not defined"),
        );
        assert_eq!(
            e.to_string(),
            "start VM web1: alpha: VM web1 is not defined"
        );
        let e = rpc_error("list VMs", tonic::Status::unavailable("tcp connect error"));
        assert!(
            e.to_string().starts_with("list VMs: tcp connect error ("),
            "{e}"
        );
        let e = rpc_error("list VMs", tonic::Status::new(tonic::Code::Internal, ""));
        assert!(e.to_string().starts_with("list VMs: "), "{e}");
        assert!(!e.to_string().contains("metadata"), "{e}");
    }

    #[tokio::test]
    async fn connection_refused_is_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        ferry_transport::pki::write_dev_pki(dir.path(), &[("a".to_string(), vec![])]).expect("pki");
        let f = ferry_transport::pki::host_files(dir.path(), "a");
        let id = Identity::load(&f.ca, &f.cert, &f.key).expect("identity");
        // Port 1 on loopback: nothing listens there.
        let e = connect("127.0.0.1:1", &id)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            e.starts_with("cannot connect to agent at 127.0.0.1:1: "),
            "{e}"
        );
        assert!(
            e.to_lowercase().contains("refused") || e.contains("connect"),
            "{e}"
        );
    }
}
