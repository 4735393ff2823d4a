//! Request dispatch: authentication, then discovery, TokenReview, or a resource verb (get, list,
//! watch, create, update, patch, delete), each answered as kube-apiserver answers it.

use std::ops::Bound;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Method, Request, Response};
use serde_json::{Value, json};

use super::query::Query;
use super::route::{self, Route, Target};
use super::{Body, error, json, text};
use crate::auth::UserInfo;
use crate::meta::View;
use crate::patch::PatchKind;
use crate::resource::Resource;
use crate::selector::{FieldSelector, Filter, LabelSelector};
use crate::server::{Admit, RequestRecord, Shared, Verb};
use crate::status::{ApiError, Reason};
use crate::store::WriteOp;
use crate::watch::{self, Start, WatchParams};
use crate::{discovery, meta, tokenreview};

/// The real server's request body limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let mut record = RequestRecord {
        // Refined to list or watch once the path is known to name a collection.
        verb: verb_of(req.method()),
        path: req.uri().path().to_owned(),
        resource: None,
        namespace: None,
        name: None,
        user: None,
        code: 0,
    };
    let response = dispatch(&shared, req, &mut record).await.unwrap_or_else(|e| error(&e));
    record.code = response.status().as_u16();
    tracing::debug!(verb = ?record.verb, path = %record.path, code = record.code, "request");
    shared.record(record);
    response
}

async fn dispatch(shared: &Arc<Shared>, req: Request<Incoming>, rec: &mut RequestRecord) -> Result<Response<Body>, ApiError> {
    let path = rec.path.clone();
    let route = route::parse(&path);
    let user = if route.is_public() { None } else { Some(authenticate(shared, req.headers())?) };
    rec.user = user.as_ref().map(|u| u.username.clone());
    let read_only = || if req.method() == Method::GET { Ok(()) } else { Err(ApiError::method_not_allowed()) };
    match route {
        Route::Health => read_only().map(|()| text(200, "ok")),
        Route::Version => read_only().map(|()| json(200, &discovery::version())),
        Route::OpenIdConfiguration => {
            read_only().map(|()| json(200, &discovery::openid_configuration(shared.auth.issuer(), &shared.url())))
        }
        Route::Jwks => read_only().map(|()| json(200, &shared.auth.jwks())),
        Route::CoreVersions => read_only().map(|()| json(200, &discovery::api_versions(shared.addr))),
        Route::Groups => {
            read_only()?;
            Ok(json(200, &discovery::groups(shared.lock().resources())))
        }
        Route::Group(g) => {
            read_only()?;
            discovery::group(shared.lock().resources(), g).map(|v| json(200, &v)).ok_or_else(path_not_found)
        }
        Route::ResourceList { group, version } => {
            read_only()?;
            discovery::resource_list(shared.lock().resources(), group, version).map(|v| json(200, &v)).ok_or_else(path_not_found)
        }
        Route::TokenReview => {
            rec.verb = Verb::Create;
            rec.resource = Some("tokenreviews".to_owned());
            if req.method() != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = parse_json(&read_body(req).await?)?;
            let store = shared.lock();
            tokenreview::review(&shared.auth, &*store, &body).map(|v| json(201, &v))
        }
        Route::Resource { group, version, rest } => {
            let target = route::resolve(&shared.lock(), group, version, &rest).ok_or_else(path_not_found)?;
            let user = user.unwrap_or_default();
            resource(shared, req, target, &user, rec).await
        }
        Route::NotFound => Err(path_not_found()),
    }
}

fn path_not_found() -> ApiError {
    ApiError::new(Reason::NotFound, "the server could not find the requested resource")
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(ApiError::unauthorized)?;
    shared.authenticate(token, &[]).map(|a| a.user).map_err(|why| {
        tracing::debug!(%why, "authentication failed");
        ApiError::unauthorized()
    })
}

