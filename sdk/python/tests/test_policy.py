"""The pure rules of the connection loop (the Rust SDK's policy.rs tests, in Python)."""

import random

from tether_agent.policy import (
    AuthRejected,
    Backoff,
    CertificateRejected,
    Closed,
    DedupWindow,
    HttpRejected,
    Lost,
    ProxyRefused,
    ProxyRejected,
    Reconnect,
    ReconnectPolicy,
    Refused,
    Rejected,
    Stop,
    TlsRejected,
    Unreachable,
    decide,
    nack_is_retryable,
    refresh_delay,
    resend_delay,
)


def rng() -> random.Random:
    return random.Random(7)


def test_backoff_window_doubles_up_to_the_cap():
    b = Backoff(base=0.1, cap=1.0)
    assert b.window(0) == 0.1
    assert b.window(1) == 0.2
    assert abs(b.window(3) - 0.8) < 1e-9
    assert b.window(4) == 1.0
    assert b.window(200) == 1.0


def test_full_jitter_covers_the_window():
    b = Backoff(base=0.1, cap=10.0)
    r = rng()
    delays = [b.delay(3, r) for _ in range(2000)]
    assert all(0 <= d <= 0.8 for d in delays)
    # Full jitter: both ends of the window are used, not only the upper half.
    assert any(d < 0.1 for d in delays)
    assert any(d > 0.7 for d in delays)


def test_auth_failures_stop_with_the_gateways_reason():
    for status in (401, 403):
        decision = decide(Rejected(status, "no tenant claim"), 0, ReconnectPolicy(), rng())
        assert isinstance(decision, Stop)
        assert isinstance(decision.reason, AuthRejected)
        assert decision.reason.status == status
        assert "no tenant claim" in str(decision.reason)


def test_client_errors_stop_and_moments_retry():
    p = ReconnectPolicy()
    for status in (400, 404, 405, 426, 200, 301):
        decision = decide(Rejected(status, ""), 0, p, rng())
        assert isinstance(decision, Stop) and isinstance(decision.reason, HttpRejected), status
    for status in (500, 502, 408):
        assert isinstance(decide(Rejected(status, ""), 0, p, rng()), Reconnect), status


def test_overload_adds_the_floor():
    p = ReconnectPolicy(backoff=Backoff(base=0.1, cap=1.0), overload_floor=2.0)
    for ended in (Rejected(503, ""), Rejected(429, ""), Closed(1013)):
        decision = decide(ended, 0, p, rng())
        assert isinstance(decision, Reconnect) and 2.0 <= decision.delay <= 2.1, ended


def test_terminal_close_codes_stop_and_others_reconnect():
    p = ReconnectPolicy()
    for code in (4002, 4003, 4005):
        decision = decide(Closed(code), 0, p, rng())
        assert isinstance(decision, Stop) and isinstance(decision.reason, Refused)
        assert str(code) in str(decision.reason)
    for code in (1000, 1001, 1006, 1011, 1012, 4001, 4004, 4006, 4007, 4999):
        assert isinstance(decide(Closed(code), 5, p, rng()), Reconnect), code


def test_a_reconnect_hint_is_honoured_exactly():
    p = ReconnectPolicy()
    assert decide(Closed(1012, hint=0.74), 9, p, rng()) == Reconnect(0.74)
    assert decide(Lost(hint=0.5), 9, p, rng()) == Reconnect(0.5)
    # A terminal code wins over a hint.
    assert isinstance(decide(Closed(4003, hint=0.1), 0, p, rng()), Stop)


def test_token_expiry_comes_back_without_a_grown_backoff():
    p = ReconnectPolicy(backoff=Backoff(base=0.1, cap=30.0))
    decision = decide(Closed(4001), 10, p, rng())
    assert isinstance(decision, Reconnect) and decision.delay <= 0.1


def test_tls_and_proxy_refusals():
    p = ReconnectPolicy()
    decision = decide(CertificateRejected("unknown issuer"), 0, p, rng())
    assert isinstance(decision, Stop) and isinstance(decision.reason, TlsRejected)
    decision = decide(ProxyRefused(407, "proxy:3128 answered `HTTP/1.1 407`"), 0, p, rng())
    assert isinstance(decision, Stop) and isinstance(decision.reason, ProxyRejected)
    assert "407" in str(decision.reason)
    assert isinstance(decide(ProxyRefused(502, "bad gateway"), 0, p, rng()), Reconnect)
    assert isinstance(decide(Unreachable("refused"), 0, p, rng()), Reconnect)


def test_refresh_delay_uses_the_margin_or_half_the_life():
    assert refresh_delay(1000, 1000 + 3600, 60) == 3540
    # A short token refreshes at half its remaining life.
    assert refresh_delay(1000, 1010, 60) == 5
    assert refresh_delay(1000, 900, 60) == 0


def test_nacks_and_resend_delay():
    assert not nack_is_retryable("bad_request")
    assert not nack_is_retryable("too_large")
    for code in ("upstream_error", "timeout", "rate_limited", "overloaded", "unavailable", "brand_new"):
        assert nack_is_retryable(code)
    assert resend_delay(2000, 0, Backoff(), rng()) == 2.0
    assert resend_delay(None, 0, Backoff(base=0.1, cap=1), rng()) <= 0.1


def test_dedup_window_is_bounded_and_forgets_the_oldest():
    w = DedupWindow(3)
    for i in "abcd":
        w.insert(i)
    assert len(w) == 3
    assert "a" not in w and "b" in w and "d" in w
    w.insert("b")  # already there: no change of order
    w.insert("e")
    assert "b" not in w and "e" in w
    off = DedupWindow(0)
    off.insert("x")
    assert "x" not in off and len(off) == 0
