//! Every YAML file meshguard reads or writes goes through here: one parser
//! (serde-saphyr, pure Rust, panic-free) with limits on hostile input, so a
//! config, policy, endpoint or node record cannot make a binary allocate or
//! recurse without bound.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Larger than any config, policy set or cluster file we write, small
/// enough that a hostile file cannot exhaust memory before parsing starts.
pub const MAX_YAML_BYTES: usize = 16 << 20;
/// Nesting deeper than any of our shapes needs (policies nest about 8 deep).
const MAX_DEPTH: usize = 64;
/// Our files use no anchors; a few are allowed for hand-written ones, and
/// the alias budget stops "billion laughs" expansion.
const MAX_ANCHORS: usize = 256;
const MAX_ALIASES: usize = 1024;
/// `meshctl policy apply` may take many policies in one stream.
const MAX_DOCUMENTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{len} bytes of YAML is over the {MAX_YAML_BYTES}-byte limit")]
    TooLarge { len: usize },
    /// The parser's message, with line and column; no snippet of the input,
    /// which may hold a secret (a join token).
    #[error("{0}")]
    Parse(String),
    #[error("cannot write YAML: {0}")]
    Write(String),
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_anchors = MAX_ANCHORS;
    budget.max_aliases = MAX_ALIASES;
    budget.max_documents = MAX_DOCUMENTS;
    // Room for MAX_DOCUMENTS policies; the byte limit is check_len's (the
    // crate's reader limit does not apply to in-memory input).
    budget.max_nodes = 2_000_000;
    budget.max_events = 8_000_000;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o.with_snippet = false;
    // YAML 1.2 core schema, as the files were written: only true/false are
    // booleans, so `country: no` stays a string.
    o.strict_booleans = true;
    o
}

fn check_len(len: usize) -> Result<(), YamlError> {
    if len > MAX_YAML_BYTES { Err(YamlError::TooLarge { len }) } else { Ok(()) }
}

fn parse_error(e: serde_saphyr::Error) -> YamlError {
    YamlError::Parse(e.to_string())
}

/// One document. A shape error names the field's path before the parser's
/// line and column (`spec.ingress[0].ports: ... at line 11, column 11`).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    check_len(text.len())?;
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| match path.as_str() {
        "" | "." => parse_error(e),
        p => YamlError::Parse(format!("{p}: {e}")),
    })
}

/// One document from bytes (UTF-8).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, YamlError> {
    check_len(bytes.len())?;
    let text = std::str::from_utf8(bytes).map_err(|e| YamlError::Parse(format!("not UTF-8: {e}")))?;
    from_str(text)
}

/// A `---` separated stream, one entry per document that is not empty.
/// On a shape error the document holding the error's line is parsed again
/// alone, padded to its place in the stream, for an error that names the
/// field as well as the line (one extra parse at most).
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    check_len(text.len())?;
    let docs: Vec<Option<T>> = match serde_saphyr::from_multiple_with_options(text, options()) {
        Ok(docs) => docs,
        Err(e) => {
            let line = e.location().map(|l| l.line() as usize);
            return Err(line.and_then(|l| pinpoint::<T>(text, l)).unwrap_or_else(|| parse_error(e)));
        }
    };
    Ok(docs.into_iter().flatten().collect())
}

/// The error of the document around `line` (1-based) parsed alone, with
/// stream line numbers; `None` when it parses alone (the stream's own
/// error then stands).
fn pinpoint<T: DeserializeOwned>(text: &str, line: usize) -> Option<YamlError> {
    let lines: Vec<&str> = text.lines().collect();
    let at = line.checked_sub(1)?.min(lines.len());
    let start = lines[..at].iter().rposition(|l| is_document_marker(l)).map_or(0, |i| i + 1);
    let end = lines[at..].iter().position(|l| is_document_marker(l)).map_or(lines.len(), |i| at + i);
    if start > end {
        return None;
    }
    let doc = format!("{}{}\n", "\n".repeat(start), lines[start..end].join("\n"));
    from_str::<Option<T>>(&doc).err()
}

