//! The mutual-authentication protocol, without I/O.
//!
//! Two nodes' auth-handshake agents speak TLS 1.3 (rustls, ring) to each
//! other on their **node** SVIDs; each side checks the other's chain against
//! the trust bundle and the exact node SPIFFE ID it expects, and the
//! accepting side checks that the connecting address is that node's. Over
//! that one session, any number of identity pairs are proved, pipelined:
//!
//! ```text
//!  client node C (initiator)                         server node S (responder)
//!  Prove{req, X, Y, chain(X), sig_X(ctx|1|exp|X|Y|C|S)} ──►  X placed on C? Y placed here and held?
//!                                                          chain(X) ok for exactly X? sig ok?
//!           ◄── Proof{req, chain(Y), sig_Y(ctx|2|exp|X|Y|C|S)}   (or Refuse{req, reason})
//!  Y placed on S? chain(Y) ok for exactly Y? sig ok?
//!  write (X, Y, S)       Confirm{req} ──►                  write (Y, X, C)
//! ```
//!
//! `exp` is the TLS exporter of this session ([`proof::EXPORTER_LABEL`]), so
//! a signature is good for this session between these two nodes only: a node
//! that legitimately holds X's key can sign "X on C" only inside a session
//! authenticated as C. The Confirm step means the responder writes only after
//! the initiator accepted its proof, so a refused pair leaves nothing on
//! either side. Both entries expire at the earliest `notAfter` of every
//! certificate involved (both workload chains, both node chains).
//!
//! The state machine ([`session::Session`]) takes received TLS bytes and
//! returns [`session::Event`]s; the caller moves bytes. See
//! docs/security-model.md for the argument.

pub mod frame;
pub mod proof;
pub mod session;
pub mod tls;

pub use proof::{Directory, WorkloadKey};
pub use session::{Authenticated, Event, Session, SessionError};

/// Which end of a pair's proof a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Asked for the proof (the TLS client).
    Initiator,
    /// Answered (the TLS server).
    Responder,
}

/// Why a pair, a frame or a connection was refused. The codes travel in
/// Refuse frames: never reuse a retired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Refusal {
    #[error("a frame broke the protocol")]
    Malformed,
    #[error("the certificate chain does not lead to the trust bundle")]
    UntrustedChain,
    #[error("a certificate in the chain has expired or is not yet valid")]
    Expired,
    #[error("the SVID belongs to another trust domain")]
    WrongTrustDomain,
    #[error("the SVID names another SPIFFE ID than the one claimed")]
    WrongSpiffeId,
    #[error("the cluster view does not place the identity on the peer's node")]
    NotPlacedOnPeer,
    #[error("the requested identity is not hosted on this node")]
    NotHostedHere,
    #[error("this node holds no SVID for the identity (yet)")]
    NoSvid,
    #[error("the proof's signature does not verify")]
    BadSignature,
    #[error("too many proofs in flight on this session")]
    Busy,
    #[error("the connecting address is no known node's")]
    UnknownAddress,
    #[error("the node SVID names another node than the connecting address's")]
    NodeMismatch,
    #[error("the peer is over its rate limit")]
    RateLimited,
    #[error("the leaf is not a valid X.509-SVID")]
    InvalidSvid,
    #[error("the peer was too slow")]
    Timeout,
    #[error("the TLS handshake failed")]
    Tls,
    #[error("too many connections from the peer")]
    TooManyConnections,
}

impl Refusal {
    pub const ALL: [Self; 17] = [
        Self::Malformed,
        Self::UntrustedChain,
        Self::Expired,
        Self::WrongTrustDomain,
        Self::WrongSpiffeId,
        Self::NotPlacedOnPeer,
        Self::NotHostedHere,
        Self::NoSvid,
        Self::BadSignature,
        Self::Busy,
        Self::UnknownAddress,
        Self::NodeMismatch,
        Self::RateLimited,
        Self::InvalidSvid,
        Self::Timeout,
        Self::Tls,
        Self::TooManyConnections,
    ];

    /// The wire code (1-based position in [`Refusal::ALL`]; append only).
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|r| *r == self).map_or(0, |i| i as u8 + 1)
    }

    pub fn from_code(code: u8) -> Option<Self> {
        (code as usize).checked_sub(1).and_then(|i| Self::ALL.get(i)).copied()
    }

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UntrustedChain => "untrusted_chain",
            Self::Expired => "expired",
            Self::WrongTrustDomain => "wrong_trust_domain",
            Self::WrongSpiffeId => "wrong_spiffe_id",
            Self::NotPlacedOnPeer => "not_placed_on_peer",
            Self::NotHostedHere => "not_hosted_here",
            Self::NoSvid => "no_svid",
            Self::BadSignature => "bad_signature",
            Self::Busy => "busy",
            Self::UnknownAddress => "unknown_address",
            Self::NodeMismatch => "node_mismatch",
            Self::RateLimited => "rate_limited",
            Self::InvalidSvid => "invalid_svid",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::TooManyConnections => "too_many_connections",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            assert!(seen.insert(r.as_str()));
        }
        assert_eq!(Refusal::from_code(0), None);
        assert_eq!(Refusal::Malformed.code(), 1, "codes are on the wire: append only");
    }
}
