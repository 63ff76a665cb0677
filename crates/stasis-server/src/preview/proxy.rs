//! Carries one request to a port inside a guest, and the answer back: streamed both ways, and a
//! WebSocket (any `Upgrade`) spliced through once the guest switches protocols.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use stasis_types::{Computer, ComputerId, ComputerStatus};

use super::{unreachable_port, TOKEN_COOKIE};
use crate::error::{Conflict, Error};
use crate::http_error::ApiError;
use crate::net::HeldStream;
use crate::AppState;

/// How long a guest has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a guest has to start answering a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Carries `req` to `port` of `computer` as `target` (a path and query): on a control plane
/// through the host that runs it, elsewhere straight to the guest.
pub async fn to_port(
    state: &AppState,
    computer: &Computer,
    port: u16,
    target: String,
    req: Request,
) -> Result<Response, ApiError> {
    if !computer.network {
        return Err(Error::conflict(
            Conflict::NoNetwork,
            format!(
                "computer {} was created with no network: none of its ports can be reached",
                computer.id
            ),
        )
        .into());
    }
    if let Some(cp) = &state.control_plane {
        let host = match cp.host_of(&state.db, computer.id).await? {
            Some(Some(h)) => h,
            _ => {
                return Err(ApiError::unavailable(format!(
                    "the host running computer {} is unavailable",
                    computer.id
                )))
            }
        };
        let path = format!("/api/v1/computers/{}/ports/{port}/proxy{target}", computer.id);
        return Ok(cp.forward_raw(&host, computer.tenant_id, &path, req).await);
    }
    match computer.status {
        ComputerStatus::Running => {}
        ComputerStatus::Provisioning | ComputerStatus::Starting => {
            return Err(Error::conflict(Conflict::ComputerStarting, "computer is starting; retry shortly").into())
        }
        _ => return Err(Error::conflict(Conflict::ComputerNotRunning, "computer is not running").into()),
    }
    let addr = state
        .computers
        .host
        .guest_port(&computer.id.to_string(), port)
        .await
        .map_err(|e| Error::conflict(Conflict::ComputerNotRunning, e.to_string()))?;
    relay(addr, computer.id, port, target, req).await
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName, connection: &HeaderMap) -> bool {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let n = name.as_str();
    HOP.contains(&n)
        || connection
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(n))
}

/// Whether a request asks to switch protocols (a WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The end-to-end headers of a request as they go on: not the platform's key, not the signed
/// link's cookie, and the upgrade it asks for if it asks for one.
pub fn onward_request_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        if hop_by_hop(name, from) || name == header::AUTHORIZATION || name == header::COOKIE {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    let cookies: Vec<&str> = from
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').map(|(k, _)| k) != Some(TOKEN_COOKIE))
        .collect();
    if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
        if !cookies.is_empty() {
            out.insert(header::COOKIE, v);
        }
    }
    if wants_upgrade(from) {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = from.get(header::UPGRADE) {
            out.insert(header::UPGRADE, u.clone());
        }
    }
    out
}

/// The end-to-end headers of an answer (and the upgrade, when it switches protocols).
pub fn onward_response_headers(from: &HeaderMap, switching: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        if !hop_by_hop(name, from) {
            out.append(name.clone(), value.clone());
        }
    }
    if switching {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = from.get(header::UPGRADE) {
            out.insert(header::UPGRADE, u.clone());
        }
    }
    out
}

/// Splices two upgraded connections together until either side closes, holding the tenant's
/// place for a long request (if it was counted) until then.
pub fn splice<A, B>(a: A, b: B, held: Option<HeldStream>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _held = held;
        let (mut a, mut b) = (a, b);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
}

/// A connection to a guest's port, and for one opened with TCP Fast Open a second descriptor
/// of its socket, to ask later whether the guest ever took it.
struct GuestConnection {
    stream: tokio::net::TcpStream,
    probe: Option<std::os::fd::OwnedFd>,
}

