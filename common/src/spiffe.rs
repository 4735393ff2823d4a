//! SPIFFE IDs and trust domains, validated as the SPIFFE-ID standard says.
//!
//! `spiffe://<trust-domain>/<path>`: the scheme is lowercase `spiffe`; the trust
//! domain is 1–255 characters of `[a-z0-9.-_]` (no port, no userinfo); the path is
//! empty or `/`-separated segments of `[a-zA-Z0-9.-_]`, none empty, `.` or `..`;
//! no query or fragment; the whole URI at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest SPIFFE ID the standard allows (it must fit an X.509 URI SAN).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name the standard allows.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("spiffe id is empty")]
    Empty,
    #[error("spiffe id is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("spiffe id must start with \"spiffe://\" (lowercase scheme)")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters")]
    TrustDomainTooLong,
    #[error(
        "trust domain has invalid character {ch:?}: only lowercase letters, digits, '.', '-' and '_' are allowed (no port or userinfo)"
    )]
    BadTrustDomainChar { ch: char },
    #[error("path has an empty segment (a double or trailing '/')")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has invalid character {ch:?}: only letters, digits, '.', '-' and '_' are allowed (no query or fragment)")]
    BadPathChar { ch: char },
}

/// A trust domain name such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (== uri.len() when the path is empty).
    path_start: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        // Accept "spiffe://td" as well, as the SPIFFE libraries do.
        let name = name.strip_prefix(SCHEME_PREFIX).unwrap_or(name);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`, the form used in trust bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// The SPIFFE ID of a workload: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload_id(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, SpiffeIdError> {
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        SpiffeId::new(self, &format!("/ns/{namespace}/sa/{service_account}"))
    }

    /// The SPIFFE ID of a node: `spiffe://<td>/meshguard/node/<name>`.
    pub fn node_id(&self, node: &str) -> Result<SpiffeId, SpiffeIdError> {
        validate_segment(node)?;
        SpiffeId::new(self, &format!("/meshguard/node/{node}"))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        Some(ch) => Err(SpiffeIdError::BadTrustDomainChar { ch }),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller guarantees a leading '/'; every segment after it is checked.
    path[1..].split('/').try_for_each(validate_segment)
}

/// One path segment: what a namespace, service account or node name must be.
pub fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    match segment.chars().find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')) {
        Some(ch) => Err(SpiffeIdError::BadPathChar { ch }),
        None => Ok(()),
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Builds an ID from a trust domain and a path that starts with `/` (or is empty).
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(SpiffeIdError::BadPathChar { ch: path.chars().next().unwrap_or('/') });
        }
        Self::parse(&format!("{SCHEME_PREFIX}{}{path}", td.as_str()))
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self { uri: s.to_owned(), path_start: SCHEME_PREFIX.len() + td.len() })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, including its leading `/`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// `(namespace, service account)` when the path is `/ns/<ns>/sa/<sa>`.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The node name when the path is `/meshguard/node/<name>`.
    pub fn node_name(&self) -> Option<&str> {
        let name = self.path().strip_prefix("/meshguard/node/")?;
        (!name.contains('/')).then_some(name)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

/// A string the CRD's schema checks as [`SpiffeId::parse`] does: a
/// lowercase trust domain, then path segments that are not `.` or `..`.
impl schemars::JsonSchema for SpiffeId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SpiffeId".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A SPIFFE ID: spiffe://<trust domain>/<path>.",
            "type": "string",
            "maxLength": 2048,
            "pattern": r"^spiffe://[a-z0-9._-]+(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))*$"
        })
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        assert_eq!(id.workload_parts(), Some(("shop", "web")));
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(td.path(), "");
        let node = TrustDomain::new("cluster.local").unwrap().node_id("node-1").unwrap();
        assert_eq!(node.as_str(), "spiffe://cluster.local/meshguard/node/node-1");
        assert_eq!(node.node_name(), Some("node-1"));
        assert_eq!(node.workload_parts(), None);
    }

    #[test]
    fn rejects_invalid_ids() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://cluster.local/x", WrongScheme),
            ("SPIFFE://cluster.local/x", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Cluster.local/x", BadTrustDomainChar { ch: 'C' }),
            ("spiffe://cluster.local:8080/x", BadTrustDomainChar { ch: ':' }),
            ("spiffe://user@cluster.local/x", BadTrustDomainChar { ch: '@' }),
            ("spiffe://cluster.local/", EmptySegment),
            ("spiffe://cluster.local//x", EmptySegment),
            ("spiffe://cluster.local/x/", EmptySegment),
            ("spiffe://cluster.local/./x", DotSegment),
            ("spiffe://cluster.local/x/..", DotSegment),
            ("spiffe://cluster.local/x?y=1", BadPathChar { ch: '?' }),
            ("spiffe://cluster.local/x#frag", BadPathChar { ch: '#' }),
            ("spiffe://cluster.local/x%20y", BadPathChar { ch: '%' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).unwrap_err(), *want, "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&long).unwrap_err(), TooLong);
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        assert_eq!(SpiffeId::parse(&long_td).unwrap_err(), TrustDomainTooLong);
        // A namespace must be one segment, or "/ns/a/b/sa/c" would smuggle a path in.
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(td.workload_id("a/b", "c").unwrap_err(), BadPathChar { ch: '/' });
        assert_eq!(td.workload_id("..", "c").unwrap_err(), DotSegment);
        assert_eq!(td.node_id("").unwrap_err(), EmptySegment);
    }
}
