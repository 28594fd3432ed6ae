"""How the agent reaches the gateway's socket: directly or through an HTTP proxy
(``CONNECT`` tunnel, basic auth from the proxy URL), then TLS for ``wss://`` (Python's
default context: the system roots, which OpenSSL lets ``SSL_CERT_FILE``/``SSL_CERT_DIR``
replace, plus an optional extra CA file and client certificate).

Which proxy a URL uses (:func:`proxy_for`, :func:`no_proxy_matches`) and the parsing of
proxy URLs are pure and unit-tested; everything that can be checked without the network
is checked by :func:`Transport.create` when the agent starts, so a wrong path or URL is an
error to the caller, not a reconnect loop. The rules are the Rust SDK's
(``agent/src/transport.rs``).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

from .policy import CertificateRejected, ProxyRefused, Unreachable


class TransportError(ValueError):
    """TLS or proxy settings that cannot be used (a missing certificate file, a key that
    does not match, a proxy URL that is not ``http://``)."""


@dataclass(frozen=True)
class ClientCert:
    """A PEM client certificate chain (leaf first) and its private key, for mutual TLS."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class TlsOptions:
    """TLS of ``wss://`` URLs: CAs trusted in addition to the system roots, and a client
    certificate."""

    extra_ca_file: Optional[str] = None
    client_cert: Optional[ClientCert] = None


class FromEnv:
    """Use ``HTTPS_PROXY``/``HTTP_PROXY`` unless ``NO_PROXY`` names the gateway (default)."""

    def __repr__(self) -> str:
        return "FromEnv()"


class Direct:
    """Connect directly, whatever the environment says."""

    def __repr__(self) -> str:
        return "Direct()"


Proxy = Union[FromEnv, Direct, str]
"""Which proxy to use: :class:`FromEnv`, :class:`Direct`, or a proxy URL
(``http://[user:password@]host:port``, which overrides the environment, ``NO_PROXY``
included)."""


@dataclass(frozen=True)
class ProxyTarget:
    host: str
    port: int
    authorization: Optional[str]


def proxy_for(secure: bool, host: str, port: int, env: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    """The proxy variable and its value that apply to a gateway at ``host:port``:
    ``https_proxy``/``HTTPS_PROXY`` for ``wss://``, ``http_proxy``/``HTTP_PROXY`` for
    ``ws://``, none when ``no_proxy``/``NO_PROXY`` matches. The lowercase name wins (as
    curl does); an empty value counts as unset."""

    def first(names: Tuple[str, str]) -> Optional[Tuple[str, str]]:
        for name in names:
            value = env.get(name, "").strip()
            if value:
                return name, value
        return None

    proxy = first(("https_proxy", "HTTPS_PROXY") if secure else ("http_proxy", "HTTP_PROXY"))
    if proxy is None:
        return None
    no_proxy = first(("no_proxy", "NO_PROXY"))
    if no_proxy is not None and no_proxy_matches(no_proxy[1], host, port):
        return None
    return proxy


def _split_entry(entry: str) -> Tuple[str, Optional[int]]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if entry.startswith("["):
        rest = entry[1:]
        if "]" not in rest:
            return rest, None
        ip, tail = rest.split("]", 1)
        port = tail[1:] if tail.startswith(":") else ""
        return ip, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        name, port = entry.rsplit(":", 1)
        if port.isdigit():
            return name, int(port)
    return entry, None


def no_proxy_matches(entries: str, host: str, port: int) -> bool:
    """Whether a ``NO_PROXY`` list exempts ``host:port``. Entries are separated by commas
    or spaces: ``*`` matches everything; ``example.com``, ``.example.com`` and
    ``*.example.com`` match that domain and every name under it; ``host:port`` only that
    port; an IP address that address and a CIDR block every address in it. Names compare
    without case and without a trailing dot."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        host_ip: Optional[ipaddress._BaseAddress] = ipaddress.ip_address(host)
    except ValueError:
        host_ip = None
    for entry in entries.replace(",", " ").split():
        if entry == "*":
            return True
        name, entry_port = _split_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        name = name.rstrip(".").lower()
        if "/" in name:
            try:
                if host_ip is not None and host_ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        try:
            if host_ip is not None and ipaddress.ip_address(name) == host_ip:
                return True
            ipaddress.ip_address(name)
            continue
        except ValueError:
            pass
        domain = name.lstrip("*").lstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def redact(url: str) -> str:
    """The URL with its userinfo hidden, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def parse_proxy_url(url: str) -> ProxyTarget:
    """``http://[user:password@]host[:port]`` (no scheme means ``http://``, the port
    defaults to 80; the userinfo may be percent-encoded)."""

    def invalid(reason: str) -> TransportError:
        return TransportError(f"invalid proxy URL `{redact(url)}`: {reason}")

    text = url if "://" in url else f"http://{url}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise invalid(f"does not parse ({err})") from None
    if parts.scheme != "http":
        raise invalid(f"the scheme must be http:// (got {parts.scheme}://; TLS to the proxy itself is not supported)")
    if not parts.hostname:
        raise invalid("no host")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return ProxyTarget(parts.hostname, port or 80, authorization)


def ssl_context(options: TlsOptions) -> ssl.SSLContext:
    """The default context (system roots; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured by
    OpenSSL), the extra CA file and the client certificate."""
    context = ssl.create_default_context()
    if options.extra_ca_file is not None:
        try:
            context.load_verify_locations(cafile=options.extra_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise TransportError(f"CA file {options.extra_ca_file}: {err}") from None
    if context.cert_store_stats().get("x509_ca", 0) == 0 and not _has_default_paths():
        raise TransportError(
            "no trusted CA certificates: the system store is empty or unreadable; install the "
            "system CA bundle, set SSL_CERT_FILE, or give an extra CA file"
        )
    cert = options.client_cert
    if cert is not None:
        for path, what in ((cert.cert_file, "client certificate file"), (cert.key_file, "client key file")):
            if not os.path.isfile(path):
                raise TransportError(f"{what} {path}: no such file")
        try:
            context.load_cert_chain(cert.cert_file, cert.key_file)
        except (OSError, ssl.SSLError) as err:
            raise TransportError(
                f"client certificate {cert.cert_file} and key {cert.key_file} do not make a usable pair: {err}"
            ) from None
    return context


def _has_default_paths() -> bool:
    # A CA directory is loaded lazily by OpenSSL, so an empty store count does not mean
    # no roots when a directory is configured.
    paths = ssl.get_default_verify_paths()
    return bool(paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))


# TLS alerts by which a gateway refuses the agent's certificate (mTLS).
_REFUSED_ALERTS = (
    "BAD_CERTIFICATE",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN",
    "UNKNOWN_CA",
    "CERTIFICATE_REQUIRED",
    "ACCESS_DENIED",
)


def certificate_failure(err: BaseException) -> Optional[CertificateRejected]:
    """A certificate the agent or the gateway refuses: permanent (the same certificates
    fail every retry). ``None`` for any other error."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return CertificateRejected(
            f"the gateway's certificate was refused: {err.verify_message or err} (trust its CA with "
            "the system roots, SSL_CERT_FILE or an extra CA file)"
        )
    if isinstance(err, ssl.SSLError) and any(alert in str(err).upper() for alert in _REFUSED_ALERTS):
        return CertificateRejected(
            f"the gateway refused the TLS handshake ({err.reason or err}): it requires a client "
            "certificate it trusts"
        )
    return None