/// Opens a connection to `to`. A guest's own kernel gets the request's first bytes in its SYN
/// (Fast Open without a cookie, which the guest agent accepts; see its `accept_fast_open`): the
/// connect returns at once and the handshake goes with the first write, so whether the guest
/// accepts shows in the answer (a refusal, or no answer: see [`settled`]).
async fn connect(to: stasis_vmm::GuestPort) -> std::io::Result<GuestConnection> {
    use std::os::fd::{AsFd, AsRawFd};
    if !to.fast_open {
        let stream = tokio::net::TcpStream::connect(to.addr).await?;
        return Ok(GuestConnection { stream, probe: None });
    }
    let socket = match to.addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    for option in [libc::TCP_FASTOPEN_CONNECT, libc::TCP_FASTOPEN_NO_COOKIE] {
        let on: libc::c_int = 1;
        // SAFETY: the descriptor is the socket's own and `on` an int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                option,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // An older kernel: an ordinary connection.
            let stream = tokio::net::TcpStream::connect(to.addr).await?;
            return Ok(GuestConnection { stream, probe: None });
        }
    }
    let stream = socket.connect(to.addr).await?;
    let probe = stream.as_fd().try_clone_to_owned().ok();
    Ok(GuestConnection { stream, probe })
}

/// Whether the guest answered the handshake of the connection `probe` is a descriptor of (it
/// left SYN-SENT): for a Fast Open connection, the connect itself did not wait for that.
fn settled(probe: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is ours, `info` and `len` are valid for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    const TCP_SYN_SENT: u8 = 2;
    rc == 0 && info.tcpi_state != TCP_SYN_SENT
}

/// Whether `e` (a hyper error, or one it wraps) is a refused connection.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(e) = at {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        at = e.source();
    }
    false
}

