//! `POST /apis/authentication.k8s.io/v1/tokenreviews`: verifies a token for a caller such as a
//! node attestor, answering 201 with `status.authenticated` either way, as the real server does.

use serde_json::{Value, json};

use crate::auth::{Authenticator, BoundObjects};
use crate::status::ApiError;

/// Reviews the TokenReview in `body` and returns it with `status` filled in.
pub(crate) fn review(auth: &Authenticator, bound: &dyn BoundObjects, body: &Value) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the request body must be a TokenReview object"));
    }
    let token = body.pointer("/spec/token").and_then(Value::as_str).unwrap_or("");
    if token.is_empty() {
        return Err(ApiError::bad_request("token is required for TokenReview in authentication"));
    }
    let audiences: Vec<String> = match body.pointer("/spec/audiences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(_) => return Err(ApiError::bad_request("spec.audiences must be a list of strings")),
    };
    let status = match auth.authenticate(token, &audiences, bound) {
        Ok(a) => json!({ "authenticated": true, "user": a.user, "audiences": a.audiences }),
        Err(error) => json!({ "authenticated": false, "user": {}, "error": error }),
    };
    let mut spec = json!({ "token": token });
    if !audiences.is_empty() {
        spec["audiences"] = json!(audiences);
    }
    Ok(json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": { "creationTimestamp": null },
        "spec": spec,
        "status": status,
    }))
}