async fn resource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    t: Target,
    user: &UserInfo,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, ApiError> {
    let res = shared.lock().resource(t.id).clone();
    rec.resource = Some(if t.status { format!("{}/status", res.plural) } else { res.plural.clone() });
    rec.namespace = t.namespace.clone();
    rec.name = t.name.clone();
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    let header = |h| req.headers().get(h).and_then(|v: &http::HeaderValue| v.to_str().ok()).unwrap_or("").to_owned();
    let content_type = header(http::header::CONTENT_TYPE);
    let view = View::from_accept(&header(http::header::ACCEPT));
    let ns = t.namespace.as_deref();
    let name = t.name.as_deref();

    match (&method, name) {
        (&Method::GET, _) if query.flag("watch")? => {
            rec.verb = Verb::Watch;
            watch(shared, &res, &t, &query, view)
        }
        (&Method::GET, None) => {
            rec.verb = Verb::List;
            list(shared, &res, &t, &query, view)
        }
        (&Method::GET, Some(name)) => {
            let store = shared.lock();
            let obj = store.get(t.id, &store.key(t.id, ns, name)).ok_or_else(|| ApiError::not_found(&res, name))?;
            Ok(json(200, &view.show(obj)))
        }
        (&Method::POST, None) => {
            rec.verb = Verb::Create;
            if res.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let object = parse_json(&read_body(req).await?)?;
            write(shared, &t, &WriteOp::Create { object, whole: false }, user, &query)
        }
        (&Method::PUT, Some(_)) => {
            rec.verb = Verb::Update;
            let object = parse_json(&read_body(req).await?)?;
            write(shared, &t, &WriteOp::Replace { object, status: t.status, whole: false }, user, &query)
        }
        (&Method::PATCH, Some(_)) => {
            rec.verb = Verb::Patch;
            let kind = PatchKind::from_content_type(&content_type).ok_or_else(|| unsupported_patch(&content_type))?;
            if kind == PatchKind::Strategic && !res.group.is_empty() {
                // As for custom resources on a real server.
                return Err(unsupported_patch(&content_type));
            }
            if kind == PatchKind::Apply && query.get("fieldManager").is_none() {
                return Err(ApiError::new(
                    Reason::Invalid,
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let patch = parse_json(&read_body(req).await?)?;
            write(shared, &t, &WriteOp::Patch { kind, patch, status: t.status }, user, &query)
        }
        (&Method::DELETE, Some(_)) if !t.status => {
            rec.verb = Verb::Delete;
            let body = read_body(req).await?;
            let options = if body.iter().all(u8::is_ascii_whitespace) { Value::Null } else { parse_json(&body)? };
            let pre = |field: &str| meta::str_at(&options, &format!("/preconditions/{field}")).map(str::to_owned);
            let op = WriteOp::Delete { resource_version: pre("resourceVersion"), uid: pre("uid") };
            let dry_run = options.get("dryRun").and_then(Value::as_array).is_some_and(|d| d.iter().any(|v| v == "All"));
            let w = shared.write(t.id, ns, name, &op, Some(Admit { user, dry_run: dry_run || query.dry_run()? }))?;
            Ok(json(200, &w.object))
        }
        _ => {
            rec.verb = verb_of(&method);
            Err(ApiError::method_not_allowed())
        }
    }
}

fn verb_of(m: &Method) -> Verb {
    match *m {
        Method::POST => Verb::Create,
        Method::PUT => Verb::Update,
        Method::PATCH => Verb::Patch,
        Method::DELETE => Verb::Delete,
        _ => Verb::Get,
    }
}

fn unsupported_patch(content_type: &str) -> ApiError {
    ApiError::new(
        Reason::UnsupportedMediaType,
        format!(
            "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
        ),
    )
}

fn write(shared: &Shared, t: &Target, op: &WriteOp, user: &UserInfo, query: &Query) -> Result<Response<Body>, ApiError> {
    let w = shared.write(t.id, t.namespace.as_deref(), t.name.as_deref(), op, Some(Admit { user, dry_run: query.dry_run()? }))?;
    Ok(json(if w.created { 201 } else { 200 }, &w.object))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(Reason::RequestEntityTooLarge, "the request body is larger than the server accepts"))
        }
        Err(e) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn filter(query: &Query, res: &Resource, t: &Target) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), res)?,
    })
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version \"{rv}\"")))
}

fn too_large(asked: u64, current: u64) -> ApiError {
    let mut e = ApiError::new(Reason::Timeout, format!("Too large resource version: {asked}, current: {current}"));
    e.details = Some(
        json!({ "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }], "retryAfterSeconds": 1 }),
    );
    e
}

// --- list ---

/// The continue token, as the real server encodes it: the list's revision and the key to start
/// from (the last key served, plus a NUL so it sorts just after it).
fn encode_continue(rv: u64, last_key: &str) -> String {
    STANDARD.encode(json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}") }).to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = STANDARD.decode(token).map_err(|_| bad("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad("unknown version"));
    }
    let rv = v["rv"].as_u64().ok_or_else(|| bad("no resource version"))?;
    let start = v["start"].as_str().ok_or_else(|| bad("no start key"))?;
    Ok((rv, start.to_owned()))
}

