//! Label and field selectors in the real server's query syntax, and the filter a list or watch
//! applies to objects.

use serde_json::Value;

use crate::meta;
use crate::resource::Resource;
use crate::status::ApiError;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`; all requirements must hold (an empty selector matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(bad_label(s, "empty requirement"));
            }
            reqs.push(parse_requirement(part).map_err(|why| bad_label(part, why))?);
        }
        Ok(LabelSelector(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = meta::labels(obj);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k.as_str()) == Some(&v.as_str()),
            // As in Kubernetes, `!=` and `notin` also match objects without the label.
            Requirement::NotEquals(k, v) => labels.get(k.as_str()) != Some(&v.as_str()),
            Requirement::In(k, vs) => labels.get(k.as_str()).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => labels.get(k.as_str()).is_none_or(|l| !vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => labels.contains_key(k.as_str()),
            Requirement::DoesNotExist(k) => !labels.contains_key(k.as_str()),
            Requirement::GreaterThan(k, n) => labels.get(k.as_str()).and_then(|l| l.parse::<i64>().ok()).is_some_and(|l| l > *n),
            Requirement::LessThan(k, n) => labels.get(k.as_str()).and_then(|l| l.parse::<i64>().ok()).is_some_and(|l| l < *n),
        })
    }
}

fn bad_label(what: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {what}: {why}"))
}

/// Splits on commas outside parentheses, so `a in (x,y),b` is two requirements.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<Requirement, &'static str> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key)?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(key_of(k)?, value_of(v)?));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(key_of(k)?, value_of(v)?));
    }
    if let Some(open) = part.find('(') {
        let mut words = part[..open].split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err("expected `key in (values)` or `key notin (values)`");
        };
        let inner = part[open + 1..].strip_suffix(')').ok_or("missing closing parenthesis")?;
        let values = inner.split(',').map(value_of).collect::<Result<Vec<_>, _>>()?;
        return match op {
            "in" => Ok(Requirement::In(key_of(key)?, values)),
            "notin" => Ok(Requirement::NotIn(key_of(key)?, values)),
            _ => Err("unknown set operator, expected `in` or `notin`"),
        };
    }
    for (sep, gt) in [('>', true), ('<', false)] {
        if let Some((k, v)) = part.split_once(sep) {
            let n = v.trim().parse::<i64>().map_err(|_| "`>` and `<` need an integer")?;
            let key = key_of(k)?;
            return Ok(if gt { Requirement::GreaterThan(key, n) } else { Requirement::LessThan(key, n) });
        }
    }
    Ok(Requirement::Exists(key_of(part)?))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
fn key_of(k: &str) -> Result<String, &'static str> {
    let k = k.trim();
    let name = k.rsplit_once('/').map_or(k, |(_, n)| n);
    let ok = !name.is_empty()
        && name.len() <= 63
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok { Ok(k.to_owned()) } else { Err("invalid label key") }
}

/// A label value: empty, or at most 63 alphanumerics with `-_.` inside.
fn value_of(v: &str) -> Result<String, &'static str> {
    let v = v.trim();
    let ok = v.is_empty()
        || (v.len() <= 63
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok { Ok(v.to_owned()) } else { Err("invalid label value") }
}

/// A parsed `fieldSelector`: `path=value`, `path==value`, `path!=value`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Only fields the resource supports are accepted; others get 400 like the real server.
    pub(crate) fn parse(s: &str, res: &Resource) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{s}'; can't understand '{part}'")));
            };
            let field = field.trim();
            let known = field == "metadata.name" || field == "metadata.namespace" || res.selectable_fields.iter().any(|f| f == field);
            if !known {
                return Err(ApiError::bad_request(format!("field label not supported: {field}")));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, want)| (field_value(obj, field) == *want) == *equal)
    }
}

/// A field's value as the real field-set sees it: strings as they are, other scalars printed, a
/// missing field as `""` (so `spec.nodeName=` selects unscheduled pods).
fn field_value(obj: &Value, field: &str) -> String {
    let pointer: String = field.split('.').map(|seg| format!("/{seg}")).collect();
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// What a list or watch serves: scope, an optional single name, and the two selectors.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| meta::namespace(obj) == Some(ns))
            && self.name.as_deref().is_none_or(|n| meta::name(obj) == n)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap()
    }

    #[test]
    fn label_selector_operators() {
        let p = pod(json!({"app": "web", "tier": "front", "n": "5"}));
        assert!(sel("").matches(&p));
        assert!(sel("app=web").matches(&p));
        assert!(sel("app==web,tier=front").matches(&p));
        assert!(!sel("app=db").matches(&p));
        assert!(sel("app!=db").matches(&p));
        assert!(sel("missing!=x").matches(&p), "!= matches a missing label");
        assert!(sel("app in (db, web)").matches(&p));
        assert!(!sel("app notin (web)").matches(&p));
        assert!(sel("missing notin (web)").matches(&p));
        assert!(sel("app").matches(&p));
        assert!(sel("!missing").matches(&p));
        assert!(!sel("!app").matches(&p));
        assert!(sel("n>4,n<6").matches(&p));
        assert!(sel("app in (web),tier notin (back,db)").matches(&p));
    }

    #[test]
    fn label_selector_errors() {
        for bad in ["app in web", "app in (web", "=web", "app=we b", "a,,b", "n>x", "app is (x)"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn field_selectors() {
        let res = Resource::builtins().remove(0);
        let p = pod(json!({}));
        let f = |s: &str| FieldSelector::parse(s, &res).unwrap();
        assert!(f("metadata.name=p,metadata.namespace=ns").matches(&p));
        assert!(f("spec.nodeName=n1").matches(&p));
        assert!(f("spec.nodeName!=n2").matches(&p));
        assert!(f("status.phase=").matches(&p), "a missing field is the empty string");
        assert!(!f("spec.nodeName==n2").matches(&p));
        let e = FieldSelector::parse("spec.foo=x", &res).unwrap_err();
        assert_eq!(e.code(), 400);
        assert_eq!(e.message, "field label not supported: spec.foo");
    }
}
