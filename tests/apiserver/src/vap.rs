//! ValidatingAdmissionPolicy evaluation: the policies and bindings of a YAML file, judged for
//! each write the way kube-apiserver judges them, as an [`AdmissionHook`].
//!
//! For a request that a policy's `matchConstraints` match, its `variables` are evaluated in
//! order, then its `matchConditions` (any `false`: the policy does not apply), then each
//! `validations[].expression`; the first that is `false` denies with its `messageExpression`,
//! its `message`, or `failed expression: <expression>`. The variables are kube-apiserver's:
//! `request` (the `admission.k8s.io/v1` AdmissionRequest), `object`, `oldObject`, `params`
//! (null), `namespaceObject` and `variables.<name>`. CEL is the `cel` crate with kube-cel's
//! Kubernetes extension functions.
//!
//! Fail closed: an expression that errors or is not a boolean denies under
//! `failurePolicy: Fail` (the default), and a file the evaluator cannot fully honour (bad CEL, an
//! undefined name, a field it does not implement, a policy without a binding) is an error at load
//! rather than a policy that silently allows.
//!
//! Where it differs from kube-apiserver: a denial is 422 `Invalid` (the hook's only answer)
//! whatever the validation's `reason`; expressions are parsed, not type-checked (a misspelt field
//! is found when evaluated, as an error, not when loaded); variables are evaluated eagerly and one
//! that fails is left out of `variables` (so `has(variables.x)` is false where the real server
//! reports the error); no cost limits; in the `cel` crate a field of a value that is not a map
//! (`oldObject.metadata` on CREATE) is `false` where cel-go reports an error; `paramKind`,
//! `auditAnnotations`, `authorizer`, selectors and a binding's `matchResources`/`paramRef` are
//! refused at load.

mod expression;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kube_cel::KubeCelExt as _;
use kube_cel::cel::objects::{Key, Map};
use kube_cel::cel::{self, Context};
use serde::Deserialize;
use serde_json::Value;

use self::expression::{Compiled, is_identifier, to_cel};
use crate::admission::{AdmissionHook, AdmissionRequest, Operation};

const API_VERSION: &str = "admissionregistration.k8s.io/v1";
const POLICY: &str = "ValidatingAdmissionPolicy";
const BINDING: &str = "ValidatingAdmissionPolicyBinding";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not valid YAML: {0}")]
    Yaml(#[source] meshguard_common::yaml::YamlError),
    #[error("{what}: {source}")]
    Shape {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
    #[error("{what}: the CEL does not compile: {message}")]
    Compile { what: String, message: String },
    #[error("{what}: `{name}` is not defined here; fix the name or define it")]
    Undefined { what: String, name: String },
    #[error("{what}: not supported by this evaluator, so it cannot be honoured; remove it or extend tests/apiserver/src/vap.rs")]
    Unsupported { what: String },
    #[error("policy {policy} has no ValidatingAdmissionPolicyBinding in the file, so it would never be enforced; add one")]
    Unbound { policy: String },
    #[error("binding {binding} names policy {policy}, which is not in the file")]
    UnknownPolicy { binding: String, policy: String },
    #[error("the file has no ValidatingAdmissionPolicy")]
    Empty,
}

/// The policies of one file with their bindings, ready to judge requests.
#[derive(Debug)]
pub struct ValidatingAdmissionPolicies {
    policies: Vec<Policy>,
}

#[derive(Debug)]
struct Policy {
    name: String,
    /// `failurePolicy: Fail`: an evaluation error denies.
    fail_closed: bool,
    rules: Vec<RuleSpec>,
    excluded: Vec<RuleSpec>,
    variables: Vec<(String, Compiled)>,
    match_conditions: Vec<(String, Compiled)>,
    validations: Vec<Validation>,
    /// Names of the bindings, and whether each denies (`validationActions` holds `Deny`).
    bindings: Vec<(String, bool)>,
}

#[derive(Debug)]
struct Validation {
    expression: Compiled,
    message: Option<String>,
    message_expression: Option<Compiled>,
}

/// What a policy says about one request.
enum Verdict {
    Allow,
    Deny(String),
}

// --- the YAML shapes; unknown fields are refused, so nothing is silently ignored ---

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Value,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    failure_policy: Option<FailurePolicy>,
    match_constraints: MatchResources,
    #[serde(default)]
    match_conditions: Vec<NamedExpression>,
    #[serde(default)]
    variables: Vec<NamedExpression>,
    #[serde(default)]
    validations: Vec<ValidationSpec>,
}

