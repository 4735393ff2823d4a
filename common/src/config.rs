//! What every binary's configuration file shares: where it lives by
//! default, how durations are written, and how renamed keys keep working
//! for a release.

use std::path::PathBuf;
use std::time::Duration;

/// Each binary reads `/etc/meshguard/<binary>.yaml` unless told otherwise.
pub const CONFIG_DIR: &str = "/etc/meshguard";

/// The default config file of `binary` (`wg-agent`, `auth-handshake`, `identity-ca`).
pub fn default_path(binary: &str) -> PathBuf {
    PathBuf::from(CONFIG_DIR).join(format!("{binary}.yaml"))
}

/// Where a node's name comes from when its configuration file leaves it
/// out: on Kubernetes the downward API sets it (`fieldRef: spec.nodeName`),
/// so one ConfigMap serves every node of a DaemonSet.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// `nodeName` as written, else `$NODE_NAME`; `None` when neither is set.
pub fn node_name_or_env(written: Option<String>) -> Option<String> {
    written.or_else(|| std::env::var(NODE_NAME_ENV).ok().filter(|n| !n.is_empty()))
}

/// A duration as people write them: `500ms`, `10s`, `1h30m`, `2h 5m`.
/// A bare number is refused (its unit would be a guess), and so is zero:
/// no interval, refresh or lifetime of ours means anything at zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err("must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e}; write a duration such as 500ms, 10s or 1h30m")),
    }
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Renamed keys read while a file is constructed; each use is reported once
/// the binary logs, and giving both names is an error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deprecations(Vec<String>);

impl Deprecations {
    /// The value under `key`, or under its deprecated name `old_key`.
    pub fn pick<T>(&mut self, key: &str, value: Option<T>, old_key: &str, old: Option<T>) -> Result<Option<T>, String> {
        match (value, old) {
            (Some(_), Some(_)) => Err(format!("give {key} only: {old_key} is its deprecated name")),
            (None, Some(v)) => {
                self.0.push(format!("config key {old_key} is deprecated and will be removed in the next release: write {key}"));
                Ok(Some(v))
            }
            (v, None) => Ok(v),
        }
    }

    pub fn messages(&self) -> &[String] {
        &self.0
    }

    /// Logs each deprecation as a warning.
    pub fn warn(&self) {
        for m in &self.0 {
            tracing::warn!("{m}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_parse_and_bare_numbers_do_not() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration(" 2h 5m ").unwrap(), Duration::from_secs(7500));
        for bad in ["10", "", "ten seconds", "-1s", "1x", "0s", "0ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_duration(&format_duration(Duration::from_millis(90_500))).unwrap(), Duration::from_millis(90_500));
    }

    #[test]
    fn an_old_key_works_with_a_warning_and_both_keys_is_an_error() {
        let mut d = Deprecations::default();
        assert_eq!(d.pick("metricsAddress", None, "metricsAddr", Some(1)).unwrap(), Some(1));
        assert_eq!(d.pick("caAddress", Some(2), "address", None).unwrap(), Some(2));
        assert_eq!(d.pick::<u8>("x", None, "y", None).unwrap(), None);
        assert_eq!(d.messages().len(), 1);
        assert!(d.messages()[0].contains("metricsAddr") && d.messages()[0].contains("metricsAddress"));
        assert!(d.pick("metricsAddress", Some(1), "metricsAddr", Some(2)).is_err());
    }
}
