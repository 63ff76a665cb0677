//! Mutual TLS between a control plane and its hosts: a cluster CA (`stasis cluster init`),
//! one certificate per host (`stasis cluster add-host`) and one for the control plane, the
//! listeners that require them, and the clients that present them.
//!
//! Identities live in DNS names under `.stasis.internal`, which operators cannot put into
//! their own subject names: the control plane's certificate names [`CONTROL_PLANE_NAME`],
//! host H's names `H.host.stasis.internal`. Every certificate is signed by the same CA, so
//! "signed by the CA" alone says only "one of the cluster"; each side then checks the name.

use crate::error::{During, SetupError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

/// The name every control plane's certificate carries.
pub const CONTROL_PLANE_NAME: &str = "control-plane.stasis.internal";
const RESERVED_SUFFIX: &str = ".stasis.internal";
/// A slow or silent client may hold a handshake this long, and no longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; beyond it new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// The name host `id`'s certificate carries.
pub fn host_name(id: &str) -> String {
    format!("{id}.host.stasis.internal")
}

/// Whether `id` can name a host (one DNS label, so it fits in [`host_name`]).
pub fn valid_host_id(id: &str) -> bool {
    stasis_types::HostId::is_valid(id)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One side's credentials: the cluster CA, its own certificate and key (`ca.pem`, `cert.pem`,
/// `key.pem` in one directory).
pub struct Credentials {
    pub dir: PathBuf,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn load(dir: &Path) -> Result<Credentials, SetupError> {
        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, SetupError> {
            let path = dir.join(name);
            let certs = CertificateDer::pem_file_iter(&path)
                .during(format!("reading {}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .during(format!("reading {}", path.display()))?;
            if certs.is_empty() {
                return Err(SetupError::refused(format!("{} holds no certificate", path.display())));
            }
            Ok(certs)
        };
        let key_path = dir.join("key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).during(format!("reading {}", key_path.display()))?;
        let creds = Credentials {
            dir: dir.to_path_buf(),
            ca: certs("ca.pem")?,
            chain: certs("cert.pem")?,
            key,
        };
        // Fail at start, with the path, rather than at the first handshake.
        creds.server_config()?;
        Ok(creds)
    }

    /// Whether our own certificate carries `name`.
    pub fn names(&self, name: &str) -> bool {
        has_name(&self.chain[0], name)
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .during(format!("the cluster CA in {}", self.dir.display()))?;
        }
        Ok(Arc::new(roots))
    }

    /// A listener's TLS: our certificate, and a client certificate from the cluster CA
    /// required of every connection (which name it carries, the handlers check).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, SetupError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .during(format!("the cluster CA in {}", self.dir.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .during("setting up TLS")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .during(format!("the certificate and key in {}", self.dir.display()))?;
        Ok(Arc::new(config))
    }

    /// An HTTP client that presents our certificate and accepts only a server whose
    /// certificate is from the cluster CA, is valid for the URL's address, and names `peer`.
    pub fn client(&self, peer: &str, timeout: Option<Duration>) -> Result<reqwest::Client, SetupError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .during(format!("the cluster CA in {}", self.dir.display()))?;
        let verifier = Arc::new(NamedPeer {
            inner,
            name: peer.to_string(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .during("setting up TLS")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .during(format!("the certificate and key in {}", self.dir.display()))?;
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .https_only(true)
            .connect_timeout(Duration::from_secs(5));
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        builder.build().during("making the cluster's HTTP client")
    }
}

/// Whether a certificate (already verified against the CA) carries `name`.
pub fn has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The CA's usual checks, and then that the certificate names the peer we meant: every host
/// has a certificate from the same CA, and one host must not pass for another.
#[derive(Debug)]
struct NamedPeer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: String,
}

impl ServerCertVerifier for NamedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if !has_name(end_entity, &self.name) {
            return Err(rustls::Error::General(format!(
                "the server's certificate is not {}'s",
                self.name
            )));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---- making credentials ----

fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "stasis cluster CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn write_secret(path: &Path, text: &str) -> Result<(), SetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .during(format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .during(format!("writing {}", path.display()))
}

fn private_dir(path: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .during(format!("creating {}", path.display()))
}

/// A leaf certificate for `identity` (and the operator's `sans`: addresses and names the
/// other side dials), signed by the CA in `dir`, written to `out`.
fn issue(dir: &Path, out: &Path, identity: &str, sans: &[String]) -> Result<(), SetupError> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).during(format!("reading {}/ca.pem", dir.display()))?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).during(format!("reading {}/ca.key", dir.display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).during(format!("{}/ca.key", dir.display()))?;
    // The CA's subject and key identifier are derived from these parameters and its key, the
    // same as when it was made, so the issued certificate chains to ca.pem.
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let mut names = vec![identity.to_string()];
    for s in sans {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        if s.to_ascii_lowercase().ends_with(RESERVED_SUFFIX) {
            return Err(SetupError::refused(format!(
                "--san {s:?}: names under {RESERVED_SUFFIX} are the cluster's own"
            )));
        }
        names.push(s.to_string());
    }
    let mut p = rcgen::CertificateParams::new(names).during("--san")?;
    p.distinguished_name.push(rcgen::DnType::CommonName, identity);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().during("setting up TLS")?;
    let cert = p.signed_by(&key, &issuer).during("setting up TLS")?;
    private_dir(out)?;
    write_secret(&out.join("key.pem"), &key.serialize_pem())?;
    write_secret(&out.join("cert.pem"), &cert.pem())?;
    write_secret(&out.join("ca.pem"), &ca_pem)?;
    Ok(())
}

fn default_sans(sans: &[String]) -> Vec<String> {
    if sans.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        sans.to_vec()
    }
}

/// `stasis cluster init`: the CA (`ca.pem`, `ca.key`) and the control plane's credentials
/// (`control-plane/`). Returns the directory of the latter.
pub fn init(dir: &Path, sans: &[String]) -> Result<PathBuf, SetupError> {
    if dir.join("ca.key").exists() {
        return Err(SetupError::refused(format!(
            "{} already holds a cluster CA",
            dir.display()
        )));
    }
    private_dir(dir)?;
    let key = rcgen::KeyPair::generate().during("setting up TLS")?;
    let ca = ca_params().self_signed(&key).during("setting up TLS")?;
    write_secret(&dir.join("ca.key"), &key.serialize_pem())?;
    write_secret(&dir.join("ca.pem"), &ca.pem())?;
    let out = dir.join("control-plane");
    issue(dir, &out, CONTROL_PLANE_NAME, &default_sans(sans))?;
    Ok(out)
}

/// `stasis cluster add-host`: host `name`'s credentials in `hosts/NAME/` (and its name in
/// `name`, so the host knows which it is).
pub fn add_host(dir: &Path, name: &str, sans: &[String]) -> Result<PathBuf, SetupError> {
    if !valid_host_id(name) {
        return Err(SetupError::refused(format!(
            "--name {name:?}: a host's name is 1 to 63 lowercase letters, digits and dashes"
        )));
    }
    let out = dir.join("hosts").join(name);
    if out.exists() {
        return Err(SetupError::refused(format!(
            "{} exists: host {name} has credentials already",
            out.display()
        )));
    }
    issue(dir, &out, &host_name(name), &default_sans(sans))?;
    write_secret(&out.join("name"), &format!("{name}\n"))?;
    Ok(out)
}

// ---- serving ----

/// Who is on the other end of a connection, for the handlers (as `ConnectInfo<Peer>`).
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// Whether it came in on the cluster listener (not the public API's).
    pub cluster: bool,
    /// Its certificate, verified against the cluster CA (None on plain connections).
    pub cert: Option<CertificateDer<'static>>,
}

