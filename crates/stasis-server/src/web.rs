//! The web dashboard: a few static files compiled into the binary and served at `/`. The page
//! logs in with an API key (kept in the tab's session storage) and speaks the public API like
//! any other client; live snapshot progress uses `EventSource` with a ticket from
//! `POST /api/v1/sse/ticket`. The terminal is xterm.js (`@xterm/xterm` from npm, its
//! release files kept in `web/vendor/` as published: the dashboard test checks they are the
//! npm package's, byte for byte, and `scripts/vendor-web` refreshes them).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");
const XTERM_JS: &str = include_str!("../web/vendor/xterm.mjs");
const XTERM_CSS: &str = include_str!("../web/vendor/xterm.css");

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route(
            "/dashboard/",
            get(|| async { file("index.html", INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { file("app.js", APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { file("style.css", STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/dashboard/vendor/xterm.mjs",
            get(|| async { file("vendor/xterm.mjs", XTERM_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/vendor/xterm.css",
            get(|| async { file("vendor/xterm.css", XTERM_CSS, "text/css; charset=utf-8") }),
        )
}

/// The compiled-in file, or, when `STASIS_WEB_DIR` is set (working on the page), the file of
/// that name read from there at each request.
fn file(name: &str, compiled: &'static str, content_type: &'static str) -> Response {
    let body = match std::env::var_os("STASIS_WEB_DIR") {
        Some(dir) => {
            std::fs::read_to_string(std::path::Path::new(&dir).join(name)).unwrap_or_else(|e| format!("{name}: {e}"))
        }
        None => compiled.to_string(),
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The page loads nothing from elsewhere and is never framed. Styles may be inline: the
    // terminal sizes and colours its cells with a style element of its own (scripts may not).
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}