#[derive(Clone, Copy, Deserialize, PartialEq, Eq)]
enum FailurePolicy {
    Fail,
    Ignore,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchResources {
    #[serde(default)]
    resource_rules: Vec<RuleSpec>,
    #[serde(default)]
    exclude_resource_rules: Vec<RuleSpec>,
    /// Exact or Equivalent: the same here, where each resource has one version.
    #[serde(default)]
    match_policy: Option<String>,
    #[serde(default)]
    namespace_selector: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    object_selector: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    api_groups: Vec<String>,
    api_versions: Vec<String>,
    operations: Vec<String>,
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedExpression {
    name: String,
    expression: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ValidationSpec {
    expression: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    message_expression: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BindingSpec {
    policy_name: String,
    validation_actions: Vec<String>,
}

// === impl ValidatingAdmissionPolicies ===

impl ValidatingAdmissionPolicies {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.display().to_string(), source })?;
        Self::from_yaml(&text)
    }

    /// Every ValidatingAdmissionPolicy and ValidatingAdmissionPolicyBinding of a `---` stream;
    /// other kinds are refused.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        let docs: Vec<Document> = meshguard_common::yaml::documents(text).map_err(PolicyError::Yaml)?;
        let mut policies: Vec<Policy> = Vec::new();
        let mut bindings = Vec::new();
        for doc in docs {
            let what = format!("{} {}", doc.kind, doc.metadata.name);
            if doc.api_version != API_VERSION {
                return Err(PolicyError::Invalid { what, why: format!("apiVersion must be {API_VERSION}") });
            }
            let shape = |source| PolicyError::Shape { what: what.clone(), source };
            match doc.kind.as_str() {
                POLICY => {
                    if policies.iter().any(|p| p.name == doc.metadata.name) {
                        return Err(PolicyError::Invalid { what, why: "defined twice".to_owned() });
                    }
                    let spec: PolicySpec = serde_json::from_value(doc.spec).map_err(shape)?;
                    policies.push(Policy::compile(doc.metadata.name, spec)?);
                }
                BINDING => bindings.push((doc.metadata.name, serde_json::from_value::<BindingSpec>(doc.spec).map_err(shape)?)),
                _ => return Err(PolicyError::Invalid { what, why: format!("only {POLICY} and {BINDING} are understood") }),
            }
        }
        for (name, spec) in bindings {
            let what = format!("{BINDING} {name}");
            let deny = binding_denies(&spec.validation_actions).map_err(|why| PolicyError::Invalid { what, why })?;
            let Some(policy) = policies.iter_mut().find(|p| p.name == spec.policy_name) else {
                return Err(PolicyError::UnknownPolicy { binding: name, policy: spec.policy_name });
            };
            policy.bindings.push((name, deny));
        }
        if let Some(p) = policies.iter().find(|p| p.bindings.is_empty()) {
            return Err(PolicyError::Unbound { policy: p.name.clone() });
        }
        if policies.is_empty() {
            return Err(PolicyError::Empty);
        }
        Ok(ValidatingAdmissionPolicies { policies })
    }

