//! How the agent reaches the gateway's socket: directly or through an HTTP proxy
//! (`CONNECT` tunnel, basic auth from the proxy URL), then TLS for `wss://` (rustls with
//! the system roots, which honour `SSL_CERT_FILE`/`SSL_CERT_DIR`, an optional extra CA
//! file and an optional client certificate for mTLS).
//!
//! Everything that can be checked without the network (certificate files, proxy URLs,
//! the proxy environment) is checked once by [`Transport::new`] when the agent starts, so
//! a wrong path or URL is an error to the caller, not a reconnect loop. Which proxy a URL
//! uses ([`proxy_for`], [`no_proxy_matches`]) is pure and unit-tested.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine as _;
use rustls::{
    AlertDescription, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::policy::Ended;

/// TLS settings for `wss://` URLs (ignored for `ws://`).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// A PEM file of CA certificates trusted in addition to the system roots (for a
    /// private CA, or a TLS-inspecting proxy's CA).
    pub extra_ca_file: Option<PathBuf>,
    /// A client certificate presented to a gateway (or the load balancer in front of it)
    /// that requires mutual TLS.
    pub client_cert: Option<ClientCert>,
}

/// A client certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Which HTTP proxy the agent tunnels through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Proxy {
    /// `HTTPS_PROXY`/`https_proxy` for `wss://`, `HTTP_PROXY`/`http_proxy` for `ws://`,
    /// unless `NO_PROXY`/`no_proxy` names the gateway's host (the default).
    #[default]
    FromEnv,
    /// Connect directly, whatever the environment says.
    Direct,
    /// Always this proxy (`http://[user:password@]host:port`), whatever the environment
    /// says (`NO_PROXY` included).
    Url(String),
}

/// A proxy resolved for one gateway URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyTarget {
    host: String,
    port: u16,
    /// `Basic …` credentials from the URL's userinfo.
    authorization: Option<String>,
}

/// Everything needed to open a socket to the gateway, resolved once at start.
pub(crate) struct Transport {
    host: String,
    port: u16,
    tls: Option<Arc<ClientConfig>>,
    proxy: Option<ProxyTarget>,
}

/// Any stream the WebSocket runs over (plain TCP or TLS, direct or tunnelled).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

impl Transport {
    /// Resolves the TLS configuration and proxy for `uri` (a checked `ws`/`wss` URL).
    /// `env` looks up an environment variable (the process environment in production).
    pub(crate) fn new(
        uri: &http::Uri,
        tls: &TlsOptions,
        proxy: &Proxy,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let secure = uri.scheme_str() == Some("wss");
        let host = uri.host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let proxy = match proxy {
            Proxy::Direct => None,
            Proxy::Url(url) => Some(parse_proxy_url(url)?),
            Proxy::FromEnv => proxy_for(secure, &host, port, &env)
                .map(|(var, url)| parse_proxy_url(&url).map_err(|e| format!("{var}: {e}")))
                .transpose()?,
        };
        let tls = if secure {
            Some(Arc::new(client_config(tls)?))
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            tls,
            proxy,
        })
    }

    /// Opens TCP (through the proxy's tunnel if one applies) and TLS for `wss://`.
    pub(crate) async fn open(&self) -> Result<Stream, Ended> {
        let tcp = match &self.proxy {
            None => {
                let tcp = TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| Ended::Unreachable {
                        cause: e.to_string(),
                    })?;
                let _ = tcp.set_nodelay(true);
                tcp
            }
            Some(proxy) => {
                let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
                    .await
                    .map_err(|e| Ended::Unreachable {
                        cause: format!(
                            "could not reach the proxy {}:{}: {e}",
                            proxy.host, proxy.port
                        ),
                    })?;
                let _ = tcp.set_nodelay(true);
                tunnel(&mut tcp, proxy, &self.host, self.port).await?;
                tcp
            }
        };
        let Some(config) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from(self.host.clone()).map_err(|e| Ended::Unreachable {
            cause: format!("`{}` is not a valid TLS server name: {e}", self.host),
        })?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|err| {
                certificate_failure(&err).unwrap_or_else(|| Ended::Unreachable {
                    cause: format!("TLS handshake failed: {err}"),
                })
            })?;
        Ok(Box::new(tls))
    }
}

