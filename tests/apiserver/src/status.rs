//! Errors as the API server reports them: a `Status` object with a reason and the matching HTTP
//! code. Messages follow the real server's wording where clients or people read them.

use serde_json::{Value, json};

use crate::resource::Resource;

/// `Status.reason`; each implies the HTTP code the real server sends with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    AlreadyExists,
    Conflict,
    /// 410: a resourceVersion or continue token older than the retained history.
    Expired,
    RequestEntityTooLarge,
    UnsupportedMediaType,
    /// 422: validation failed, or an admission policy denied the request.
    Invalid,
    InternalError,
    /// 504: a resourceVersion the server has not reached yet.
    Timeout,
}

impl Reason {
    pub fn code(self) -> u16 {
        match self {
            Reason::BadRequest => 400,
            Reason::Unauthorized => 401,
            Reason::Forbidden => 403,
            Reason::NotFound => 404,
            Reason::MethodNotAllowed => 405,
            Reason::AlreadyExists | Reason::Conflict => 409,
            Reason::Expired => 410,
            Reason::RequestEntityTooLarge => 413,
            Reason::UnsupportedMediaType => 415,
            Reason::Invalid => 422,
            Reason::InternalError => 500,
            Reason::Timeout => 504,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "BadRequest",
            Reason::Unauthorized => "Unauthorized",
            Reason::Forbidden => "Forbidden",
            Reason::NotFound => "NotFound",
            Reason::MethodNotAllowed => "MethodNotAllowed",
            Reason::AlreadyExists => "AlreadyExists",
            Reason::Conflict => "Conflict",
            Reason::Expired => "Expired",
            Reason::RequestEntityTooLarge => "RequestEntityTooLarge",
            Reason::UnsupportedMediaType => "UnsupportedMediaType",
            Reason::Invalid => "Invalid",
            Reason::InternalError => "InternalError",
            Reason::Timeout => "Timeout",
        }
    }
}

/// A failed request, convertible to the `Status` object the server answers with.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} ({}, {})", reason.as_str(), reason.code())]
pub struct ApiError {
    pub reason: Reason,
    pub message: String,
    /// `Status.details` (`name`, `group`, `kind`, `causes`), when the real server sends them.
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError { reason, message: message.into(), details: None }
    }

    pub fn code(&self) -> u16 {
        self.reason.code()
    }

    /// The `Status` object, as sent in error responses and in watch `ERROR` events.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.code(),
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    fn about(reason: Reason, res: &Resource, name: &str, message: String) -> Self {
        let mut details = json!({ "name": name, "kind": res.plural });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        ApiError { reason, message, details: Some(details) }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Reason::BadRequest, message)
    }

    pub(crate) fn not_found(res: &Resource, name: &str) -> Self {
        Self::about(Reason::NotFound, res, name, format!("{} \"{name}\" not found", res.qualified()))
    }

    pub(crate) fn already_exists(res: &Resource, name: &str) -> Self {
        Self::about(Reason::AlreadyExists, res, name, format!("{} \"{name}\" already exists", res.qualified()))
    }

    pub(crate) fn conflict(res: &Resource, name: &str, why: &str) -> Self {
        let message = format!("Operation cannot be fulfilled on {} \"{name}\": {why}", res.qualified());
        Self::about(Reason::Conflict, res, name, message)
    }

    pub(crate) fn invalid(res: &Resource, name: &str, why: &str) -> Self {
        Self::about(Reason::Invalid, res, name, format!("{} \"{name}\" is invalid: {why}", res.kind))
    }

    /// An admission denial, shaped like a ValidatingAdmissionPolicy's with the default `Invalid`
    /// reason.
    pub(crate) fn denied(res: &Resource, name: &str, why: &str) -> Self {
        let mut e = Self::about(Reason::Invalid, res, name, format!("{} \"{name}\" is forbidden: {why}", res.qualified()));
        if let Some(d) = &mut e.details {
            d["causes"] = json!([{ "message": why }]);
        }
        e
    }

    /// The watch-cache wording, `too old resource version: <asked> (<oldest retained - 1>)`.
    pub(crate) fn too_old(asked: u64, compacted: u64) -> Self {
        Self::new(Reason::Expired, format!("too old resource version: {asked} ({compacted})"))
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(Reason::Unauthorized, "Unauthorized")
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(Reason::MethodNotAllowed, "the server does not allow this method on the requested resource")
    }
}