impl Peer {
    /// Whether the peer proved it holds a certificate naming `name`.
    pub fn is(&self, name: &str) -> bool {
        self.cert.as_ref().is_some_and(|c| has_name(c, name))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PublicListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, PublicListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, ClusterListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, ClusterListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// The public API's listener (plain TCP), answering with a [`Peer`] like the cluster's.
pub struct PublicListener(pub tokio::net::TcpListener);

impl axum::serve::Listener for PublicListener {
    type Io = tokio::net::TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        let (io, remote) = axum::serve::Listener::accept(&mut self.0).await;
        (
            io,
            Peer {
                remote,
                cluster: false,
                cert: None,
            },
        )
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            remote: self.0.local_addr()?,
            cluster: false,
            cert: None,
        })
    }
}

/// Where hosts and control plane meet: TLS with client certificates (or, with
/// `--insecure-plain-http`, plain TCP). Handshakes run concurrently, each bounded in time,
/// so one slow client holds up nobody else.
pub struct ClusterListener {
    local: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(Box<dyn Conn>, Peer)>,
}

impl ClusterListener {
    pub async fn bind(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<ClusterListener> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel::<(Box<dyn Conn>, Peer)>(64);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!("cluster listener: accepting: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let tx = tx.clone();
                let Some(acceptor) = acceptor.clone() else {
                    drop(permit);
                    let peer = Peer {
                        remote,
                        cluster: true,
                        cert: None,
                    };
                    if tx.send((Box::new(tcp), peer)).await.is_err() {
                        return;
                    }
                    continue;
                };
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, "cluster listener: TLS handshake refused: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    drop(permit);
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    let peer = Peer {
                        remote,
                        cluster: true,
                        cert,
                    };
                    let _ = tx.send((Box::new(tls), peer)).await;
                });
            }
        });
        Ok(ClusterListener { local, rx })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl axum::serve::Listener for ClusterListener {
    type Io = Box<dyn Conn>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop only ends with its runtime; never hand out a connection again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            remote: self.local,
            cluster: true,
            cert: None,
        })
    }
}