    /// `Err` with kube-apiserver's wording when a binding with `Deny` denies the request:
    /// `ValidatingAdmissionPolicy '<policy>' with binding '<binding>' denied request: <message>`.
    pub fn admit(&self, req: &AdmissionRequest) -> Result<(), String> {
        for policy in &self.policies {
            if !policy.matches(req) {
                continue;
            }
            let Verdict::Deny(message) = policy.judge(req) else { continue };
            match policy.bindings.iter().find(|(_, deny)| *deny) {
                Some((binding, _)) => {
                    return Err(format!("ValidatingAdmissionPolicy '{}' with binding '{binding}' denied request: {message}", policy.name));
                }
                None => tracing::warn!(policy = %policy.name, %message, "a policy without a Deny binding failed; allowed"),
            }
        }
        Ok(())
    }

    /// The hook for [`ApiServer::set_admission`](crate::ApiServer::set_admission).
    pub fn hook(self) -> AdmissionHook {
        Arc::new(move |req| self.admit(req))
    }
}

/// Whether a binding denies; kube-apiserver's rules for `validationActions`.
fn binding_denies(actions: &[String]) -> Result<bool, String> {
    if actions.is_empty() {
        return Err("validationActions must name at least one of Deny, Warn, Audit".to_owned());
    }
    if let Some(a) = actions.iter().find(|a| !["Deny", "Warn", "Audit"].contains(&a.as_str())) {
        return Err(format!("validationActions: unknown action {a:?}"));
    }
    let has = |a: &str| actions.iter().any(|x| x == a);
    if has("Deny") && has("Warn") {
        return Err("validationActions may not hold both Deny and Warn".to_owned());
    }
    Ok(has("Deny"))
}

// === impl Policy ===

impl Policy {
    fn compile(name: String, spec: PolicySpec) -> Result<Self, PolicyError> {
        let what = |field: &str| format!("{POLICY} {name}: {field}");
        let m = spec.match_constraints;
        for (field, selector) in [("namespaceSelector", &m.namespace_selector), ("objectSelector", &m.object_selector)] {
            if selector.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(PolicyError::Unsupported { what: what(&format!("matchConstraints.{field}")) });
            }
        }
        if let Some(p) = m.match_policy.as_deref().filter(|p| !["Exact", "Equivalent"].contains(p)) {
            return Err(PolicyError::Invalid {
                what: what("matchConstraints.matchPolicy"),
                why: format!("{p:?} is not Exact or Equivalent"),
            });
        }
        if m.resource_rules.is_empty() {
            return Err(PolicyError::Invalid { what: what("matchConstraints.resourceRules"), why: "required".to_owned() });
        }
        for (i, rule) in m.resource_rules.iter().chain(&m.exclude_resource_rules).enumerate() {
            rule.check().map_err(|why| PolicyError::Invalid { what: what(&format!("matchConstraints rule {i}")), why })?;
        }
        if spec.validations.is_empty() {
            return Err(PolicyError::Invalid { what: what("validations"), why: "at least one is required".to_owned() });
        }

