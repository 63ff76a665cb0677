//! Ports and preview URLs: the ports a computer's owner exposed, the URLs and signed links
//! that reach them, and the proxy that carries HTTP and WebSocket to a port inside a guest.
//!
//! A port is reached in two forms:
//! - under the API, with the tenant's key: `/api/v1/computers/{id}/ports/{port}/proxy/...`;
//! - by the `Host` header: `{port}-{slug}.sandbox.{preview_domain}` (or `{slug}.sandbox...`,
//!   the lowest port exposed), as the official SDK builds preview URLs. Such a request is let
//!   through when the port is public, carries the tenant's key, or carries a signed link's
//!   token (`?stasis_preview_token=`, which also sets a cookie for that host so a page's own
//!   requests follow).
//!
//! With the default `localhost:PORT` no DNS is needed: `*.localhost` is loopback to browsers
//! and curl. On a control plane, both forms go to the host that runs the computer (as the path
//! form); on that host the proxy opens a connection to the guest (see
//! [`stasis_vmm::host::Host::guest_port`]).

pub mod proxy;
pub mod routes;

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use stasis_types::{Computer, ComputerId, Port, PortVisibility, PreviewUrl};

use crate::db::{Db, PortRecord};
use crate::http_error::ApiError;
use crate::AppState;

/// The query parameter a signed link carries.
pub const TOKEN_PARAM: &str = "stasis_preview_token";
/// The cookie a signed link leaves for its host.
pub const TOKEN_COOKIE: &str = "stasis_preview_token";

/// How preview URLs are made (`--preview-domain`, `--preview-scheme`, `--preview-link-ttl`).
#[derive(Debug, Clone)]
pub struct PreviewConfig {
    /// What preview hosts end in after `.sandbox.` (may carry a port: `localhost:8080`).
    pub domain: String,
    /// `http`, or `https` behind a proxy that terminates TLS.
    pub scheme: String,
    /// How long a signed link lasts.
    pub link_ttl: Duration,
}

impl PreviewConfig {
    /// `localhost:PORT` of the API's listener: works with no DNS set-up.
    pub fn local(listen: std::net::SocketAddr) -> PreviewConfig {
        PreviewConfig {
            domain: format!("localhost:{}", listen.port()),
            scheme: "http".into(),
            link_ttl: Duration::from_secs(3600),
        }
    }
}

/// Where a preview host points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTarget {
    /// None: the computer's lowest exposed port.
    pub port: Option<u16>,
    /// A slug, or a computer's id.
    pub name: String,
}

pub struct Previews {
    pub config: PreviewConfig,
    /// The key that signs links: one for the whole platform, kept in the database (every
    /// process of a cluster checks the others' links).
    key: tokio::sync::OnceCell<[u8; 32]>,
}

impl Previews {
    pub fn new(config: PreviewConfig) -> Previews {
        Previews {
            config,
            key: tokio::sync::OnceCell::new(),
        }
    }

    async fn key(&self, db: &Db) -> Result<[u8; 32], ApiError> {
        self.key
            .get_or_try_init(|| async {
                let made = hex::encode(rand::random::<[u8; 32]>());
                let stored = db.platform_secret("preview-link-key", &made).await?;
                let mut key = [0u8; 32];
                hex::decode_to_slice(stored.trim(), &mut key)
                    .map_err(|_| ApiError::internal("the stored preview link key is not 64 hex digits"))?;
                Ok::<_, ApiError>(key)
            })
            .await
            .copied()
    }

    /// `{scheme}://{port}-{slug}.sandbox.{domain}/` (no port: `{slug}.sandbox...`).
    pub fn url(&self, slug: &str, port: Option<u16>) -> String {
        let label = match port {
            Some(p) => format!("{p}-{slug}"),
            None => slug.to_string(),
        };
        format!("{}://{label}.sandbox.{}/", self.config.scheme, self.config.domain)
    }

    /// Fills in a computer's `preview_domain` and `sandbox_url`.
    pub fn dress(&self, c: &mut Computer) {
        c.preview_domain = Some(self.config.domain.clone());
        c.sandbox_url = c.network.then(|| self.url(&c.slug, None));
    }

    fn mac(key: &[u8; 32], computer: ComputerId, port: u16, expires: i64) -> String {
        let msg = format!("stasis preview link v1\n{computer}\n{port}\n{expires}");
        hex::encode(&blake3::keyed_hash(key, msg.as_bytes()).as_bytes()[..20])
    }

    /// A token that opens `port` of `computer` until `expires`.
    pub async fn sign(
        &self,
        db: &Db,
        computer: ComputerId,
        port: u16,
        expires: DateTime<Utc>,
    ) -> Result<String, ApiError> {
        let key = self.key(db).await?;
        let at = expires.timestamp();
        Ok(format!("{at}.{}", Self::mac(&key, computer, port, at)))
    }