fn list(shared: &Shared, res: &Resource, t: &Target, query: &Query, view: View) -> Result<Response<Body>, ApiError> {
    let filter = filter(query, res, t)?;
    let limit = query.number("limit")?.filter(|l| *l > 0);
    let rv_param = query.get("resourceVersion");
    let rv_match = query.get("resourceVersionMatch");

    let store = shared.lock();
    let current = store.revision();
    let (at, start) = if let Some(token) = query.get("continue") {
        if rv_param.is_some() {
            return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
        }
        let (rv, start) = decode_continue(token)?;
        if rv > current {
            return Err(ApiError::bad_request("continue key is not valid: resource version from the future"));
        }
        if rv < store.history.compacted() {
            return Err(ApiError::new(
                Reason::Expired,
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        (rv, start)
    } else {
        let at = match (rv_param, rv_match) {
            (None, None) => current,
            (None, Some(_)) => {
                return Err(ApiError::new(
                    Reason::Invalid,
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            (Some(rv), Some("Exact")) => {
                let n = parse_rv(rv)?;
                if n == 0 {
                    return Err(ApiError::new(
                        Reason::Invalid,
                        "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    ));
                }
                if n > current {
                    return Err(too_large(n, current));
                }
                n
            }
            (Some(rv), None | Some("NotOlderThan")) => {
                let n = parse_rv(rv)?;
                if n > current {
                    return Err(too_large(n, current));
                }
                // Not older than `n`: the current state will do.
                current
            }
            (Some(_), Some(other)) => return Err(ApiError::bad_request(format!("unsupported resourceVersionMatch {other:?}"))),
        };
        (at, String::new())
    };
    let objects = store.snapshot(t.id, at)?;
    drop(store);

    let mut items = Vec::new();
    let (mut last_key, mut remaining) = (None, 0u64);
    for (key, obj) in objects.range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded)) {
        if !filter.matches(obj) {
            continue;
        }
        if limit.is_some_and(|l| items.len() as u64 >= l) {
            remaining += 1;
            continue;
        }
        items.push(view.show(obj).into_owned());
        last_key = Some(key);
    }
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    if remaining > 0 {
        metadata["continue"] = json!(encode_continue(at, last_key.map_or("", String::as_str)));
        // As the real server: the count is exact only without selectors, so it is left out.
        if filter.labels.is_empty() && filter.fields.is_empty() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let (kind, api_version) = match view {
        View::Full => (format!("{}List", res.kind), res.api_version()),
        View::Metadata => ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1".to_owned()),
    };
    let list = json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items });
    Ok(json(200, &list))
}

// --- watch ---

fn watch(shared: &Arc<Shared>, res: &Resource, t: &Target, query: &Query, view: View) -> Result<Response<Body>, ApiError> {
    let filter = filter(query, res, t)?;
    let bookmarks = query.flag("allowWatchBookmarks")?;
    let rv = query.get("resourceVersion");
    let not_older = match query.get("resourceVersionMatch") {
        None => false,
        Some("NotOlderThan") => true,
        Some(other) => return Err(ApiError::new(Reason::Invalid, format!("resourceVersionMatch: Unsupported value: {other:?} for watch"))),
    };
    let start = match query.get("sendInitialEvents").map(|_| query.flag("sendInitialEvents")).transpose()? {
        Some(initial) => {
            if !not_older {
                return Err(ApiError::new(
                    Reason::Invalid,
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if initial && !bookmarks {
                return Err(ApiError::new(
                    Reason::Invalid,
                    "allowWatchBookmarks: Required value: sendInitialEvents requires allowWatchBookmarks",
                ));
            }
            match (initial, rv) {
                (true, _) => Start::InitialEvents,
                (false, None | Some("0")) => Start::After(shared.lock().revision()),
                (false, Some(rv)) => Start::After(parse_rv(rv)?),
            }
        }
        None if not_older => {
            return Err(ApiError::new(
                Reason::Invalid,
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        None => match rv {
            None | Some("0") => Start::Current,
            Some(rv) => Start::After(parse_rv(rv)?),
        },
    };
    Ok(watch::serve(shared, WatchParams { resource: t.id, filter, start, bookmarks, timeout: query.timeout()?, view }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "ns/web");
        assert_eq!(decode_continue(&token).unwrap(), (42, "ns/web\u{0}".to_owned()));
        assert!(decode_continue("not a token").is_err());
    }
}
