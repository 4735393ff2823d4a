//! The node-to-node TLS configurations: TLS 1.3 only, rustls with ring,
//! both sides presenting node SVIDs, no resumption (every session verifies
//! both certificates afresh), ALPN `meshguard-auth/1`.

use std::sync::Arc;

use meshguard_ca_client::svid::{self, BundleCell, CredentialCell, SpiffeVerifier};
use meshguard_common::spiffe::SpiffeId;

/// The protocol name negotiated by ALPN; a peer that does not offer it is refused.
pub const ALPN: &[u8] = b"meshguard-auth/1";

/// The client side towards `peer_node_id`, exactly.
pub fn client_config(
    node_creds: CredentialCell,
    bundle: BundleCell,
    peer_node_id: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut cfg = svid::client_config(node_creds, Arc::new(SpiffeVerifier::exactly(bundle, peer_node_id)))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The server side: any node SVID of the trust domain completes the TLS
/// handshake; the session then checks that it is the node at the connecting
/// address.
pub fn server_config(node_creds: CredentialCell, bundle: BundleCell) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = SpiffeVerifier::new(bundle, Arc::new(|id: &SpiffeId| id.node_name().is_some()));
    let mut cfg = svid::server_config(node_creds, Arc::new(verifier))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}