/// Serves `app` on the public listener and the cluster listener (either may be absent) until
/// `shutdown`, then lets their requests finish.
pub async fn serve(
    public: Option<tokio::net::TcpListener>,
    cluster: Option<ClusterListener>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    if let Some(l) = public {
        let svc = app.clone().into_make_service_with_connect_info::<Peer>();
        let fut = axum::serve(PublicListener(l), svc).with_graceful_shutdown(until(stopped.clone()));
        tasks.push(tokio::spawn(async move { fut.await }));
    }
    if let Some(l) = cluster {
        let svc = app.into_make_service_with_connect_info::<Peer>();
        let fut = axum::serve(l, svc).with_graceful_shutdown(until(stopped.clone()));
        tasks.push(tokio::spawn(async move { fut.await }));
    }
    shutdown.await;
    let _ = stop.send(true);
    for t in tasks {
        t.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_certificate_names_its_own_party_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cluster");
        let cp = init(&root, &[]).unwrap();
        assert!(init(&root, &[]).is_err(), "a second CA over the first");
        let a = add_host(&root, "a", &[]).unwrap();
        let b = add_host(&root, "b", &["10.0.0.2".into()]).unwrap();
        assert!(add_host(&root, "a", &[]).is_err(), "credentials are made once");
        assert!(add_host(&root, "Bad_Name", &[]).is_err());
        assert!(add_host(&root, "c", &["x.host.stasis.internal".into()]).is_err());
        assert!(add_host(&root, "d", &[CONTROL_PLANE_NAME.into()]).is_err());
        let (cp, a, b) = (
            Credentials::load(&cp).unwrap(),
            Credentials::load(&a).unwrap(),
            Credentials::load(&b).unwrap(),
        );
        assert!(cp.names(CONTROL_PLANE_NAME) && !cp.names(&host_name("a")));
        assert!(a.names(&host_name("a")) && !a.names(&host_name("b")) && !a.names(CONTROL_PLANE_NAME));
        assert!(b.names(&host_name("b")) && b.names("10.0.0.2") && !a.names("10.0.0.2"));
        assert!(Credentials::load(dir.path()).is_err(), "no credentials there");
    }

    #[tokio::test]
    async fn clients_accept_only_the_peer_they_meant() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cluster");
        let cp = Credentials::load(&init(&root, &[]).unwrap()).unwrap();
        let a = Credentials::load(&add_host(&root, "a", &[]).unwrap()).unwrap();
        let listener = ClusterListener::bind("127.0.0.1:0".parse().unwrap(), Some(a.server_config().unwrap()))
            .await
            .unwrap();
        let url = format!("https://127.0.0.1:{}/", listener.local_addr().port());
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(
                |axum::extract::ConnectInfo(p): axum::extract::ConnectInfo<Peer>| async move {
                    p.is(CONTROL_PLANE_NAME).to_string()
                },
            ),
        );
        tokio::spawn(serve(None, Some(listener), app, std::future::pending()));
        let good = cp.client(&host_name("a"), Some(Duration::from_secs(10))).unwrap();
        assert_eq!(good.get(&url).send().await.unwrap().text().await.unwrap(), "true");
        // Host a's certificate is from the same CA, but it is not host b's.
        let wrong = cp.client(&host_name("b"), Some(Duration::from_secs(10))).unwrap();
        assert!(wrong.get(&url).send().await.is_err());
        // A client without a certificate gets no answer.
        let anonymous = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(root.join("ca.pem")).unwrap()).unwrap())
            .build()
            .unwrap();
        assert!(anonymous.get(&url).send().await.is_err());
        // Another host connecting is let in by TLS, but is not the control plane.
        let other = Credentials::load(&add_host(&root, "b", &[]).unwrap()).unwrap();
        let as_b = other.client(&host_name("a"), Some(Duration::from_secs(10))).unwrap();
        assert_eq!(as_b.get(&url).send().await.unwrap().text().await.unwrap(), "false");
    }
}
