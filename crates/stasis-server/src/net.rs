//! The HTTP listener and the limits that keep one client from exhausting the platform: a
//! header (and idle keep-alive) timeout, a cap on open connections, a bounded graceful
//! shutdown, per-tenant caps on long requests (exec, event streams), and a per-address budget
//! of failed key lookups.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use axum::Router;
use stasis_types::TenantId;

/// How the listener treats connections (`stasis serve` flags).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Time a client has to send a request's headers. hyper starts this timer whenever a
    /// connection waits for the next request head, so it is also the idle keep-alive timeout.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body, from when its head was read.
    pub body_timeout: Duration,
    /// Connections open at once; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Exec calls and event streams one tenant may have open at once.
    pub max_streams_per_tenant: usize,
    /// How long shutdown waits for requests in flight before dropping their connections.
    pub shutdown_grace: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: Duration::from_secs(20),
            body_timeout: crate::body::BODY_TIMEOUT,
            max_connections: 4096,
            max_streams_per_tenant: 64,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit (the default soft limit is
/// often 1024, which a few hundred clients and QEMUs exhaust); returns the soft limit now.
pub fn raise_nofile_limit() -> Option<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own and pass by valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass by valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Some(lim.rlim_cur)
}

/// Accepts connections until `shutdown`, then lets requests in flight finish for at most
/// `settings.shutdown_grace` and drops what is left (an idle or hung client must not keep the
/// platform from stopping its machines).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    settings: &HttpSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut max = settings.max_connections.max(1);
    if let Some(nofile) = raise_nofile_limit() {
        // Leave half the descriptors to QEMUs, the database and the store.
        let room = (nofile / 2).max(16) as usize;
        if max > room {
            tracing::warn!(
                max_connections = max,
                open_files = nofile,
                "--max-connections lowered to {room}: half of this process's open-file limit"
            );
            max = room;
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: &str, detail: String| {
        // One line per 10 s, whatever a flood does.
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            last_warning = Some(Instant::now());
            tracing::warn!(detail, "{what}");
        }
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    warn("accepting a connection failed", e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap a connection is closed at once, not queued: the client learns quickly,
        // and held-open connections cannot make new ones wait behind them.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            warn(
                "too many connections: closing new ones",
                format!("{max} open; from {peer}"),
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = settings.header_timeout;
        let body_timeout = settings.body_timeout;
        conns.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(crate::body::BodyDeadline {
                    at: tokio::time::Instant::now() + body_timeout,
                    after: body_timeout,
                });
                // The cluster's handlers know their peers by this (public: no certificate).
                req.extensions_mut().insert(ConnectInfo(crate::tls::Peer {
                    remote: peer,
                    cluster: false,
                    cert: None,
                }));
                let mut app = app.clone();
                async move {
                    let mut resp = tower::Service::call(&mut app, req).await?;
                    // One request per connection. With keep-alive, the header timer that also
                    // closes idle connections left clients that reuse one (the end-to-end
                    // suites, on PostgreSQL) with a request the server never read, cut off after
                    // the timeout; until that is understood, a connection answers once and
                    // closes. Said per response rather than by turning keep-alive off, which
                    // would make a WebSocket's 101 say `Connection: upgrade, close` (strict
                    // clients refuse that: the upgrade must be the one token).
                    if resp.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS {
                        resp.headers_mut().insert(
                            axum::http::header::CONNECTION,
                            axum::http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(settings.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            _ = &mut grace => {
                tracing::warn!(connections = conns.len(), "dropping connections still open after the shutdown grace");
                conns.abort_all();
                break;
            }
        }
    }
    Ok(())
}

/// What the listener shares with the middleware.
pub struct Guards {
    pub streams: Arc<TenantStreams>,
    pub auth_failures: AuthFailures,
}

impl Guards {
    pub fn new(settings: &HttpSettings) -> Guards {
        Guards {
            streams: Arc::new(TenantStreams::new(settings.max_streams_per_tenant)),
            auth_failures: AuthFailures::default(),
        }
    }
}

/// Long requests open per tenant.
pub struct TenantStreams {
    max: usize,
    open: Mutex<HashMap<TenantId, usize>>,
}

/// A tenant at its cap of long requests (429).
#[derive(Debug)]
pub struct TooManyStreams(pub usize);

impl IntoResponse for TooManyStreams {
    fn into_response(self) -> Response {
        crate::http_error::ApiError::TooManyStreams(self.0).into_response()
    }
}

/// One long request's place; given back when dropped.
pub struct StreamPermit {
    owner: Arc<TenantStreams>,
    tenant: TenantId,
}

/// A long request's place, put in its request for a handler that hands the connection on
/// (a proxied WebSocket): it holds the place until the spliced connection closes.
#[derive(Clone)]
pub struct HeldStream(pub Arc<StreamPermit>);

impl TenantStreams {
    pub fn new(max: usize) -> TenantStreams {
        TenantStreams {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn acquire(self: &Arc<Self>, tenant: TenantId) -> Result<StreamPermit, TooManyStreams> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(tenant).or_insert(0);
        if *n >= self.max {
            return Err(TooManyStreams(self.max));
        }
        *n += 1;
        Ok(StreamPermit {
            owner: self.clone(),
            tenant,
        })
    }

    pub fn open_for(&self, tenant: TenantId) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tenant)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

/// Failed key lookups per client address: a token bucket each (a burst, then a slow refill),
/// in a bounded map. Keys that authenticated recently are let through even from an address
/// that is over its budget, so one bad client behind a shared address does not lock out the
/// good ones that were already working.
pub struct AuthFailures {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    good: Mutex<HashMap<String, Instant>>,
    burst: f64,
    per_sec: f64,
}

const MAX_ADDRESSES: usize = 10_000;
const MAX_GOOD_KEYS: usize = 4096;
const GOOD_KEY_TTL: Duration = Duration::from_secs(600);

impl Default for AuthFailures {
    fn default() -> Self {
        AuthFailures {
            buckets: Mutex::new(HashMap::new()),
            good: Mutex::new(HashMap::new()),
            burst: 20.0,
            per_sec: 0.5,
        }
    }
}

/// The address a budget belongs to: IPv6 clients by their /64 (one host has many addresses).
fn address_of(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl AuthFailures {
    fn refill(&self, tokens: &mut f64, last: &mut Instant, now: Instant) {
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_sec).min(self.burst);
        *last = now;
    }

    /// Seconds until `peer` may try a key again; None: it may now.
    pub fn blocked(&self, peer: SocketAddr, key_hash: &str) -> Option<u64> {
        let addr = address_of(peer);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.get_mut(&addr)?;
        self.refill(tokens, last, Instant::now());
        if *tokens >= 1.0 {
            return None;
        }
        let wait = ((1.0 - *tokens) / self.per_sec).ceil() as u64;
        drop(buckets);
        let good = self.good.lock().unwrap_or_else(|p| p.into_inner());
        if good.get(key_hash).is_some_and(|t| t.elapsed() < GOOD_KEY_TTL) {
            return None;
        }
        Some(wait)
    }

    /// Counts a failed lookup against `peer`.
    pub fn failed(&self, peer: SocketAddr) {
        let addr = address_of(peer);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&addr) && buckets.len() >= MAX_ADDRESSES {
            // Forget the addresses that are back to a full budget; if none is, the oldest.
            let (burst, per_sec) = (self.burst, self.per_sec);
            buckets.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
            if buckets.len() >= MAX_ADDRESSES {
                if let Some(oldest) = buckets.iter().min_by_key(|(_, (_, at))| *at).map(|(a, _)| *a) {
                    buckets.remove(&oldest);
                }
            }
        }
        let (tokens, last) = buckets.entry(addr).or_insert((self.burst, now));
        self.refill(tokens, last, now);
        *tokens = (*tokens - 1.0).max(0.0);
    }

    /// Remembers a key hash that authenticated.
    pub fn succeeded(&self, key_hash: &str) {
        let mut good = self.good.lock().unwrap_or_else(|p| p.into_inner());
        if !good.contains_key(key_hash) && good.len() >= MAX_GOOD_KEYS {
            good.retain(|_, t| t.elapsed() < GOOD_KEY_TTL);
            if good.len() >= MAX_GOOD_KEYS {
                if let Some(oldest) = good.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                    good.remove(&oldest);
                }
            }
        }
        good.insert(key_hash.to_string(), Instant::now());
    }

    pub fn addresses(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The answer to an address over its budget.
pub fn auth_blocked(retry_after_secs: u64) -> Response {
    crate::http_error::ApiError::AuthBlocked(retry_after_secs).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_lookups_run_out_per_address_and_good_keys_pass() {
        let f = AuthFailures::default();
        let bad: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        f.succeeded("goodhash");
        let mut blocked_after = None;
        for i in 0..100 {
            if f.blocked(bad, "x").is_some() {
                blocked_after = Some(i);
                break;
            }
            f.failed(bad);
        }
        assert_eq!(blocked_after, Some(20), "the burst, then blocked");
        assert!(f.blocked(bad, "goodhash").is_none(), "a key that worked still passes");
        assert!(f.blocked(other, "x").is_none(), "other addresses are unaffected");
    }

    #[test]
    fn the_address_map_stays_bounded() {
        let f = AuthFailures::default();
        for i in 0..(MAX_ADDRESSES as u32 + 500) {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            f.failed(SocketAddr::new(IpAddr::V4(a), 1));
        }
        assert!(f.addresses() <= MAX_ADDRESSES);
    }

    #[test]
    fn streams_are_capped_per_tenant_and_given_back() {
        let s = Arc::new(TenantStreams::new(2));
        let (a, b) = (TenantId::new(), TenantId::new());
        let p1 = s.acquire(a).unwrap();
        let _p2 = s.acquire(a).unwrap();
        assert_eq!(
            s.acquire(a).err().unwrap().into_response().status(),
            axum::http::StatusCode::TOO_MANY_REQUESTS
        );
        assert!(s.acquire(b).is_ok(), "another tenant has its own");
        drop(p1);
        assert!(s.acquire(a).is_ok());
    }
}
