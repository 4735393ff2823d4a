//! Authentication and TokenReview: static tokens, issued service-account tokens, audiences,
//! expiry, forged signatures, bound pods that are gone.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshguard_test_apiserver::{ApiServer, ObjectKey, ServiceAccountToken, UserInfo, Verb};
use serde_json::{Value, json};

use crate::client::{Client, pod};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const ATTESTOR_AUDIENCE: &str = "meshguard-identity-ca";

async fn review(c: &Client, token: &str, audiences: Option<&[&str]>) -> Value {
    let mut spec = json!({"token": token});
    if let Some(a) = audiences {
        spec["audiences"] = json!(a);
    }
    let r = c.post(REVIEWS, &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})).await;
    assert_eq!(r.code, 201, "a TokenReview is created, whatever its outcome: {:?}", r.body);
    assert_eq!(r.body["kind"], "TokenReview");
    r.body["status"].clone()
}

/// A running pod with its uid, and a token bound to it for the attestor's audience.
fn bound_token(server: &ApiServer) -> (String, String) {
    let p = server.create(pod("meshguard", "agent-x1", &[], "node-1")).unwrap();
    let uid = p["metadata"]["uid"].as_str().unwrap().to_owned();
    let token = server
        .issue_token(
            ServiceAccountToken::new("meshguard", "agent").audience(ATTESTOR_AUDIENCE).pod("agent-x1", &uid).node("node-1", "node-uid-1"),
        )
        .unwrap();
    (token, uid)
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401() {
    let server = ApiServer::start().await.unwrap();
    let unauthorized = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized", "reason": "Unauthorized", "code": 401});
    let anon = Client::anonymous(&server).get("/api/v1/pods").await;
    assert_eq!((anon.code, &anon.body), (401, &unauthorized));
    assert_eq!(Client::with_token(&server, "wrong").get("/api/v1/pods").await.code, 401);
    assert_eq!(Client::anonymous(&server).get("/apis").await.code, 401);
    assert_eq!(Client::anonymous(&server).post(REVIEWS, &json!({"spec": {"token": "x"}})).await.code, 401);
    // A service-account token for another audience does not open the API.
    let (attestor_token, _) = bound_token(&server);
    assert_eq!(Client::with_token(&server, &attestor_token).get("/api/v1/pods").await.code, 401);
    // Health and version are public.
    assert_eq!(Client::anonymous(&server).get("/healthz").await.code, 200);
    let log = server.requests();
    assert!(log.iter().filter(|r| r.path == "/api/v1/pods").all(|r| r.code == 401 && r.user.is_none()));
}

#[tokio::test]
async fn static_and_service_account_tokens_authenticate() {
    let server = ApiServer::start().await.unwrap();
    server.add_token("ops-token", UserInfo::new("ops", &["ops-team"]));
    assert_eq!(Client::with_token(&server, "ops-token").get("/api/v1/nodes").await.code, 200);
    let sa = server.issue_token(ServiceAccountToken::new("meshguard", "controller")).unwrap();
    assert_eq!(Client::with_token(&server, &sa).get("/api/v1/nodes").await.code, 200);
    let users: Vec<Option<String>> = server.requests().into_iter().filter(|r| r.verb == Verb::List).map(|r| r.user).collect();
    assert_eq!(users, [Some("ops".to_owned()), Some("system:serviceaccount:meshguard:controller".to_owned())]);

    // Static tokens are reviewed too, for any audience, with system:authenticated added.
    let c = Client::admin(&server);
    let s = review(&c, "ops-token", Some(&["anything"])).await;
    assert_eq!(s["authenticated"], true);
    assert_eq!(s["user"], json!({"username": "ops", "groups": ["ops-team", "system:authenticated"]}));
    assert_eq!(s["audiences"], json!(["anything"]));
}

#[tokio::test]
async fn token_review_of_a_pod_bound_token() {
    let server = ApiServer::start().await.unwrap();
    let (token, pod_uid) = bound_token(&server);
    let c = Client::admin(&server);

    let s = review(&c, &token, Some(&[ATTESTOR_AUDIENCE, "other"])).await;
    assert_eq!(s["authenticated"], true, "{s}");
    assert_eq!(s["audiences"], json!([ATTESTOR_AUDIENCE]));
    let user = &s["user"];
    assert_eq!(user["username"], "system:serviceaccount:meshguard:agent");
    assert_eq!(user["groups"], json!(["system:serviceaccounts", "system:serviceaccounts:meshguard", "system:authenticated"]));
    let extra: BTreeMap<String, Vec<String>> = serde_json::from_value(user["extra"].clone()).unwrap();
    let claims = payload(&token);
    let jti = claims["jti"].as_str().unwrap();
    let want: BTreeMap<String, Vec<String>> = [
        ("credential-id", format!("JTI={jti}")),
        ("node-name", "node-1".to_owned()),
        ("node-uid", "node-uid-1".to_owned()),
        ("pod-name", "agent-x1".to_owned()),
        ("pod-uid", pod_uid.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("authentication.kubernetes.io/{k}"), vec![v]))
    .collect();
    assert_eq!(extra, want);
    assert_eq!(user["uid"], claims["kubernetes.io"]["serviceaccount"]["uid"]);

    // The token itself looks like kube-apiserver's.
    assert_eq!(claims["iss"], "https://kubernetes.default.svc");
    assert_eq!(claims["sub"], "system:serviceaccount:meshguard:agent");
    assert_eq!(claims["aud"], json!([ATTESTOR_AUDIENCE]));
    assert_eq!(claims["kubernetes.io"]["namespace"], "meshguard");
    assert_eq!(claims["kubernetes.io"]["pod"], json!({"name": "agent-x1", "uid": pod_uid}));
    assert_eq!(claims["kubernetes.io"]["node"], json!({"name": "node-1", "uid": "node-uid-1"}));
    for c in ["exp", "iat", "nbf"] {
        assert!(claims[c].is_u64(), "{c}");
    }
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);

    // The wrong audience, or none given (the API audience is then required).
    let s = review(&c, &token, Some(&["someone-else"])).await;
    assert_eq!(s["authenticated"], false);
    assert!(s["error"].as_str().unwrap().contains("audiences"), "{s}");
    assert_eq!(review(&c, &token, None).await["authenticated"], false);

    // The bound pod deleted, or replaced by one with the same name: the token is invalidated.
    server.delete(&ObjectKey::namespaced("v1", "Pod", "meshguard", "agent-x1")).unwrap();
    let s = review(&c, &token, Some(&[ATTESTOR_AUDIENCE])).await;
    assert_eq!(s["authenticated"], false);
    assert_eq!(s["error"], "[invalid bearer token, service account token has been invalidated]");
    server.create(pod("meshguard", "agent-x1", &[], "node-1")).unwrap();
    assert_eq!(review(&c, &token, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], false);
}