/// A certificate the agent or the gateway refuses, from an I/O error of the TLS stream:
/// permanent (the same certificates fail every retry). `None` for anything else (a
/// reset, a timeout), which is not. With TLS 1.3 a gateway's refusal of the client
/// certificate arrives after the client's handshake, on the first read of the upgrade,
/// so the upgrade's I/O errors pass through here too.
pub(crate) fn certificate_failure(err: &std::io::Error) -> Option<Ended> {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(e @ rustls::Error::InvalidCertificate(_)) => Some(Ended::CertificateRejected {
            cause: format!(
                "the gateway's certificate was refused: {e} (trust its CA with the system \
                 roots, SSL_CERT_FILE or an extra CA file)"
            ),
        }),
        Some(
            e @ rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied,
            ),
        ) => Some(Ended::CertificateRejected {
            cause: format!(
                "the gateway refused the TLS handshake ({e}): it requires a client \
                 certificate it trusts"
            ),
        }),
        _ => None,
    }
}

/// Builds the rustls client configuration: system roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` override the platform's store), the extra CA file, the client
/// certificate.
fn client_config(options: &TlsOptions) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    let mut extra = 0;
    if let Some(path) = &options.extra_ca_file {
        for cert in read_certs(path, "CA file")? {
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            extra += 1;
        }
    }
    if added + extra == 0 {
        let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "no trusted CA certificates: the system store is empty or unreadable{}; \
             install the system CA bundle, set SSL_CERT_FILE, or give an extra CA file",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match &options.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some(ClientCert {
            cert_file,
            key_file,
        }) => {
            let chain = read_certs(cert_file, "client certificate file")?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                format!(
                    "client key file {}: no readable private key ({e})",
                    key_file.display()
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "client certificate {} and key {} do not make a usable pair: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })
        }
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The proxy environment variable and its value that apply to a gateway at
/// `host:port`: `https_proxy`/`HTTPS_PROXY` for `wss://` (`secure`),
/// `http_proxy`/`HTTP_PROXY` for `ws://`, none when `no_proxy`/`NO_PROXY` matches the
/// host. The lowercase name wins when both are set (as curl does); an empty value
/// counts as unset.
pub fn proxy_for(
    secure: bool,
    host: &str,
    port: u16,
    env: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    let first = |names: &[&'static str]| {
        names.iter().find_map(|name| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*name, v.trim().to_owned()))
        })
    };
    let proxy = if secure {
        first(&["https_proxy", "HTTPS_PROXY"])
    } else {
        first(&["http_proxy", "HTTP_PROXY"])
    }?;
    match first(&["no_proxy", "NO_PROXY"]) {
        Some((_, list)) if no_proxy_matches(&list, host, port) => None,
        _ => Some(proxy),
    }
}

/// Whether a `NO_PROXY` list exempts `host:port` from the proxy. Entries are separated
/// by commas (or spaces): `*` matches everything; `example.com`, `.example.com` and
/// `*.example.com` match that domain and every name under it; `host:port` matches
/// only that port; an IP address (`10.1.2.3`, `::1`, `[::1]:8080`) matches that address
/// and a CIDR block (`10.0.0.0/8`, `fd00::/8`) every address in it. Names compare
/// without case and without a trailing dot.
pub fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip: Option<IpAddr> = host.parse().ok();
    list.split([',', ' ', '\t', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = split_entry(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some((net, bits)) = name.split_once('/') {
                return match (net.parse::<IpAddr>(), bits.parse::<u8>(), host_ip) {
                    (Ok(net), Ok(bits), Some(ip)) => in_cidr(ip, net, bits),
                    _ => false,
                };
            }
            if let (Ok(ip), Some(host_ip)) = (name.parse::<IpAddr>(), host_ip) {
                return ip == host_ip;
            }
            let domain = name.trim_start_matches('*').trim_start_matches('.');
            !domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|rest| rest.ends_with('.')))
        })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address (several colons).