MAX_PROXY_HEADER = 16 * 1024


class ConnectFailed(Exception):
    """An attempt failed before the WebSocket upgrade; carries how it ended."""

    def __init__(self, ended: Union[Unreachable, ProxyRefused, CertificateRejected]) -> None:
        super().__init__(str(ended))
        self.ended = ended


class Transport:
    """Where to connect and how: host and port, the proxy (if any), the TLS context."""

    def __init__(self, host: str, port: int, tls: Optional[ssl.SSLContext], proxy: Optional[ProxyTarget]) -> None:
        self.host, self.port, self.tls, self.proxy = host, port, tls, proxy

    @classmethod
    def create(
        cls,
        url: str,
        tls: TlsOptions,
        proxy: Proxy,
        env: Optional[Mapping[str, str]] = None,
    ) -> "Transport":
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        target: Optional[ProxyTarget]
        if isinstance(proxy, Direct):
            target = None
        elif isinstance(proxy, str):
            target = parse_proxy_url(proxy)
        else:
            found = proxy_for(secure, host, port, os.environ if env is None else env)
            target = None
            if found is not None:
                try:
                    target = parse_proxy_url(found[1])
                except TransportError as err:
                    raise TransportError(f"{found[0]}: {err}") from None
        return cls(host, port, ssl_context(tls) if secure else None, target)

    def connect_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``websockets`` when no tunnel is needed."""
        kwargs: dict[str, object] = {}
        if self.tls is not None:
            kwargs["ssl"] = self.tls
            kwargs["server_hostname"] = self.host
        return kwargs

    async def tunnel(self) -> socket.socket:
        """Opens a ``CONNECT`` tunnel through the proxy; the returned socket then carries
        TLS (for ``wss://``) and the WebSocket."""
        proxy = self.proxy
        assert proxy is not None
        loop = asyncio.get_running_loop()
        name = f"{proxy.host}:{proxy.port}"
        try:
            infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        except OSError as err:
            raise ConnectFailed(Unreachable(f"could not reach the proxy {name}: {err}")) from None
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.authorization is not None:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        request += "\r\n"

        def lost(what: str) -> ConnectFailed:
            sock.close()
            return ConnectFailed(Unreachable(f"the proxy {name} {what}"))

        try:
            await loop.sock_sendall(sock, request.encode())
        except OSError as err:
            raise lost(f"failed while sending CONNECT: {err}") from None
        # Byte by byte, so nothing of the tunnelled stream is consumed.
        head = bytearray()
        while not head.endswith(b"\r\n\r\n"):
            if len(head) >= MAX_PROXY_HEADER:
                raise lost(f"sent more than {MAX_PROXY_HEADER} bytes of header in answer to CONNECT")
            try:
                byte = await loop.sock_recv(sock, 1)
            except OSError as err:
                raise lost(f"failed during the CONNECT handshake: {err}") from None
            if not byte:
                raise lost(f"closed the connection during the CONNECT handshake (after {len(head)} bytes of answer)")
            head += byte
        line = head.decode("latin-1").split("\r\n", 1)[0].strip()
        status = parse_status_line(line)
        if status is None:
            raise lost(f"answered CONNECT with something that is not HTTP: `{line}`")
        if not 200 <= status < 300:
            sock.close()
            raise ConnectFailed(ProxyRefused(status, f"{name} answered CONNECT {target} with `{line}`"))
        sock.setblocking(True)
        return sock


def parse_status_line(line: str) -> Optional[int]:
    """The status of ``HTTP/1.x NNN reason``, else ``None``."""
    if not line.startswith("HTTP/1.") or len(line) < 12:
        return None
    code = line[9:12]
    return int(code) if code.isdigit() else None


EnvLookup = Callable[[str], Optional[str]]
