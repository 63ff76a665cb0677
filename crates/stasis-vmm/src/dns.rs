//! The resolver computers see at `172.31.0.3`: each computer's namespace sends its DNS
//! queries (UDP) to this forwarder on the host, which asks the host's own resolver (the first
//! IPv4 `nameserver` of `/etc/resolv.conf`, or `--dns-upstream`) and sends the answer back.
//! It answers only computers (addresses of the network pool), holds a bounded number of
//! queries at once, and waits a bounded time for each answer.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::network::Cidr;

/// Queries waiting for their answer at once, beyond which new ones are dropped (the guest's
/// resolver asks again).
const IN_FLIGHT: usize = 256;
/// How long an answer may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The largest DNS message over UDP that is relayed.
const MAX_MESSAGE: usize = 4096;

/// The host's resolver: the first IPv4 `nameserver` in `resolv_conf` (the text of
/// `/etc/resolv.conf`), on port 53.
pub fn host_resolver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|a| SocketAddr::from((a, 53)))
        .next()
}

/// A DNS message: long enough for its header.
fn is_message(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && bytes.len() <= MAX_MESSAGE
}

/// Relays queries arriving on `socket` from computers (sources inside `pool`) to `upstream`,
/// until the socket fails.
pub async fn forward(socket: Arc<UdpSocket>, pool: Cidr, upstream: SocketAddr) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "computers' DNS forwarder");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let from_computer = matches!(from, SocketAddr::V4(a) if pool.contains(*a.ip()));
        if !from_computer || !is_message(&buf[..n]) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let socket = socket.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Some(answer) = ask(&query, upstream).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

/// `upstream`'s answer to `query`: from that address, with the query's id.
async fn ask(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut answer = vec![0u8; MAX_MESSAGE + 1];
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut answer))
            .await
            .ok()?
            .ok()?;
        if is_message(&answer[..n]) && answer[..2] == query[..2] {
            answer.truncate(n);
            return Some(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_resolver_is_the_first_ipv4_nameserver() {
        let conf = "# made by hand\nsearch example\nnameserver fe80::1\nnameserver 10.255.255.53\nnameserver 9.9.9.9\n";
        assert_eq!(host_resolver(conf), Some("10.255.255.53:53".parse().unwrap()));
        assert_eq!(host_resolver("search x\n"), None);
    }

    #[tokio::test]
    async fn queries_from_computers_are_relayed_and_others_ignored() {
        // The test's own upstream, on loopback: answers every query with its id and a marker.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let mut answer = buf[..n].to_vec();
                answer.extend_from_slice(b"answered");
                let _ = upstream.send_to(&answer, from).await;
            }
        });
        let forwarder = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let at = forwarder.local_addr().unwrap();
        let loopback: Cidr = "127.0.0.0/8".parse().unwrap();
        tokio::spawn(forward(forwarder, loopback, upstream_addr));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let query = [0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        client.send_to(&query, at).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..2], &[0xab, 0xcd]);
        assert!(buf[..n].ends_with(b"answered"));
        // Too short to be DNS: no answer.
        client.send_to(&[1, 2, 3], at).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf))
            .await
            .is_err());

        // From outside the pool: ignored.
        let stranger = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let other_pool: Cidr = "10.213.0.0/16".parse().unwrap();
        let forwarder = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let at = forwarder.local_addr().unwrap();
        tokio::spawn(forward(forwarder, other_pool, upstream_addr));
        stranger.send_to(&query, at).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stranger.recv(&mut buf))
                .await
                .is_err()
        );
    }
}