        let mut declared: Vec<String> = Vec::new();
        let mut variables = Vec::new();
        for (i, v) in spec.variables.iter().enumerate() {
            let field = what(&format!("variables[{i}] ({})", v.name));
            if !is_identifier(&v.name) || declared.contains(&v.name) {
                return Err(PolicyError::Invalid { what: field, why: "the name must be a unique CEL identifier".to_owned() });
            }
            // A variable sees only those declared before it.
            variables.push((v.name.clone(), Compiled::new(field, &v.expression, &declared)?));
            declared.push(v.name.clone());
        }
        let mut match_conditions = Vec::new();
        for (i, c) in spec.match_conditions.iter().enumerate() {
            let field = what(&format!("matchConditions[{i}] ({})", c.name));
            if c.name.is_empty() || match_conditions.iter().any(|(n, _)| *n == c.name) {
                return Err(PolicyError::Invalid { what: field, why: "the name must be unique and not empty".to_owned() });
            }
            match_conditions.push((c.name.clone(), Compiled::new(field, &c.expression, &declared)?));
        }
        let mut validations = Vec::new();
        for (i, v) in spec.validations.iter().enumerate() {
            let field = |f: &str| what(&format!("validations[{i}].{f}"));
            if let Some(r) = v.reason.as_deref().filter(|r| !["Unauthorized", "Forbidden", "Invalid", "RequestEntityTooLarge"].contains(r))
            {
                return Err(PolicyError::Invalid { what: field("reason"), why: format!("{r:?} is not a reason kube-apiserver accepts") });
            }
            validations.push(Validation {
                expression: Compiled::new(field("expression"), &v.expression, &declared)?,
                message: v.message.clone().filter(|m| !m.trim().is_empty()),
                message_expression: v
                    .message_expression
                    .as_deref()
                    .map(|e| Compiled::new(field("messageExpression"), e, &declared))
                    .transpose()?,
            });
        }
        Ok(Policy {
            fail_closed: spec.failure_policy.unwrap_or(FailurePolicy::Fail) == FailurePolicy::Fail,
            name,
            rules: m.resource_rules,
            excluded: m.exclude_resource_rules,
            variables,
            match_conditions,
            validations,
            bindings: Vec::new(),
        })
    }

    fn matches(&self, req: &AdmissionRequest) -> bool {
        self.rules.iter().any(|r| r.matches(req)) && !self.excluded.iter().any(|r| r.matches(req))
    }

    fn judge(&self, req: &AdmissionRequest) -> Verdict {
        let mut ctx = Context::default().with_all();
        let or_null = |v: &Option<Value>| v.as_ref().map_or(cel::Value::Null, to_cel);
        ctx.add_variable_from_value("request", to_cel(&req.request_json()));
        ctx.add_variable_from_value("object", or_null(&req.object));
        ctx.add_variable_from_value("oldObject", or_null(&req.old_object));
        ctx.add_variable_from_value("params", cel::Value::Null);
        // kube-apiserver binds the Namespace of a namespaced object only.
        ctx.add_variable_from_value(
            "namespaceObject",
            if req.namespace.is_some() { or_null(&req.namespace_object) } else { cel::Value::Null },
        );

        // Each variable sees the ones before it; one that fails is left out, and an expression
        // that then fails for want of it says why.
        let mut values: HashMap<Key, cel::Value> = HashMap::new();
        let mut broken: HashMap<&str, String> = HashMap::new();
        for (name, expr) in &self.variables {
            ctx.add_variable_from_value("variables", cel::Value::Map(Map { map: Arc::new(values.clone()) }));
            match expr.run(&ctx, &broken) {
                Ok(v) => {
                    values.insert(Key::from(name.as_str()), v);
                }
                Err(e) => {
                    broken.insert(name, e);
                }
            }
        }
        ctx.add_variable_from_value("variables", cel::Value::Map(Map { map: Arc::new(values) }));

        // Any condition false: the policy does not apply, even if another errored.
        let mut condition_error = None;
        for (name, expr) in &self.match_conditions {
            match expr.run_bool(&ctx, &broken) {
                Ok(true) => {}
                Ok(false) => return Verdict::Allow,
                Err(e) => {
                    condition_error.get_or_insert_with(|| format!("failed to evaluate matchCondition '{name}': {e}"));
                }
            }
        }
        if let Some(e) = condition_error {
            return if self.fail_closed { Verdict::Deny(e) } else { Verdict::Allow };
        }

        for v in &self.validations {
            match v.expression.run_bool(&ctx, &broken) {
                Ok(true) => {}
                Ok(false) => return Verdict::Deny(v.message(&ctx, &broken)),
                Err(e) if self.fail_closed => return Verdict::Deny(format!("expression '{}' resulted in error: {e}", v.expression.source)),
                Err(_) => {}
            }
        }
        Verdict::Allow
    }
}

// === impl RuleSpec ===

