//! WireGuard keys as 32 bytes, in the two encodings the ecosystem uses:
//! base64 (the `wg` tool, config files, the cluster view) and lowercase hex (UAPI).
//!
//! Private keys zero their memory on drop and never print themselves.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

pub const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64: {reason}")]
    Base64 { reason: String },
    #[error("key is not valid hex")]
    Hex,
    #[error("key must be {KEY_LEN} bytes, got {len}")]
    Length { len: usize },
}

/// A public key (or any non-secret 32-byte key material such as a peer key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

/// A private key or preshared key: zeroed on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_LEN]);

fn decode_b64(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let mut bytes = B64.decode(s.trim()).map_err(|e| KeyError::Base64 { reason: e.to_string() })?;
    let out = <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length { len: bytes.len() });
    bytes.zeroize();
    out
}

fn decode_hex(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let s = s.as_bytes();
    if s.len() != KEY_LEN * 2 {
        return Err(KeyError::Length { len: s.len() / 2 });
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or(KeyError::Hex)?;
        let lo = hex_val(pair[1]).ok_or(KeyError::Hex)?;
        out[i] = hi << 4 | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn encode_hex(bytes: &[u8; KEY_LEN]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(KEY_LEN * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

// === impl PublicKey ===

impl PublicKey {
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_b64(s).map(Self)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(Self)
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; KEY_LEN]
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

/// Base64 of 32 bytes, exactly: the last character carries 4 bits of key.
impl schemars::JsonSchema for PublicKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PublicKey".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A WireGuard public key, base64.",
            "type": "string",
            "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
        })
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

// === impl SecretKey ===

impl SecretKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random key from the OS generator. For X25519 private keys the
    /// clamping happens inside the curve operations, as in the `wg` tool.
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_b64(s).map(Self)
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex(s).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Base64, for writing the key file. The caller owns the secrecy of the result.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Hex, for UAPI `get` replies. The caller owns the secrecy of the result.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; KEY_LEN]
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_encodings() {
        let k = PublicKey([0xab; KEY_LEN]);
        assert_eq!(PublicKey::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(PublicKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(k.to_hex(), "ab".repeat(32));
        let s = SecretKey::generate();
        assert_eq!(SecretKey::from_hex(&s.to_hex()).unwrap(), s);
        assert_eq!(SecretKey::from_base64(&s.to_base64()).unwrap(), s);
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(PublicKey::from_hex("zz").unwrap_err(), KeyError::Length { len: 1 });
        assert_eq!(PublicKey::from_hex(&"g".repeat(64)).unwrap_err(), KeyError::Hex);
        assert!(matches!(PublicKey::from_base64("!!!").unwrap_err(), KeyError::Base64 { .. }));
        assert_eq!(PublicKey::from_base64("AAAA").unwrap_err(), KeyError::Length { len: 3 });
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = SecretKey::from_bytes([7; KEY_LEN]);
        assert!(!format!("{s:?}").contains('7'));
    }
}
