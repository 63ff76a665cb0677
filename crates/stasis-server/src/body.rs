//! Request bodies: [`Json`], the typed extractor of a `stasis-types` request struct, and
//! [`JsonObject`] with field readers, both failing in the API's error format (400 for
//! malformed JSON, 413 for oversized bodies, 422 naming the field that is wrong).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde_json::{Map, Value};

use crate::http_error::{ApiError, ApiResult};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long a request's body may take to arrive, unless the listener says otherwise.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// When the body of this request must have arrived (set by the listener as the head is read),
/// so a client that sends a body a byte at a time cannot hold a connection and a worker.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub at: tokio::time::Instant,
    pub after: std::time::Duration,
}

/// Reads a whole body within the request's deadline and [`MAX_BODY_BYTES`].
pub async fn read_within(body: axum::body::Body, deadline: Option<BodyDeadline>) -> ApiResult<Bytes> {
    read_limited(body, deadline, MAX_BODY_BYTES).await
}

/// Reads a whole body within the request's deadline and `limit` bytes.
pub async fn read_limited(body: axum::body::Body, deadline: Option<BodyDeadline>, limit: usize) -> ApiResult<Bytes> {
    let deadline = deadline.unwrap_or(BodyDeadline {
        at: tokio::time::Instant::now() + BODY_TIMEOUT,
        after: BODY_TIMEOUT,
    });
    match tokio::time::timeout_at(deadline.at, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::BodyTimeout(deadline.after.as_secs())),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            // to_bytes fails on the length limit or on the connection.
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                Err(ApiError::PayloadTooLarge(limit))
            } else {
                Err(ApiError::BadRequest(format!("reading the request body: {e}")))
            }
        }
    }
}

/// A request body of type `T` (a `stasis-types` request struct, as the OpenAPI document
/// describes it). An empty body reads as `{}`; a field that is missing, null where it may not
/// be, or of the wrong type is a 422 naming it; unknown fields are ignored.
#[derive(Debug, Default)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let deadline = req.extensions().get::<BodyDeadline>().copied();
        let bytes = read_within(req.into_body(), deadline).await?;
        Json::parse(&bytes)
    }
}

impl<T: serde::de::DeserializeOwned> Json<T> {
    pub fn parse(bytes: &[u8]) -> ApiResult<Json<T>> {
        // Malformed JSON and non-objects first, as for every body.
        let JsonObject(map) = JsonObject::parse(bytes)?;
        match serde_path_to_error::deserialize::<_, T>(Value::Object(map)) {
            Ok(t) => Ok(Json(t)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                // A missing field is reported at its parent: name the field itself.
                let missing = inner
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                    .map(str::to_string);
                let field = match (missing, path.as_str()) {
                    (Some(f), "." | "") => f,
                    (Some(f), parent) => format!("{parent}.{f}"),
                    (None, path) => path.to_string(),
                };
                // A null where a value is needed reads as its absence.
                let message = match inner.starts_with("missing field") || inner.starts_with("invalid type: null") {
                    true => format!("{field} is required"),
                    false => format!("{field}: {inner}"),
                };
                Err(ApiError::invalid(&field, message))
            }
        }
    }
}

/// A JSON object body. An empty body reads as `{}` (the SDK sends none for start/stop/restore).
#[derive(Debug, Default)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let deadline = req.extensions().get::<BodyDeadline>().copied();
        let bytes = read_within(req.into_body(), deadline).await?;
        JsonObject::parse(&bytes)
    }
}