impl RuleSpec {
    fn check(&self) -> Result<(), String> {
        for (field, list) in [
            ("apiGroups", &self.api_groups),
            ("apiVersions", &self.api_versions),
            ("operations", &self.operations),
            ("resources", &self.resources),
        ] {
            if list.is_empty() {
                return Err(format!("{field} must not be empty"));
            }
        }
        if let Some(op) = self.operations.iter().find(|o| !["*", "CREATE", "UPDATE", "DELETE", "CONNECT"].contains(&o.as_str())) {
            return Err(format!("operations: unknown operation {op:?}"));
        }
        match self.scope.as_deref() {
            None | Some("*" | "Cluster" | "Namespaced") => Ok(()),
            Some(other) => Err(format!("scope: {other:?} is not *, Cluster or Namespaced")),
        }
    }

    fn matches(&self, req: &AdmissionRequest) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let op = match req.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        };
        let scope = match self.scope.as_deref() {
            Some("Cluster") => req.namespace.is_none(),
            Some("Namespaced") => req.namespace.is_some(),
            _ => true,
        };
        any(&self.api_groups, &req.group)
            && any(&self.api_versions, &req.version)
            && any(&self.operations, op)
            && self.resources.iter().any(|r| resource_matches(r, &req.resource, req.sub_resource.as_deref()))
            && scope
            && (self.resource_names.is_empty() || self.resource_names.contains(&req.name))
    }
}

/// `pods` is the resource alone, `pods/status` one subresource, `*` every resource (no
/// subresources), `*/*` everything, `pods/*` every subresource of pods, `*/status` every status.
fn resource_matches(pattern: &str, resource: &str, sub: Option<&str>) -> bool {
    let is = |p: &str, v: &str| p == "*" || p == v;
    match (pattern.split_once('/'), sub) {
        (None, None) => is(pattern, resource),
        (Some((r, s)), Some(sub)) => is(r, resource) && is(s, sub),
        _ => false,
    }
}

// === impl Validation ===

