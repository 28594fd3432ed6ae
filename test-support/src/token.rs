//! Test tokens. Agents that connect through the SDK mint with `tether_agent`'s public
//! `Hs256Minter`; this module is for tests that need claims no agent would send
//! (expired, another audience, extra groups) and for crates the SDK does not serve.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// `claims` signed with HS256 under `secret`.
pub fn hs256(secret: &[u8], claims: &impl Serialize) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of serializable claims cannot fail")
}

/// Seconds since the Unix epoch (a token's `exp` and `iat`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};
    use serde_json::{Value, json};

    #[test]
    fn signs_what_the_secret_verifies() {
        let secret = b"a-test-secret-of-at-least-32-bytes!!";
        let token = hs256(secret, &json!({"sub": "a", "exp": unix_now() + 60}));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        let data = decode::<Value>(&token, &DecodingKey::from_secret(secret), &validation).unwrap();
        assert_eq!(data.claims["sub"], "a");
        assert!(
            decode::<Value>(&token, &DecodingKey::from_secret(b"another"), &validation).is_err()
        );
    }
}