#[tokio::test]
async fn token_review_rejects_expired_early_and_forged_tokens() {
    let server = ApiServer::start().await.unwrap();
    let c = Client::admin(&server);
    let now = SystemTime::now();
    let spec = || ServiceAccountToken::new("meshguard", "agent").audience(ATTESTOR_AUDIENCE);

    let expired = server.issue_token(spec().issued_at(now - Duration::from_secs(7200))).unwrap();
    let s = review(&c, &expired, Some(&[ATTESTOR_AUDIENCE])).await;
    assert_eq!((s["authenticated"].as_bool(), s["error"].as_str()), (Some(false), Some("[invalid bearer token, token is expired (exp)]")));

    let early = server.issue_token(spec().issued_at(now + Duration::from_secs(600))).unwrap();
    assert_eq!(review(&c, &early, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], false);

    let good = server.issue_token(spec()).unwrap();
    assert_eq!(review(&c, &good, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], true);

    // Claims edited after signing.
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = payload(&good);
    claims["sub"] = json!("system:serviceaccount:kube-system:admin");
    claims["kubernetes.io"]["namespace"] = json!("kube-system");
    let edited = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    assert_eq!(review(&c, &edited, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], false);

    // The same claims re-signed by another key (another server's, or an attacker's).
    let other = ApiServer::start().await.unwrap();
    let resigned = other.issue_token(spec()).unwrap();
    assert_eq!(review(&c, &resigned, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], false);

    // `alg: none`.
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_eq!(review(&c, &unsigned, Some(&[ATTESTOR_AUDIENCE])).await["authenticated"], false);

    // An empty token is a bad request.
    let r = c.post(REVIEWS, &json!({"spec": {"token": ""}})).await;
    assert_eq!(r.code, 400);
    let r = c.send(hyper::Method::POST, REVIEWS, Some("application/json"), b"{bad".to_vec()).await;
    assert_eq!(r.code, 400);
}

#[tokio::test]
async fn tokens_verify_against_the_published_jwks() {
    let server = ApiServer::start().await.unwrap();
    let token = server.issue_token(ServiceAccountToken::new("ns", "sa")).unwrap();
    let anon = Client::anonymous(&server);
    let config = anon.get("/.well-known/openid-configuration").await.body;
    assert_eq!(config["issuer"], "https://kubernetes.default.svc");
    assert_eq!(config["jwks_uri"], format!("{}/openid/v1/jwks", server.url()));
    let jwks = anon.get("/openid/v1/jwks").await.body;
    let key = &jwks["keys"][0];
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), key["kid"].as_str());
    let decoding = jsonwebtoken::DecodingKey::from_ec_components(key["x"].as_str().unwrap(), key["y"].as_str().unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["https://kubernetes.default.svc"]);
    jsonwebtoken::decode::<Value>(&token, &decoding, &v).unwrap();
}

fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}
