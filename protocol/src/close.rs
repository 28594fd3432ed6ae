//! WebSocket close codes used by the gateway, with the reason text it sends.
//!
//! Codes below 4000 are RFC 6455 / IANA registered codes; 4000–4999 are private to
//! `tether.v1`. Clients decide whether to reconnect from the code alone
//! ([`CloseCode::should_reconnect`]), so each code has exactly one meaning.

/// Why the gateway (or an agent) closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure (the peer asked, or a backend disconnected the agent).
    Normal,
    /// 1001: the gateway is shutting down and its drain deadline passed.
    GoingAway,
    /// 1002: the peer broke RFC 6455 framing.
    ProtocolError,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload,
    /// 1008: a policy was violated: too many malformed envelopes, or the rate limit was
    /// exceeded persistently.
    PolicyViolation,
    /// 1009: a message exceeded the pool's `maxMessageBytes`.
    MessageTooBig,
    /// 1011: the gateway hit an unexpected internal error.
    InternalError,
    /// 1012: the gateway is draining (scale-down, rollout); reconnect, after the
    /// `reconnect` hint's delay if one was sent.
    ServiceRestart,
    /// 1013: the gateway is overloaded; reconnect with back-off.
    TryAgainLater,
    /// 4001: the token expired and no `refresh` arrived in time.
    TokenExpired,
    /// 4002: a `refresh` carried an invalid token, or one for another agent.
    TokenInvalid,
    /// 4003: a newer connection for the same agent id replaced this one.
    Replaced,
    /// 4004: the agent read too slowly and its outbound queue overflowed.
    SlowConsumer,
    /// 4005: a backend disconnected the agent through the push API.
    Disconnected,
    /// 4006: no frame arrived within the idle timeout.
    IdleTimeout,
    /// 4007: no pong arrived in time: the peer is considered dead.
    PingTimeout,
    /// 4008: a backend revoked this agent or its token (`POST /v1/agents/{id}/revoke`,
    /// `POST /v1/tokens/{jti}/revoke`); connecting again is refused until it lapses.
    Revoked,
}

impl CloseCode {
    /// All codes, for documentation and exhaustive tests.
    pub const ALL: [CloseCode; 17] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::PolicyViolation,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::ServiceRestart,
        CloseCode::TryAgainLater,
        CloseCode::TokenExpired,
        CloseCode::TokenInvalid,
        CloseCode::Replaced,
        CloseCode::SlowConsumer,
        CloseCode::Disconnected,
        CloseCode::IdleTimeout,
        CloseCode::PingTimeout,
        CloseCode::Revoked,
    ];

    /// The numeric code sent in the close frame.
    pub const fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::ServiceRestart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::TokenExpired => 4001,
            CloseCode::TokenInvalid => 4002,
            CloseCode::Replaced => 4003,
            CloseCode::SlowConsumer => 4004,
            CloseCode::Disconnected => 4005,
            CloseCode::IdleTimeout => 4006,
            CloseCode::PingTimeout => 4007,
            CloseCode::Revoked => 4008,
        }
    }

    /// The code for a number received in a close frame, if it is one of ours.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The short reason text sent with the code (well under the 123-byte limit).
    pub const fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "gateway shutting down",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidPayload => "invalid utf-8 in text frame",
            CloseCode::PolicyViolation => "policy violation",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::InternalError => "internal error",
            CloseCode::ServiceRestart => "gateway draining, reconnect",
            CloseCode::TryAgainLater => "gateway overloaded, try again later",
            CloseCode::TokenExpired => "token expired",
            CloseCode::TokenInvalid => "token invalid",
            CloseCode::Replaced => "replaced by a newer connection",
            CloseCode::SlowConsumer => "slow consumer: outbound queue full",
            CloseCode::Disconnected => "disconnected by backend",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::PingTimeout => "ping timeout",
            CloseCode::Revoked => "revoked",
        }
    }

    /// Whether a client should reconnect after this close. Auth failures and explicit
    /// disconnects must not turn into reconnect loops; everything else is transient.
    pub const fn should_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::TokenInvalid
                | CloseCode::Replaced
                | CloseCode::Disconnected
                | CloseCode::Revoked
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
            assert!(code.reason().len() <= 123, "{code:?} reason too long");
        }
        assert_eq!(CloseCode::from_code(4999), None);
    }

    #[test]
    fn private_codes_are_in_the_private_range() {
        for code in CloseCode::ALL {
            let n = code.code();
            assert!((1000..=1015).contains(&n) || (4000..=4999).contains(&n));
        }
    }
}