/// Sends `req` to the guest's port at `to` (one connection per request) and its answer back.
async fn relay(
    to: stasis_vmm::GuestPort,
    computer: ComputerId,
    port: u16,
    target: String,
    req: Request,
) -> Result<Response, ApiError> {
    const REFUSED: &str = "nothing listens there (connection refused)";
    const NOT_ACCEPTED: &str = "it did not accept a connection within 5 s";
    let GuestConnection { stream, probe } = match tokio::time::timeout(CONNECT_TIMEOUT, connect(to)).await {
        Err(_) => return Err(unreachable_port(computer, port, NOT_ACCEPTED)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(unreachable_port(computer, port, REFUSED))
        }
        Ok(Err(e)) => return Err(unreachable_port(computer, port, e)),
        Ok(Ok(c)) => c,
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable_port(computer, port, e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (mut parts, body) = req.into_parts();
    let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let held = parts.extensions.remove::<HeldStream>();
    let mut headers = onward_request_headers(&parts.headers);
    // The guest sees the host the client asked for (a control plane passes it on as
    // `X-Forwarded-Host`).
    let forwarded = HeaderName::from_static("x-forwarded-host");
    match headers.get(&forwarded).cloned() {
        Some(h) => {
            headers.insert(header::HOST, h);
        }
        None => {
            if let Some(h) = parts.headers.get(header::HOST).cloned() {
                headers.insert(forwarded, h);
            }
        }
    }
    if let Some(peer) = crate::auth::peer_of(&parts.extensions) {
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
    }
    let mut onward = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(&target)
        .body(body)
        .map_err(|e| ApiError::BadRequest(format!("the request cannot be passed on: {e}")))?;
    *onward.headers_mut() = headers;
    let answer = sender.send_request(onward);
    tokio::pin!(answer);
    let answered = match &probe {
        None => tokio::time::timeout(ANSWER_TIMEOUT, &mut answer).await,
        // A Fast Open connection is handshaken by the request itself: a guest that takes
        // neither within the connect's time is answered as one that did not accept.
        Some(probe) => match tokio::time::timeout(CONNECT_TIMEOUT, &mut answer).await {
            Err(_) if !settled(probe) => return Err(unreachable_port(computer, port, NOT_ACCEPTED)),
            Err(_) => tokio::time::timeout(ANSWER_TIMEOUT - CONNECT_TIMEOUT, &mut answer).await,
            Ok(r) => Ok(r),
        },
    };
    drop(probe);
    let mut resp = match answered {
        Err(_) => return Err(unreachable_port(computer, port, "no answer within 300 s")),
        Ok(Err(e)) if refused(&e) => return Err(unreachable_port(computer, port, REFUSED)),
        Ok(Err(e)) => return Err(unreachable_port(computer, port, e)),
        Ok(Ok(r)) => r,
    };
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let mut out = Response::builder().status(resp.status());
    *out.headers_mut().expect("a new builder has headers") = onward_response_headers(resp.headers(), switching);
    if switching {
        let Some(client_side) = client_side else {
            return Err(unreachable_port(
                computer,
                port,
                "it switched protocols on a request that cannot",
            ));
        };
        let guest_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(client), Ok(guest)) = (client_side.await, guest_side.await) {
                splice(TokioIo::new(client), TokioIo::new(guest), held);
            }
        });
        return out
            .body(Body::empty())
            .map_err(|e| ApiError::internal(format!("an upgrade answer: {e}")));
    }
    out.body(Body::new(resp.into_body()))
        .map_err(|e| ApiError::internal(format!("a proxied answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_and_the_link_cookie_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer stasis_x".parse().unwrap());
        h.insert(header::COOKIE, "a=1; stasis_preview_token=5.ff; b=2".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("accept", "text/html".parse().unwrap());
        let out = onward_request_headers(&h);
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert_eq!(out.get(header::COOKIE).unwrap(), "a=1; b=2");
        assert!(out.get("x-private").is_none(), "named in Connection: this hop's only");
        assert!(out.get(header::CONNECTION).is_none());
        assert_eq!(out.get("accept").unwrap(), "text/html");
    }

    #[tokio::test]
    async fn a_fast_open_connection_tells_a_guest_that_took_it_from_one_that_did_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let fast = |addr| stasis_vmm::GuestPort { addr, fast_open: true };
        // One that accepts: the request's bytes arrive and the handshake is over.
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = connect(fast(open.local_addr().unwrap())).await.unwrap();
        let probe = c.probe.take().expect("a Fast Open connection keeps a probe");
        c.stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut theirs, _) = open.accept().await.unwrap();
        let mut got = [0u8; 18];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
        assert!(settled(&probe));

        // One whose queue is full drops the SYN: the connect still returns at once (the
        // handshake waits for the first write), and the probe sees it never settle.
        let full = tokio::net::TcpSocket::new_v4().unwrap();
        full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = full.listen(0).unwrap();
        let addr = full.local_addr().unwrap();
        let _filler = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio::time::timeout(Duration::from_secs(1), connect(fast(addr)))
            .await
            .expect("a Fast Open connect does not wait for the handshake")
            .unwrap();
        c.stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !settled(c.probe.as_ref().unwrap()),
            "the SYN was dropped: still SYN-SENT"
        );

        // Nothing listening: refused, and the refusal is found inside what wraps it.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let mut c = connect(fast(addr)).await.unwrap();
        let _ = c.stream.write_all(b"x").await;
        let e = c.stream.read(&mut [0u8; 1]).await.unwrap_err();
        let wrapped: Box<dyn std::error::Error> = Box::new(Wrapped(e));
        assert!(refused(wrapped.as_ref()));
        assert!(!refused(&std::io::Error::other("something else")));
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "connection error")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_upgrade_is_passed_on() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(wants_upgrade(&h));
        let out = onward_request_headers(&h);
        assert_eq!(out.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(out.get(header::UPGRADE).unwrap(), "websocket");
        let mut only_cookie = HeaderMap::new();
        only_cookie.insert(header::COOKIE, "stasis_preview_token=1.a".parse().unwrap());
        assert!(onward_request_headers(&only_cookie).get(header::COOKIE).is_none());
    }
}
