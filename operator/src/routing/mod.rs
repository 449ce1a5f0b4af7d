//! The routing service: `ferry.v1.Routing/Watch`, each sidecar's scoped view of the routing
//! table (`ferry_api::routing::scope`), so that no sidecar needs etcd and none reads
//! another tenant's entries; only the operator reaches etcd.
//!
//! It is served on the identity service's port and listener (8444): the TLS server there
//! requests a client certificate of the mesh's CA but does not require one (a sidecar that
//! comes for its first certificate has none), and the Watch call refuses a caller that
//! presented none with `UNAUTHENTICATED`. One port means one Service, one NetworkPolicy
//! rule and one URL for the webhook to inject.
//!
//! Layout: [`follow`] (every replica lists and watches etcd), [`service`] (the gRPC
//! service: who the caller is, its pod, the stream of snapshots and diffs).

pub mod follow;
pub mod service;

/// The identity a connection's client certificate proved, if it presented one: what the
/// routing service authorizes, read from the TLS session, never from the request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: Option<ferry_api::identity::SpiffeId>,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::webhook::tls::TlsListener>,
    > for Peer
{
    fn connect_info(
        stream: axum::serve::IncomingStream<'_, crate::webhook::tls::TlsListener>,
    ) -> Self {
        let (_, session) = stream.io().get_ref();
        Self {
            identity: ferry_api::identity::tls::peer_identity(session.peer_certificates()).ok(),
        }
    }
}