impl JsonObject {
    pub fn parse(bytes: &[u8]) -> ApiResult<JsonObject> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonObject::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::BadRequest("the request body must be a JSON object".into())),
            Err(e) => Err(ApiError::BadRequest(format!("malformed JSON body: {e}"))),
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    pub fn required_str(&self, field: &str) -> ApiResult<String> {
        self.optional_str(field)?
            .ok_or_else(|| ApiError::invalid(field, format!("{field} is required")))
    }

    pub fn optional_str(&self, field: &str) -> ApiResult<Option<String>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(field, format!("{field} must be a string"))),
        }
    }

    /// A whole number of seconds in `1..=max`.
    pub fn optional_seconds(&self, field: &str, max: u64) -> ApiResult<Option<u64>> {
        let bad = || {
            ApiError::invalid(
                field,
                format!("{field} must be a whole number of seconds between 1 and {max}"),
            )
        };
        match self.present(field) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let secs = n
                    .as_u64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64));
                match secs {
                    Some(s) if (1..=max).contains(&s) => Ok(Some(s)),
                    _ => Err(bad()),
                }
            }
            Some(_) => Err(bad()),
        }
    }

    pub fn optional_object(&self, field: &str) -> ApiResult<Option<Map<String, Value>>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m.clone())),
            Some(_) => Err(ApiError::invalid(field, format!("{field} must be a JSON object"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> JsonObject {
        JsonObject::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn malformed_and_non_object_bodies_are_400() {
        for bad in ["{", "[1,2]", "\"x\"", "{\"a\":}"] {
            match JsonObject::parse(bad.as_bytes()) {
                Err(ApiError::BadRequest(_)) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(JsonObject::parse(b"  ").unwrap().0.is_empty());
    }

    #[test]
    fn typed_bodies_name_the_field_that_is_wrong() {
        #[derive(serde::Deserialize, Debug)]
        struct Exec {
            command: String,
            timeout: Option<u64>,
        }
        let field = |s: &str| match Json::<Exec>::parse(s.as_bytes()) {
            Err(ApiError::Domain(crate::error::Error::Invalid { field, message })) => (field, message),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(field("{}"), ("command".into(), "command is required".into()));
        assert_eq!(field("").0, "command", "an empty body is {{}}");
        assert_eq!(field(r#"{"command": null}"#).0, "command");
        assert_eq!(field(r#"{"command": 5}"#).0, "command");
        assert_eq!(field(r#"{"command": "x", "timeout": "soon"}"#).0, "timeout");
        assert!(matches!(Json::<Exec>::parse(b"[1]"), Err(ApiError::BadRequest(_))));
        assert!(matches!(Json::<Exec>::parse(b"{"), Err(ApiError::BadRequest(_))));
        let Json(ok) = Json::<Exec>::parse(br#"{"command": "ls", "extra": 1}"#).unwrap();
        assert_eq!((ok.command.as_str(), ok.timeout), ("ls", None));
    }

    #[test]
    fn field_errors_name_the_field() {
        let b = body(r#"{"name": 5, "timeout": "x", "metadata": [], "big": 99999}"#);
        let msg = |e: ApiError| match e {
            ApiError::Domain(crate::error::Error::Invalid { field, message }) => (field, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            msg(b.required_str("name").unwrap_err()),
            ("name".into(), "name must be a string".into())
        );
        assert_eq!(msg(b.required_str("command").unwrap_err()).1, "command is required");
        assert!(msg(b.optional_seconds("timeout", 60).unwrap_err())
            .1
            .starts_with("timeout must be"));
        assert!(msg(b.optional_seconds("big", 60).unwrap_err())
            .1
            .contains("between 1 and 60"));
        assert_eq!(msg(b.optional_object("metadata").unwrap_err()).0, "metadata");
        assert_eq!(body(r#"{"t": 5}"#).optional_seconds("t", 60).unwrap(), Some(5));
        assert_eq!(body(r#"{"t": null}"#).optional_seconds("t", 60).unwrap(), None);
    }
}

/// A query string of type `T`, failing in the API's error format (a 422 naming the query)
/// rather than axum's plain text.
#[derive(Debug, Default)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(q)) => Ok(Query(q)),
            Err(e) => Err(ApiError::invalid(
                "query",
                format!("the query string cannot be read: {}", e.body_text()),
            )),
        }
    }
}
