//! TLS for the gRPC API: the same mesh CA and host certificate as the QUIC data plane,
//! with client certificates required (agents and operators alike).

use crate::config::TlsConfig;
use anyhow::Context;
use ferry_transport::pki::Identity;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};

/// Loads the mesh identity named in the config.
pub fn load_identity(cfg: &TlsConfig) -> anyhow::Result<Identity> {
    Identity::load(&cfg.ca, &cfg.cert, &cfg.key).context("loading TLS identity")
}

/// Server-side TLS: our certificate, and only clients with a certificate from the mesh CA.
pub fn server_tls(id: &Identity) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&id.ca_pem))
}

/// A gRPC channel to `addr` ("host:port") authenticated with `id`. The host part must
/// appear in the server certificate's names.
pub async fn connect(addr: &str, id: &Identity) -> Result<Channel, tonic::transport::Error> {
    connect_with_deadline(addr, id, std::time::Duration::from_secs(60)).await
}

/// [`connect`] with `deadline` on every call made over the channel: a peer that stops
/// answering gives `DEADLINE_EXCEEDED` instead of a hang.
pub async fn connect_with_deadline(
    addr: &str,
    id: &Identity,
    deadline: std::time::Duration,
) -> Result<Channel, tonic::transport::Error> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&id.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .domain_name(host.to_string());
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(deadline)
        .connect()
        .await
}