    /// Whether `token` opens `port` of `computer` now.
    pub async fn verify(&self, db: &Db, token: &str, computer: ComputerId, port: u16) -> Result<bool, ApiError> {
        let Some((at, mac)) = token.split_once('.') else {
            return Ok(false);
        };
        let Ok(at) = at.parse::<i64>() else {
            return Ok(false);
        };
        if at < Utc::now().timestamp() {
            return Ok(false);
        }
        let key = self.key(db).await?;
        let want = Self::mac(&key, computer, port, at);
        Ok(constant_time_eq(want.as_bytes(), mac.as_bytes()))
    }

    /// The wire form of an exposed port, with a fresh signed link when it is private.
    pub async fn port(&self, db: &Db, c: &Computer, r: &PortRecord) -> Result<Port, ApiError> {
        let url = self.url(&c.slug, Some(r.port));
        let (signed_url, signed_url_expires_at) = if r.public {
            (None, None)
        } else {
            let expires = Utc::now() + self.config.link_ttl;
            let expires = expires - chrono::Duration::nanoseconds(i64::from(expires.timestamp_subsec_nanos()));
            let token = self.sign(db, c.id, r.port, expires).await?;
            (Some(format!("{url}?{TOKEN_PARAM}={token}")), Some(expires))
        };
        Ok(Port {
            port: r.port,
            visibility: if r.public {
                PortVisibility::Public
            } else {
                PortVisibility::Private
            },
            public: r.public,
            name: r.name.clone(),
            protocol: "http".into(),
            url,
            path_url: format!("/api/v1/computers/{}/ports/{}/proxy/", c.id, r.port),
            signed_url,
            signed_url_expires_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }

    pub fn preview_url(p: &Port) -> PreviewUrl {
        PreviewUrl {
            port: p.port,
            url: p.url.clone(),
            visibility: p.visibility,
            name: p.name.clone(),
            signed_url: p.signed_url.clone(),
        }
    }

    /// Where a request's `Host` points, if it is a preview host.
    pub fn parse_host(&self, host: &str) -> Option<HostTarget> {
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let domain = self.config.domain.to_ascii_lowercase();
        // A domain without a port matches whatever port the request came to.
        let host = match domain.contains(':') {
            true => host,
            false => host.rsplit_once(':').map_or(host.clone(), |(h, _)| h.to_string()),
        };
        let label = host.strip_suffix(&format!(".sandbox.{domain}"))?;
        if label.is_empty() || label.contains('.') {
            return None;
        }
        if let Some((p, rest)) = label.split_once('-') {
            if let Ok(port) = p.parse::<u16>() {
                if port > 0 && !rest.is_empty() && p.len() <= 5 {
                    return Some(HostTarget {
                        port: Some(port),
                        name: rest.to_string(),
                    });
                }
            }
        }
        Some(HostTarget {
            port: None,
            name: label.to_string(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in a request's headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The query string without the signed link's token, and the token if it was there.
pub fn take_token(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else { return (None, None) };
    let mut token = None;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == TOKEN_PARAM => {
                token = Some(v.to_string());
                false
            }
            _ => kv != &TOKEN_PARAM,
        })
        .collect();
    let kept = (!kept.is_empty()).then(|| kept.join("&"));
    (kept, token)
}

/// Middleware: a request to a preview host goes to the computer's port (or is refused); any
/// other request goes on to the API.
pub async fn by_host(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let Some(target) = host.and_then(|h| state.previews.parse_host(h)) else {
        return next.run(req).await;
    };
    match preview(&state, target, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn preview(state: &AppState, target: HostTarget, req: Request) -> Result<Response, ApiError> {
    let unknown = || ApiError::RouteNotFound(format!("no computer is served as {}", target.name));
    let computer = match target.name.parse::<ComputerId>() {
        Ok(id) => state.db.get_computer(id).await?,
        Err(_) => state.db.computer_by_slug(&target.name).await?,
    }
    .ok_or_else(unknown)?;
    let exposed = state.db.ports(computer.id).await?;
    let port = match target.port {
        Some(p) => p,
        None => exposed.first().map(|r| r.port).ok_or_else(|| {
            ApiError::RouteNotFound(format!(
                "computer {} exposes no port; name one: {}",
                computer.id,
                state.previews.url(&computer.slug, Some(8080))
            ))
        })?,
    };
    let public = exposed.iter().any(|r| r.port == port && r.public);
    let (query, token) = take_token(req.uri().query());
    let mut set_cookie = None;
    if !public {
        let by_key = match crate::auth::bearer(req.headers()) {
            Some(key) => {
                let hash = crate::auth::hash_key(key);
                let peer = crate::auth::peer_of(req.extensions());
                let failures = &state.guards.auth_failures;
                if let Some(wait) = peer.and_then(|p| failures.blocked(p, &hash)) {
                    return Ok(crate::net::auth_blocked(wait));
                }
                match state.db.tenant_by_key_hash(&hash).await? {
                    Some(t) => {
                        failures.succeeded(&hash);
                        state.limits.admit_request(t).await?;
                        t == computer.tenant_id
                    }
                    None => {
                        if let Some(p) = peer {
                            failures.failed(p);
                        }
                        false
                    }
                }
            }
            None => false,
        };
        let by_link = match &token {
            Some(t) if state.previews.verify(&state.db, t, computer.id, port).await? => {
                set_cookie = Some(t.clone());
                true
            }
            _ => match cookie(req.headers(), TOKEN_COOKIE) {
                Some(t) => state.previews.verify(&state.db, t, computer.id, port).await?,
                None => false,
            },
        };
        if !by_key && !by_link {
            return Err(ApiError::PrivatePort(format!(
                "port {port} of computer {} is private: send the tenant's API key, open a signed link \
                 (GET /computers/{}/ports), or make the port public",
                computer.slug, computer.id
            )));
        }
    }
    let path = req.uri().path().to_string();
    let target = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut resp = proxy::to_port(state, &computer, port, target, req).await?;
    if let Some(token) = set_cookie {
        let max_age = token
            .split_once('.')
            .and_then(|(at, _)| at.parse::<i64>().ok())
            .map_or(0, |at| (at - Utc::now().timestamp()).max(0));
        let value = format!("{TOKEN_COOKIE}={token}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax");
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// An answer for a port the proxy could not reach.
pub fn unreachable_port(computer: ComputerId, port: u16, why: impl std::fmt::Display) -> ApiError {
    ApiError::BadGateway(format!("port {port} of computer {computer} did not answer: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn previews(domain: &str) -> Previews {
        Previews::new(PreviewConfig {
            domain: domain.into(),
            scheme: "http".into(),
            link_ttl: Duration::from_secs(60),
        })
    }

    #[test]
    fn preview_hosts_name_a_port_and_a_computer() {
        let p = previews("localhost:8080");
        assert_eq!(
            p.parse_host("3000-my-app.sandbox.localhost:8080"),
            Some(HostTarget {
                port: Some(3000),
                name: "my-app".into()
            })
        );
        assert_eq!(
            p.parse_host("My-App.Sandbox.LOCALHOST:8080"),
            Some(HostTarget {
                port: None,
                name: "my-app".into()
            })
        );
        // Another port of the same name is not this platform's.
        assert_eq!(p.parse_host("3000-app.sandbox.localhost:9090"), None);
        assert_eq!(p.parse_host("localhost:8080"), None);
        assert_eq!(p.parse_host("a.b.sandbox.localhost:8080"), None);
        assert_eq!(p.parse_host(".sandbox.localhost:8080"), None);
        // Not a port: the whole label is the name.
        assert_eq!(p.parse_host("99999-app.sandbox.localhost:8080").unwrap().port, None);
        let q = previews("example.com");
        assert_eq!(
            q.parse_host("8000-x.sandbox.example.com:443").unwrap(),
            HostTarget {
                port: Some(8000),
                name: "x".into()
            }
        );
        assert_eq!(p.url("app", Some(3000)), "http://3000-app.sandbox.localhost:8080/");
    }

    #[test]
    fn the_token_is_taken_out_of_the_query() {
        assert_eq!(
            take_token(Some("a=1&stasis_preview_token=9.ab&b=2")),
            (Some("a=1&b=2".into()), Some("9.ab".into()))
        );
        assert_eq!(
            take_token(Some("stasis_preview_token=9.ab")),
            (None, Some("9.ab".into()))
        );
        assert_eq!(take_token(Some("x=1")), (Some("x=1".into()), None));
        assert_eq!(take_token(None), (None, None));
    }

    #[test]
    fn links_open_only_their_port_until_they_expire() {
        let key = [7u8; 32];
        let c = ComputerId::new();
        let a = Previews::mac(&key, c, 3000, 100);
        assert_eq!(a, Previews::mac(&key, c, 3000, 100));
        assert_ne!(a, Previews::mac(&key, c, 3001, 100));
        assert_ne!(a, Previews::mac(&key, c, 3000, 101));
        assert_ne!(a, Previews::mac(&key, ComputerId::new(), 3000, 100));
        assert_ne!(a, Previews::mac(&[8u8; 32], c, 3000, 100));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; stasis_preview_token=5.ff; b=2".parse().unwrap());
        assert_eq!(cookie(&h, TOKEN_COOKIE), Some("5.ff"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