impl Validation {
    /// kube-apiserver's order: a `messageExpression` that yields a usable string, else
    /// `message`, else the failed expression.
    fn message(&self, ctx: &Context<'_>, broken: &HashMap<&str, String>) -> String {
        let from_expression = self.message_expression.as_ref().and_then(|e| match e.run(ctx, broken) {
            Ok(cel::Value::String(s)) if !s.trim().is_empty() && !s.contains('\n') => Some(s.trim().to_owned()),
            Ok(other) => {
                tracing::warn!(expression = %e.source, result = ?other, "messageExpression did not give a one-line string");
                None
            }
            Err(error) => {
                tracing::warn!(expression = %e.source, %error, "messageExpression failed");
                None
            }
        });
        from_expression.or_else(|| self.message.clone()).unwrap_or_else(|| format!("failed expression: {}", self.expression.source.trim()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::UserInfo;

    /// A policy on `widgets` (namespaced, group example.io) around `validations`, with a binding.
    fn policy(extra_spec: &str, validations: &str) -> String {
        format!(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: p}}
spec:
  matchConstraints:
    resourceRules:
    - {{apiGroups: [example.io], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [widgets]}}
{extra_spec}
  validations:
{validations}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: b}}
spec: {{policyName: p, validationActions: [Deny]}}
"#
        )
    }

    fn load(extra_spec: &str, validations: &str) -> Result<ValidatingAdmissionPolicies, PolicyError> {
        ValidatingAdmissionPolicies::from_yaml(&policy(extra_spec, validations))
    }

    fn request(sub_resource: Option<&str>, size: i64) -> AdmissionRequest {
        AdmissionRequest {
            operation: Operation::Create,
            group: "example.io".to_owned(),
            version: "v1".to_owned(),
            resource: "widgets".to_owned(),
            sub_resource: sub_resource.map(str::to_owned),
            kind: "Widget".to_owned(),
            namespace: Some("shop".to_owned()),
            name: "w".to_owned(),
            user_info: UserInfo::new("alice", &["devs"]),
            object: Some(json!({"metadata": {"name": "w"}, "spec": {"size": size}})),
            old_object: None,
            namespace_object: None,
            dry_run: false,
        }
    }

    const DENIED: &str = "ValidatingAdmissionPolicy 'p' with binding 'b' denied request: ";

    #[test]
    fn validations_deny_with_their_message_in_order() {
        let p = load(
            "",
            r#"
  - {expression: "object.spec.size >= 0", messageExpression: "'size ' + string(object.spec.size) + ' is negative'"}
  - {expression: "object.spec.size < 10", message: "too big"}
  - {expression: "object.spec.size != 5"}"#,
        )
        .unwrap();
        assert_eq!(p.admit(&request(None, 1)), Ok(()));
        assert_eq!(p.admit(&request(None, -1)), Err(format!("{DENIED}size -1 is negative")));
        assert_eq!(p.admit(&request(None, 10)), Err(format!("{DENIED}too big")));
        assert_eq!(p.admit(&request(None, 5)), Err(format!("{DENIED}failed expression: object.spec.size != 5")));
        // Not matched: a subresource, another operation.
        assert_eq!(p.admit(&request(Some("status"), -1)), Ok(()));
        let mut delete = request(None, -1);
        delete.operation = Operation::Delete;
        assert_eq!(p.admit(&delete), Ok(()));
    }

    #[test]
    fn malformed_cel_is_an_error_at_load_not_a_policy_that_allows() {
        let e = load("", r#"  - {expression: "object.spec.size >= (0"}"#).unwrap_err();
        assert!(matches!(e, PolicyError::Compile { .. }), "{e}");
        assert!(e.to_string().contains("validations[0].expression"), "{e}");
        let e = load("", r#"  - {expression: "true", messageExpression: "'a' +"}"#).unwrap_err();
        assert!(e.to_string().contains("validations[0].messageExpression"), "{e}");
        let e = load("", r#"  - {expression: "objekt.spec.size >= 0"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ValidatingAdmissionPolicy p: validations[0].expression: `objekt` is not defined here; fix the name or define it"
        );
        let e =
            load("  variables: [{name: big, expression: \"object.spec.size > 9\"}]", r#"  - {expression: "!variables.bigg"}"#).unwrap_err();
        assert!(matches!(&e, PolicyError::Undefined { name, .. } if name == "variables.bigg"), "{e}");
        // A variable sees only those before it.
        let e = load(
            "  variables: [{name: a, expression: \"variables.b\"}, {name: b, expression: \"true\"}]",
            r#"  - {expression: "variables.a"}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, PolicyError::Undefined { name, .. } if name == "variables.b"), "{e}");
        // Comprehension variables are fine.
        load("", r#"  - {expression: "[1, 2].all(x, x > 0) && {'a': 1}.exists(k, k == 'a')"}"#).unwrap();
    }

    #[test]
    fn what_the_evaluator_cannot_honour_is_refused_at_load() {
        let unsupported = ["  paramKind: {apiVersion: v1, kind: ConfigMap}", "  auditAnnotations: [{key: a, valueExpression: \"'x'\"}]"];
        for extra in unsupported {
            assert!(matches!(load(extra, r#"  - {expression: "true"}"#), Err(PolicyError::Shape { .. })), "{extra}");
        }
        let e = load("", r#"  - {expression: "authorizer.group('').resource('pods').check('get').allowed()"}"#).unwrap_err();
        assert!(matches!(e, PolicyError::Unsupported { .. }), "{e}");
        let selector = policy("", r#"  - {expression: "true"}"#)
            .replace("resources: [widgets]}", "resources: [widgets]}\n    objectSelector: {matchLabels: {a: b}}");
        assert!(matches!(ValidatingAdmissionPolicies::from_yaml(&selector), Err(PolicyError::Unsupported { .. })));
        let unbound = policy("", r#"  - {expression: "true"}"#);
        let unbound = unbound.split("---").next().unwrap();
        assert!(matches!(ValidatingAdmissionPolicies::from_yaml(unbound), Err(PolicyError::Unbound { .. })));
        let wrong_name = policy("", r#"  - {expression: "true"}"#).replace("policyName: p", "policyName: q");
        assert!(matches!(ValidatingAdmissionPolicies::from_yaml(&wrong_name), Err(PolicyError::UnknownPolicy { .. })));
        assert!(matches!(ValidatingAdmissionPolicies::from_yaml("a: ["), Err(PolicyError::Yaml(_))));
        assert!(matches!(load("", r#"  - {expression: "true", reason: Teapot}"#), Err(PolicyError::Invalid { .. })));
    }

    #[test]
    fn errors_deny_under_fail_and_are_skipped_under_ignore() {
        let validations = r#"
  - {expression: "object.spec.missing == 1", message: "never shown"}
  - {expression: "object.spec.size", message: "not a bool"}"#;
        let closed = load("", validations).unwrap();
        let e = closed.admit(&request(None, 1)).unwrap_err();
        assert!(e.starts_with(&format!("{DENIED}expression 'object.spec.missing == 1' resulted in error: ")), "{e}");
        let ignore = load("  failurePolicy: Ignore", validations).unwrap();
        assert_eq!(ignore.admit(&request(None, 1)), Ok(()));
        let only_non_bool = load("", r#"  - {expression: "object.spec.size"}"#).unwrap();
        assert!(only_non_bool.admit(&request(None, 1)).unwrap_err().contains("expected a bool"));
    }

    #[test]
    fn match_conditions_and_variables_work_like_kube_apiserver() {
        let spec = r#"
  matchConditions:
  - {name: not-alice, expression: "request.userInfo.username != 'alice'"}
  variables:
  - {name: size, expression: "object.spec.size"}
  - {name: double, expression: "variables.size * 2"}
  - {name: broken, expression: "object.spec.missing"}"#;
        let p = load(spec, r#"  - {expression: "variables.double < 10", messageExpression: "'double is ' + string(variables.double)"}"#)
            .unwrap();
        let mut bob = request(None, 6);
        bob.user_info = UserInfo::new("bob", &[]);
        assert_eq!(p.admit(&bob), Err(format!("{DENIED}double is 12")));
        assert_eq!(p.admit(&request(None, 6)), Ok(()), "alice is not matched");
        // An unused broken variable is harmless; a used one is an error that names it.
        let p = load(spec, r#"  - {expression: "variables.broken == 1"}"#).unwrap();
        let e = p.admit(&bob).unwrap_err();
        assert!(e.contains("variables.broken failed: No such key: missing"), "{e}");
        // A condition that errors fails the request under Fail.
        let p = load("  matchConditions: [{name: c, expression: \"object.spec.missing\"}]", r#"  - {expression: "true"}"#).unwrap();
        assert!(p.admit(&bob).unwrap_err().contains("failed to evaluate matchCondition 'c'"));
    }

    #[test]
    fn a_field_of_a_non_map_is_false_in_the_cel_crate() {
        // A difference from cel-go (which reports an error) that the module docs state; this
        // says when the cel crate changes it.
        let p = load("", r#"  - {expression: "oldObject.metadata == false"}"#).unwrap();
        assert_eq!(p.admit(&request(None, 1)), Ok(()));
    }

    #[test]
    fn resource_patterns() {
        assert!(resource_matches("pods", "pods", None));
        assert!(!resource_matches("pods", "pods", Some("status")));
        assert!(resource_matches("pods/status", "pods", Some("status")));
        assert!(resource_matches("*", "nodes", None));
        assert!(!resource_matches("*", "nodes", Some("status")));
        assert!(resource_matches("*/*", "nodes", Some("status")));
        assert!(resource_matches("pods/*", "pods", Some("exec")));
        assert!(resource_matches("*/status", "nodes", Some("status")));
        assert!(!resource_matches("*/status", "nodes", None));
    }
}
