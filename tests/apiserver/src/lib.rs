//! An in-process Kubernetes API server for tests: the real HTTP API on `127.0.0.1`, so the
//! project's kube-rs clients, watchers, TokenReview attestor and admission rules run unchanged
//! against it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use meshguard_test_apiserver::{ApiServer, ServiceAccountToken};
//! let server = ApiServer::start().await?;
//! server.create(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
//!     "spec": {"nodeName": "node-1"},
//! }))?;
//! let token = server.issue_token(ServiceAccountToken::new("meshguard", "agent"))?;
//! // point a kube::Client at server.url() with `token` (or server.admin_token())
//! # Ok(()) }
//! ```
//!
//! | module | job |
//! |---|---|
//! | `server` | the handle: start/stop/restart, test controls, request log |
//! | `store` | objects, revisions, write rules; `store::history` the change log and watchers |
//! | `http` | accept loop, routing, list/get/write handlers, query parsing |
//! | `watch` | watch streams: replay, live events, bookmarks, 410 |
//! | `selector` | label and field selectors |
//! | `patch` | merge patch and JSON patch |
//! | `auth` | static tokens and service-account JWTs; `tokenreview` the TokenReview API |
//! | `admission` | the validating admission hook |
//! | `vap` | ValidatingAdmissionPolicy YAML evaluated as that hook (CEL) |
//! | `discovery` | discovery, `/version`, OIDC issuer discovery |
//!
//! Where it differs from kube-apiserver: no authorization (every authenticated user may do
//! anything), no anonymous access (401 rather than 403), strategic merge patch and server-side
//! apply are served as JSON merge patches (lists replaced, no managed fields), no
//! `deletecollection`, no namespace lifecycle (objects may be created in namespaces that do not
//! exist), no defaulting or schema validation beyond `metadata.name`, unconditional updates are
//! allowed for every resource, and JSON only (no protobuf, no YAML bodies, no Table output).

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod admission;
mod auth;
mod discovery;
mod http;
mod meta;
mod patch;
mod resource;
mod selector;
mod server;
mod status;
mod store;
mod tokenreview;
mod vap;
mod watch;

pub use admission::{AdmissionHook, AdmissionRequest, Operation};
pub use auth::{KeyError, ServiceAccountToken, UserInfo};
pub use resource::Resource;
pub use server::{ApiServer, Config, ObjectKey, RequestRecord, StartError, Verb};
pub use status::{ApiError, Reason};
pub use vap::{PolicyError, ValidatingAdmissionPolicies};
