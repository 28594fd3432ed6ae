"""Which proxy a gateway URL uses, proxy URLs, and TLS settings (no network)."""

import pytest

from tether_agent.transport import (
    ClientCert,
    Direct,
    TlsOptions,
    Transport,
    TransportError,
    no_proxy_matches,
    parse_proxy_url,
    parse_status_line,
    proxy_for,
    redact,
)

LIST = "localhost, .internal.example, corp.example,*.svc.local, gw.test:8443, 10.1.2.3, 192.168.0.0/16, [::1]:9000, fd00::/8"


def test_no_proxy_matches_hosts_suffixes_star_ports_and_ips():
    assert no_proxy_matches(LIST, "localhost", 80)
    assert no_proxy_matches(LIST, "LOCALHOST.", 80)
    assert no_proxy_matches(LIST, "a.internal.example", 443)
    assert no_proxy_matches(LIST, "internal.example", 443)
    assert no_proxy_matches(LIST, "corp.example", 443)
    assert no_proxy_matches(LIST, "gw.corp.example", 443)
    assert not no_proxy_matches(LIST, "notcorp.example", 443)
    assert no_proxy_matches(LIST, "a.b.svc.local", 443)
    assert no_proxy_matches(LIST, "gw.test", 8443)
    assert not no_proxy_matches(LIST, "gw.test", 443)
    assert no_proxy_matches(LIST, "10.1.2.3", 1)
    assert not no_proxy_matches(LIST, "10.1.2.4", 1)
    assert no_proxy_matches(LIST, "192.168.7.9", 1)
    assert no_proxy_matches(LIST, "[::1]", 9000)
    assert not no_proxy_matches(LIST, "::1", 9001)
    assert no_proxy_matches(LIST, "fd00::5", 1)
    assert not no_proxy_matches(LIST, "example.com", 443)
    assert no_proxy_matches("*", "anything", 1)
    assert not no_proxy_matches("", "anything", 1)


def test_proxy_for_picks_the_variable_by_scheme_lowercase_first():
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "HTTP_PROXY": "http://plain:3"}
    assert proxy_for(True, "gw.example", 443, env) == ("https_proxy", "http://lower:2")
    assert proxy_for(False, "gw.example", 80, env) == ("HTTP_PROXY", "http://plain:3")
    assert proxy_for(True, "gw.example", 443, {"https_proxy": " ", "HTTPS_PROXY": "http://u:1"}) == ("HTTPS_PROXY", "http://u:1")
    env = {"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "gw.example"}
    assert proxy_for(True, "gw.example", 443, env) is None, "empty no_proxy falls through to NO_PROXY"
    assert proxy_for(True, "other.example", 443, env) == ("HTTPS_PROXY", "http://p:1")
    assert proxy_for(True, "gw.example", 443, {}) is None


def test_proxy_urls_parse_with_basic_auth():
    target = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:3128")
    assert (target.host, target.port) == ("proxy.corp", 3128)
    # base64("us@er:p:ss")
    assert target.authorization == "Basic dXNAZXI6cDpzcw=="
    assert parse_proxy_url("proxy:8080").authorization is None
    assert parse_proxy_url("http://[::1]").port == 80
    with pytest.raises(TransportError, match="the scheme must be http://"):
        parse_proxy_url("https://proxy:443")
    with pytest.raises(TransportError) as err:
        parse_proxy_url("socks5://user:secret@proxy:1080")
    assert "secret" not in str(err.value)
    assert redact("http://u:p@h:1") == "http://***@h:1"


def test_status_lines():
    assert parse_status_line("HTTP/1.1 200 Connection established") == 200
    assert parse_status_line("HTTP/1.0 407 Proxy Authentication Required") == 407
    assert parse_status_line("SSH-2.0-OpenSSH") is None


def test_transport_checks_settings_when_created(tmp_path):
    t = Transport.create("ws://gw:8080/v1/connect", TlsOptions(), Direct(), env={"HTTP_PROXY": "http://p:1"})
    assert t.proxy is None and t.tls is None and (t.host, t.port) == ("gw", 8080)
    t = Transport.create("ws://gw/v1/connect", TlsOptions(), "http://p:1")
    assert t.proxy is not None and t.proxy.host == "p" and t.port == 80
    with pytest.raises(TransportError, match="HTTP_PROXY"):
        Transport.create("ws://gw/v1/connect", TlsOptions(), __import__("tether_agent").FromEnv(), env={"HTTP_PROXY": "https://p:1"})
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TransportError, match="CA file"):
        Transport.create("wss://gw/v1/connect", TlsOptions(extra_ca_file=missing), Direct())
    with pytest.raises(TransportError, match="client certificate file"):
        Transport.create("wss://gw/v1/connect", TlsOptions(client_cert=ClientCert(missing, missing)), Direct())
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(TransportError):
        Transport.create("wss://gw/v1/connect", TlsOptions(client_cert=ClientCert(str(empty), str(empty))), Direct())
    t = Transport.create("wss://gw/v1/connect", TlsOptions(), Direct())
    assert t.tls is not None and t.port == 443
