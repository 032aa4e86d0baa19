//! Who may call what. Every gRPC call and every data-plane connection is checked
//! against the role and name its (CA-verified) client certificate carries
//! ([`ferry_transport::identity`]) and against the deny list of certificate serials
//! (`[tls] deny_serials`, re-read on SIGHUP):
//!
//! | caller | control API | peer API, data plane |
//! |---|---|---|
//! | `operator` | everything | refused |
//! | `reader` | list, get, watch | refused |
//! | `agent` | refused | everything; later calls of a migration only from the agent that prepared it |
//!
//! The decision ([`decide`]) is a pure function; the interceptors and the QUIC accept
//! path only fetch the certificate and apply it.

use ferry_transport::identity::{normalise_serial, IdentityError, PeerIdentity, Role};
use rustls::pki_types::CertificateDer;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use tonic::{Request, Status};

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Another agent of the mesh (peer API, data plane).
    Agent,
    /// An operator (control API calls that change something).
    Operator,
    /// An operator or a reader (control API calls that only look).
    Read,
}

impl Need {
    fn allows(self, role: Role) -> bool {
        match self {
            Need::Agent => role == Role::Agent,
            Need::Operator => role == Role::Operator,
            Need::Read => matches!(role, Role::Operator | Role::Reader),
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            Need::Agent => "agent",
            Need::Operator => "operator",
            Need::Read => "operator or reader",
        }
    }
}

/// The verified caller of a gRPC request, put in its extensions by the interceptors.
#[derive(Debug, Clone)]
pub struct Caller(pub PeerIdentity);

/// Decides whether the holder of `id` may make a call needing `need` on `host`; `what`
/// names the call for the message. Pure: the deny list is passed in.
pub fn decide(
    id: Result<PeerIdentity, IdentityError>,
    need: Need,
    denied: &HashSet<String>,
    host: &str,
    what: &str,
) -> Result<PeerIdentity, Status> {
    let id =
        id.map_err(|e| Status::permission_denied(format!("host {host} refuses {what}: {e}")))?;
    if denied.contains(&id.serial) {
        return Err(Status::permission_denied(format!(
            "host {host} refuses {what}: the certificate of {id} is on its deny list"
        )));
    }
    if !need.allows(id.role) {
        return Err(Status::permission_denied(format!(
            "host {host} refuses {what}: it needs role {} and the caller is {} {}",
            need.wanted(),
            id.role,
            id.name
        )));
    }
    Ok(id)
}

/// The access policy of one agent: its name and the deny list in force.
#[derive(Debug)]
pub struct Access {
    host: String,
    denied: RwLock<HashSet<String>>,
}

impl Access {
    /// A policy for `host` denying `serials` (written as an operator may write them).
    pub fn new<I, S>(host: &str, serials: I) -> Arc<Access>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let a = Arc::new(Access {
            host: host.to_string(),
            denied: RwLock::new(HashSet::new()),
        });
        a.set_denied(serials);
        a
    }

    /// Replaces the deny list (configuration reload); returns how many serials it holds.
    pub fn set_denied<I, S>(&self, serials: I) -> usize
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set: HashSet<String> = serials
            .into_iter()
            .map(|s| normalise_serial(s.as_ref()))
            .collect();
        let n = set.len();
        if let Ok(mut d) = self.denied.write() {
            *d = set;
        }
        n
    }

    /// Checks the certificate chain a TLS layer verified (leaf first).
    pub fn check_certs(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
        need: Need,
        what: &str,
    ) -> Result<PeerIdentity, Status> {
        let id = match certs.and_then(|c| c.first()) {
            Some(leaf) => PeerIdentity::from_der(leaf.as_ref()),
            None => Err(IdentityError::Parse("no client certificate".into())),
        };
        match self.denied.read() {
            Ok(denied) => decide(id, need, &denied, &self.host, what),
            Err(_) => Err(Status::internal("deny list lock poisoned")),
        }
    }

    /// Checks the caller of a gRPC request.
    pub fn check_request<T>(
        &self,
        req: &Request<T>,
        need: Need,
        what: &str,
    ) -> Result<PeerIdentity, Status> {
        let certs = req.peer_certs();
        self.check_certs(certs.as_ref().map(|c| c.as_slice()), need, what)
    }

    /// Checks the peer of a QUIC connection (data plane: agents only).
    pub fn check_connection(&self, conn: &quinn::Connection) -> Result<PeerIdentity, Status> {
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
        self.check_certs(
            certs.as_deref().map(|c| c.as_slice()),
            Need::Agent,
            "the data plane",
        )
    }
}

