//! One policy expression: parsed by the `cel` crate, its names checked against what
//! kube-apiserver declares, and run in a context holding the Kubernetes extension functions.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use kube_cel::cel::common::ast::{EntryExpr, Expr};
use kube_cel::cel::objects::{Key, Map};
use kube_cel::cel::{self, Context, Program};
use serde_json::Value;

use super::PolicyError;

/// The variables kube-apiserver declares for a policy's expressions. `authorizer` is refused
/// (it needs the authorizer); CEL's type names may appear as identifiers too.
const ROOTS: &[&str] = &["request", "object", "oldObject", "params", "namespaceObject", "variables"];
const TYPE_NAMES: &[&str] = &["bool", "bytes", "double", "int", "uint", "string", "list", "map", "null_type", "type", "dyn"];

/// One expression, parsed, with the `variables.<name>` it reads.
#[derive(Debug)]
pub(super) struct Compiled {
    pub(super) source: String,
    program: Program,
    variables: BTreeSet<String>,
}

// === impl Compiled ===

impl Compiled {
    /// Parses `source` and checks every name it reads: the policy's variables, `variables.<x>`
    /// for an `x` in `declared`, or a comprehension's own.
    pub(super) fn new(what: String, source: &str, declared: &[String]) -> Result<Self, PolicyError> {
        let program = Program::compile(source).map_err(|e| PolicyError::Compile { what: what.clone(), message: e.to_string() })?;
        let mut names = Names::default();
        names.walk(program.expression(), &mut Vec::new());
        if names.roots.contains("authorizer") {
            return Err(PolicyError::Unsupported { what: format!("{what}: authorizer") });
        }
        if let Some(name) = names.roots.iter().find(|n| !ROOTS.contains(&n.as_str()) && !TYPE_NAMES.contains(&n.as_str())) {
            return Err(PolicyError::Undefined { what, name: name.clone() });
        }
        if let Some(name) = names.variables.iter().find(|n| !declared.contains(n)) {
            return Err(PolicyError::Undefined { what, name: format!("variables.{name}") });
        }
        Ok(Compiled { source: source.to_owned(), program, variables: names.variables })
    }

    pub(super) fn run(&self, ctx: &Context<'_>, broken: &HashMap<&str, String>) -> Result<cel::Value, String> {
        self.program.execute(ctx).map_err(|e| match self.variables.iter().find_map(|v| broken.get(v.as_str()).map(|why| (v, why))) {
            Some((v, why)) => format!("{e} (variables.{v} failed: {why})"),
            None => e.to_string(),
        })
    }

    pub(super) fn run_bool(&self, ctx: &Context<'_>, broken: &HashMap<&str, String>) -> Result<bool, String> {
        match self.run(ctx, broken)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!("expected a bool, got {}", other.type_of())),
        }
    }
}

/// The free identifiers of an expression and the `variables.<name>` it selects.
#[derive(Default)]
struct Names {
    roots: BTreeSet<String>,
    variables: BTreeSet<String>,
}

impl Names {
    /// `bound` holds the comprehension variables in scope (macros such as `all` and `map`).
    fn walk<'a>(&mut self, e: &'a cel::IdedExpr, bound: &mut Vec<&'a str>) {
        match &e.expr {
            Expr::Ident(name) if !bound.contains(&name.as_str()) => {
                self.roots.insert(name.clone());
            }
            Expr::Select(s) => {
                if let Expr::Ident(root) = &s.operand.expr
                    && root == "variables"
                    && !bound.contains(&"variables")
                {
                    self.variables.insert(s.field.clone());
                }
                self.walk(&s.operand, bound);
            }
            Expr::Call(c) => {
                c.target.iter().for_each(|t| self.walk(t, bound));
                c.args.iter().for_each(|a| self.walk(a, bound));
            }
            Expr::List(l) => l.elements.iter().for_each(|x| self.walk(x, bound)),
            Expr::Map(m) => m.entries.iter().for_each(|x| self.walk_entry(&x.expr, bound)),
            Expr::Struct(s) => s.entries.iter().for_each(|x| self.walk_entry(&x.expr, bound)),
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let depth = bound.len();
                bound.extend([c.iter_var.as_str(), c.accu_var.as_str()]);
                bound.extend(c.iter_var2.as_deref());
                for x in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.walk(x, bound);
                }
                bound.truncate(depth);
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }

    fn walk_entry<'a>(&mut self, e: &'a EntryExpr, bound: &mut Vec<&'a str>) {
        match e {
            EntryExpr::MapEntry(m) => {
                self.walk(&m.key, bound);
                self.walk(&m.value, bound);
            }
            EntryExpr::StructField(f) => self.walk(&f.value, bound),
        }
    }
}

pub(super) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// JSON as kube-apiserver shows unstructured objects to CEL: integers that fit are `int`,
/// other numbers `double`.
pub(super) fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => n.as_i64().map_or_else(|| cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)), cel::Value::Int),
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(fields) => {
            cel::Value::Map(Map { map: Arc::new(fields.iter().map(|(k, v)| (Key::from(k.as_str()), to_cel(v))).collect()) })
        }
    }
}