fn split_entry(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        };
    }
    match entry.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Parses `http://[user:password@]host[:port]` (no scheme means `http://`; the port
/// defaults to 80). The userinfo may be percent-encoded.
fn parse_proxy_url(url: &str) -> Result<ProxyTarget, String> {
    let invalid = |reason: &str| format!("invalid proxy URL `{}`: {reason}", redact(url));
    let with_scheme = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: http::Uri = with_scheme.parse().map_err(|_| invalid("does not parse"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "the scheme must be http:// (got {other}://; TLS to the proxy itself is not \
                 supported)"
            )));
        }
        None => return Err(invalid("no scheme")),
    }
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let authorization = match authority.as_str().rsplit_once('@') {
        None => None,
        Some((userinfo, _)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let user = percent_decode(user).ok_or_else(|| invalid("bad %-escape in user"))?;
            let password =
                percent_decode(password).ok_or_else(|| invalid("bad %-escape in password"))?;
            let credentials =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            Some(format!("Basic {credentials}"))
        }
    };
    Ok(ProxyTarget {
        host,
        port: authority.port_u16().unwrap_or(80),
        authorization,
    })
}

/// The URL with its userinfo replaced, for error messages.
fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}***@{host}"),
        None => url.to_owned(),
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Largest proxy answer header read before giving up on it.
const MAX_PROXY_HEADER: usize = 16 * 1024;