/// The interceptor of an API: the caller must have `need`; it is put in the request's
/// extensions as a [`Caller`] for the methods.
pub fn interceptor(
    access: Arc<Access>,
    need: Need,
    api: &'static str,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let id = access.check_request(&req, need, api)?;
        req.extensions_mut().insert(Caller(id));
        Ok(req)
    }
}

/// The caller the interceptor verified.
pub fn caller<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(|| Status::unauthenticated("no verified caller (interceptor missing)"))
}

/// Refuses a control call that changes something unless an operator makes it.
pub fn require_operator<T>(req: &Request<T>, what: &str) -> Result<PeerIdentity, Status> {
    let id = caller(req)?;
    if id.role != Role::Operator {
        return Err(Status::permission_denied(format!(
            "{what} needs role operator and the caller is {} {}",
            id.role, id.name
        )));
    }
    Ok(id)
}

/// Refuses a Prepare (`call`) whose `source_host` claim differs from the caller's
/// certificate (an empty claim is taken as the caller).
pub fn claimed_source(
    claimed: &str,
    caller: &PeerIdentity,
    host: &str,
    call: &str,
) -> Result<(), Status> {
    if !claimed.is_empty() && claimed != caller.name {
        return Err(Status::permission_denied(format!(
            "host {host} refuses {call}: it claims source_host {claimed:?} but the caller's certificate is agent {}",
            caller.name
        )));
    }
    Ok(())
}

/// Refuses a later call of a migration unless the agent that prepared it makes it.
pub fn same_peer(
    prepared_by: &str,
    caller: &PeerIdentity,
    host: &str,
    id: &str,
) -> Result<(), Status> {
    if caller.name != prepared_by {
        return Err(Status::permission_denied(format!(
            "host {host}: migration {id} was prepared by agent {prepared_by}, not by agent {}",
            caller.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role, name: &str, serial: &str) -> Result<PeerIdentity, IdentityError> {
        Ok(PeerIdentity {
            role,
            name: name.into(),
            serial: serial.into(),
            not_after_unix: i64::MAX,
        })
    }

    #[test]
    fn roles_decide_which_api_serves_whom() {
        let none = HashSet::new();
        let ok = |r, need| decide(id(r, "x", "01"), need, &none, "a", "call").is_ok();
        assert!(ok(Role::Agent, Need::Agent));
        assert!(!ok(Role::Operator, Need::Agent));
        assert!(!ok(Role::Reader, Need::Agent));
        assert!(ok(Role::Operator, Need::Operator));
        assert!(!ok(Role::Reader, Need::Operator));
        assert!(!ok(Role::Agent, Need::Operator));
        assert!(ok(Role::Operator, Need::Read));
        assert!(ok(Role::Reader, Need::Read));
        assert!(!ok(Role::Agent, Need::Read));
        let e = decide(
            id(Role::Operator, "alice", "01"),
            Need::Agent,
            &none,
            "a",
            "the peer API",
        )
        .expect_err("operator on the peer API");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("needs role agent") && e.message().contains("operator alice"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn denied_serials_and_roleless_certificates_are_refused() {
        let access = Access::new("a", ["0A:1B"]);
        let denied = access.denied.read().expect("lock").clone();
        let e = decide(
            id(Role::Agent, "b", "0a1b"),
            Need::Agent,
            &denied,
            "a",
            "the peer API",
        )
        .expect_err("denied");
        assert!(e.message().contains("deny list"), "{}", e.message());
        assert_eq!(access.set_denied(Vec::<String>::new()), 0);
        let e = decide(
            Err(IdentityError::NoRole {
                subject: "CN=old".into(),
            }),
            Need::Agent,
            &HashSet::new(),
            "a",
            "the peer API",
        )
        .expect_err("no role");
        assert!(
            e.message().contains("carries no ferry role"),
            "{}",
            e.message()
        );
        let c = access.check_certs(None, Need::Read, "the control API");
        assert_eq!(
            c.expect_err("no cert").code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn later_calls_come_from_the_preparer() {
        let c = id(Role::Agent, "c", "01").expect("id");
        assert!(same_peer("c", &c, "b", "m").is_ok());
        let e = same_peer("a", &c, "b", "m").expect_err("other agent");
        assert!(
            e.message().contains("prepared by agent a, not by agent c"),
            "{}",
            e.message()
        );
    }
}
