//! The query string: percent-decoding (with `+` as a space, as Go's `url.ParseQuery` reads it)
//! and typed access to the parameters list and watch take.

use std::time::Duration;

use crate::status::ApiError;

#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        Query(pairs)
    }

    /// The first value of a parameter; an empty value counts as absent, as in the real server.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    pub(crate) fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false" | "0" | "False" | "FALSE") => Ok(false),
            Some("true" | "1" | "True" | "TRUE") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!("invalid value for {key}: {other:?}"))),
        }
    }

    pub(crate) fn number(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key).map(|v| v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid value for {key}: {v:?}")))).transpose()
    }

    pub(crate) fn timeout(&self) -> Result<Option<Duration>, ApiError> {
        Ok(self.number("timeoutSeconds")?.filter(|s| *s > 0).map(Duration::from_secs))
    }

    /// `dryRun=All`; any other value is refused as the real server does.
    pub(crate) fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!("unsupported dryRun value {other:?}, only \"All\" is supported"))),
        }
    }
}

pub(crate) fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit() => {
                out.push((hex(bytes[i + 1]) << 4) | hex(bytes[i + 2]));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c.to_ascii_lowercase() - b'a' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_go() {
        assert_eq!(decode("app%3Dweb%2Ctier+in+%28a%2Cb%29"), "app=web,tier in (a,b)");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        let q = Query::parse(Some("watch=1&labelSelector=a%3Db&limit=&timeoutSeconds=5"));
        assert!(q.flag("watch").unwrap());
        assert_eq!(q.get("labelSelector"), Some("a=b"));
        assert_eq!(q.get("limit"), None);
        assert_eq!(q.timeout().unwrap(), Some(Duration::from_secs(5)));
        assert!(Query::parse(Some("watch=maybe")).flag("watch").is_err());
    }
}