fn is_document_marker(line: &str) -> bool {
    line == "---" || line.starts_with("--- ") || line == "..."
}

pub fn to_string<T: Serialize>(value: &T) -> Result<String, YamlError> {
    serde_saphyr::to_string(value).map_err(|e| YamlError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Shape {
        name: String,
        labels: BTreeMap<String, String>,
        ports: Vec<u16>,
        strict: Option<bool>,
    }

    fn shape() -> Shape {
        Shape {
            name: "node-1".into(),
            // Strings that look like other types must come back as strings.
            labels: [("country", "no"), ("version", "1.10"), ("empty", ""), ("colon", "a: b"), ("octal", "0755")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            ports: vec![80, 443],
            strict: Some(false),
        }
    }

    #[test]
    fn what_we_write_reads_back_the_same() {
        let s = shape();
        let text = to_string(&s).unwrap();
        assert_eq!(from_str::<Shape>(&text).unwrap(), s, "{text}");
        assert_eq!(from_slice::<Shape>(text.as_bytes()).unwrap(), s);
    }

    #[test]
    fn documents_skip_empty_ones_and_keep_order() {
        let a = to_string(&shape()).unwrap();
        let text = format!("---\n{a}---\n---\n{}", a.replace("node-1", "node-2"));
        let docs: Vec<Shape> = documents(&text).unwrap();
        assert_eq!(docs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["node-1", "node-2"]);
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings_and_bad_shapes_are_refused() {
        assert!(from_str::<Shape>("name: x\nlabels: {}\nports: []\nstrict: yes\n").is_err());
        assert!(from_str::<Shape>("name: x\nlabels: {}\nports: []\nbogus: 1\n").is_err(), "unknown keys are refused");
        assert!(from_str::<Shape>("name: x\nlabels: {}\nports: [70000]\n").is_err(), "out-of-range port");
        assert!(from_str::<Shape>("name: [\n").is_err(), "truncated input");
        assert!(from_str::<Shape>("name: x\nname: y\nlabels: {}\nports: []\n").is_err(), "duplicate keys");
    }

    #[test]
    fn hostile_input_is_refused_within_bounds() {
        // "Billion laughs": each level doubles the expansion.
        let mut text = String::from("a0: &a0 [x, x]\n");
        for i in 1..40 {
            text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1));
        }
        let t = std::time::Instant::now();
        assert!(from_str::<serde_json::Value>(&text).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "expansion was not bounded: {:?}", t.elapsed());
        // A stream that fails as a whole re-parses one document at most,
        // not each of its many (which would be quadratic).
        let storm = "#\n---\n".repeat(700_000);
        let t = std::time::Instant::now();
        assert!(documents::<Shape>(&storm).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "document storm took {:?}", t.elapsed());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(from_str::<serde_json::Value>(&deep).is_err(), "unbounded nesting");
        let big = "x".repeat(MAX_YAML_BYTES + 1);
        assert!(matches!(from_str::<String>(&big), Err(YamlError::TooLarge { .. })));
    }

    #[test]
    fn errors_name_the_field_and_line_but_never_echo_the_input() {
        let e = from_str::<Shape>("name: x\nlabels: {}\nports: [80, secret-token-123]\n").unwrap_err().to_string();
        assert!(e.starts_with("ports[1]: ") && e.contains("line 3"), "{e:?}");
        assert!(!e.contains("secret-token-123"), "the input leaked into the error: {e:?}");
        // In a stream: the second document's line, counted from the top.
        let ok = to_string(&shape()).unwrap();
        let text = format!("{ok}---\n{}", ok.replace("- 443", "- 99999"));
        let e = documents::<Shape>(&text).unwrap_err().to_string();
        let line = ok.lines().count() + 1 + ok.lines().position(|l| l.contains("443")).unwrap() + 1;
        assert!(e.starts_with("ports[1]: ") && e.contains(&format!("line {line}")), "{e:?} (want line {line})");
    }
}