/// Asks the proxy for a tunnel to `host:port` and reads its answer up to the end of its
/// header (byte by byte, so nothing of the tunnelled stream is consumed).
async fn tunnel(
    tcp: &mut TcpStream,
    proxy: &ProxyTarget,
    host: &str,
    port: u16,
) -> Result<(), Ended> {
    let proxy_name = format!("{}:{}", proxy.host, proxy.port);
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let lost = |what: String| Ended::Unreachable {
        cause: format!("the proxy {proxy_name} {what}"),
    };
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| lost(format!("failed while sending CONNECT: {e}")))?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEADER {
            return Err(lost(format!(
                "sent more than {MAX_PROXY_HEADER} bytes of header in answer to CONNECT"
            )));
        }
        match tcp.read(&mut byte).await {
            Ok(0) => {
                return Err(lost(format!(
                    "closed the connection during the CONNECT handshake (after {} bytes of \
                     answer)",
                    head.len()
                )));
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => {
                return Err(lost(format!("failed during the CONNECT handshake: {e}")));
            }
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default().trim().to_owned();
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(()),
        Some(status) => Err(Ended::ProxyRefused {
            status,
            line: format!("{proxy_name} answered CONNECT {target} with `{line}`"),
        }),
        None => Err(lost(format!(
            "answered CONNECT with something that is not HTTP: `{line}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_hosts_suffixes_star_ports_and_ips() {
        let list = "localhost, .internal.example, corp.example,*.svc.local, gw.test:8443, 10.1.2.3, 192.168.0.0/16, [::1]:9000, fd00::/8";
        // Exact host, any port.
        assert!(no_proxy_matches(list, "localhost", 80));
        assert!(no_proxy_matches(list, "LOCALHOST.", 443));
        // Leading dot, no dot and `*.`: the domain and every name under it.
        assert!(no_proxy_matches(list, "a.internal.example", 443));
        assert!(no_proxy_matches(list, "internal.example", 443));
        assert!(no_proxy_matches(list, "corp.example", 443));
        assert!(no_proxy_matches(list, "deep.gw.corp.example", 443));
        assert!(no_proxy_matches(list, "x.svc.local", 443));
        // A suffix only matches at a dot.
        assert!(!no_proxy_matches(list, "notcorp.example", 443));
        assert!(!no_proxy_matches(list, "example", 443));
        // host:port matches only that port.
        assert!(no_proxy_matches(list, "gw.test", 8443));
        assert!(!no_proxy_matches(list, "gw.test", 443));
        // IP addresses and CIDR blocks.
        assert!(no_proxy_matches(list, "10.1.2.3", 443));
        assert!(!no_proxy_matches(list, "10.1.2.4", 443));
        assert!(no_proxy_matches(list, "192.168.44.5", 443));
        assert!(!no_proxy_matches(list, "192.169.0.1", 443));
        assert!(no_proxy_matches(list, "[::1]", 9000));
        assert!(!no_proxy_matches(list, "::1", 9001));
        assert!(no_proxy_matches(list, "fd00::5", 1));
        // An IP entry does not match a name, nor a name an IP.
        assert!(!no_proxy_matches("10.1.2.3", "gateway", 443));
        assert!(!no_proxy_matches("example.com", "10.0.0.1", 443));
        // `*` matches everything; an empty list nothing.
        assert!(no_proxy_matches("*", "anything.example", 1));
        assert!(!no_proxy_matches("", "anything.example", 1));
        assert!(!no_proxy_matches(" , ,", "anything.example", 1));
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn proxy_for_picks_the_variable_of_the_scheme_and_honours_no_proxy() {
        let vars = [
            ("HTTPS_PROXY", "http://secure:3128"),
            ("HTTP_PROXY", "http://plain:3128"),
            ("NO_PROXY", "direct.example"),
        ];
        assert_eq!(
            proxy_for(true, "gw.example", 443, env(&vars)),
            Some(("HTTPS_PROXY", "http://secure:3128".into()))
        );
        assert_eq!(
            proxy_for(false, "gw.example", 80, env(&vars)),
            Some(("HTTP_PROXY", "http://plain:3128".into()))
        );
        assert_eq!(proxy_for(true, "a.direct.example", 443, env(&vars)), None);
        // Lowercase wins; empty counts as unset.
        let vars = [
            ("https_proxy", "http://lower:1"),
            ("HTTPS_PROXY", "http://upper:1"),
            ("no_proxy", ""),
            ("NO_PROXY", "gw.example"),
        ];
        assert_eq!(
            proxy_for(true, "gw.example", 443, env(&vars)),
            None,
            "empty no_proxy falls through to NO_PROXY"
        );
        assert_eq!(
            proxy_for(true, "other.example", 443, env(&vars)),
            Some(("https_proxy", "http://lower:1".into()))
        );
        // A ws:// URL ignores HTTPS_PROXY.
        assert_eq!(proxy_for(false, "gw.example", 80, env(&vars[..2])), None);
    }

    #[test]
    fn proxy_urls_parse_with_credentials_and_refuse_other_schemes() {
        let proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:3128").unwrap();
        assert_eq!(proxy.host, "proxy.corp");
        assert_eq!(proxy.port, 3128);
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(proxy.authorization, Some(format!("Basic {expected}")));
        let bare = parse_proxy_url("proxy.corp").unwrap();
        assert_eq!((bare.port, bare.authorization), (80, None));
        let err = parse_proxy_url("https://user:secret@proxy:443").unwrap_err();
        assert!(err.contains("http://"), "{err}");
        assert!(!err.contains("secret"), "the password leaks: {err}");
        assert!(parse_proxy_url("http://").is_err());
    }

    #[tokio::test]
    async fn a_proxy_that_closes_mid_handshake_is_reported_in_words() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            // Half an answer, then the connection goes away.
            let _ = socket.write_all(b"HTTP/1.1 200 Conn").await;
        });
        let proxy = parse_proxy_url(&format!("http://{addr}")).unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let ended = tunnel(&mut tcp, &proxy, "gw.example", 443)
            .await
            .unwrap_err();
        let text = ended.to_string();
        assert!(
            matches!(ended, Ended::Unreachable { .. })
                && text.contains("closed the connection during the CONNECT handshake")
                && text.contains(&addr.to_string()),
            "{text}"
        );
    }

    #[test]
    fn tls_options_with_missing_files_are_refused_with_the_path() {
        let uri: http::Uri = "wss://gw.example/v1/connect".parse().unwrap();
        let options = TlsOptions {
            extra_ca_file: Some("/nonexistent/ca.pem".into()),
            client_cert: None,
        };
        let err = Transport::new(&uri, &options, &Proxy::Direct, |_| None)
            .err()
            .unwrap();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let options = TlsOptions {
            extra_ca_file: Some(empty),
            client_cert: None,
        };
        let err = Transport::new(&uri, &options, &Proxy::Direct, |_| None)
            .err()
            .unwrap();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
