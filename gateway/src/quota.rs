//! Rate quotas on the push API (`quotas.perApiKey`, `quotas.perTenant`): one token
//! bucket per API key and one for the tenant (all of its keys together), per pod.
//!
//! A call takes a token from its key's bucket, then from the tenant's; when the tenant
//! has none the key's token is given back, so a refusal never costs the caller quota it
//! did not use. The refusal says which quota and when a token comes back (the
//! `Retry-After` header, rounded up to whole seconds).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_config::{QuotaConfig, RateQuota};

use crate::rate::TokenBucket;

/// Which quota refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// The API key's own rate.
    ApiKey,
    /// The tenant's rate, all keys together.
    Tenant,
}

impl Exceeded {
    /// The metric label and config name of this quota.
    pub fn name(self) -> &'static str {
        match self {
            Exceeded::ApiKey => "perApiKey",
            Exceeded::Tenant => "perTenant",
        }
    }
}

/// A refused call: which quota, and how long until it would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The quota.
    pub quota: Exceeded,
    /// Until a token is available.
    pub retry_after: Duration,
}

impl Refusal {
    /// The `Retry-After` value: whole seconds, at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// The buckets of one pod.
#[derive(Debug)]
pub struct Quotas {
    per_key: Option<RateQuota>,
    keys: Mutex<HashMap<[u8; 32], TokenBucket>>,
    tenant: Option<Mutex<TokenBucket>>,
}

impl Quotas {
    /// Buckets for `config`, full.
    pub fn new(config: &QuotaConfig, now: Instant) -> Self {
        Self {
            per_key: config.per_api_key,
            keys: Mutex::default(),
            tenant: config
                .per_tenant
                .map(|q| Mutex::new(TokenBucket::new(q.per_second, q.burst, now))),
        }
    }

    /// Takes one call's tokens for the key whose hash is `key`, or says which quota
    /// refuses it. Only verified keys reach here, so the map holds at most the keys in
    /// `auth.apiKeysFile` (and rotated-out ones until the process restarts).
    pub fn take(&self, key: [u8; 32], now: Instant) -> Result<(), Refusal> {
        let mut keys = self.keys.lock();
        let key_bucket = match self.per_key {
            Some(q) => {
                let bucket = keys
                    .entry(key)
                    .or_insert_with(|| TokenBucket::new(q.per_second, q.burst, now));
                if !bucket.try_take(now) {
                    return Err(Refusal {
                        quota: Exceeded::ApiKey,
                        retry_after: bucket.wait(now),
                    });
                }
                Some(bucket)
            }
            None => None,
        };
        if let Some(tenant) = &self.tenant {
            let mut tenant = tenant.lock();
            if !tenant.try_take(now) {
                if let Some(bucket) = key_bucket {
                    bucket.refund();
                }
                return Err(Refusal {
                    quota: Exceeded::Tenant,
                    retry_after: tenant.wait(now),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(per_key: Option<(u32, u32)>, tenant: Option<(u32, u32)>, now: Instant) -> Quotas {
        let q = |(per_second, burst)| RateQuota { per_second, burst };
        Quotas::new(
            &QuotaConfig {
                per_api_key: per_key.map(q),
                per_tenant: tenant.map(q),
                max_connections: None,
            },
            now,
        )
    }

    #[test]
    fn one_key_over_its_quota_leaves_the_others_alone() {
        let t0 = Instant::now();
        let q = quotas(Some((1, 2)), None, t0);
        assert!(q.take([1; 32], t0).is_ok() && q.take([1; 32], t0).is_ok());
        let refused = q.take([1; 32], t0).unwrap_err();
        assert_eq!(refused.quota, Exceeded::ApiKey);
        assert_eq!(refused.retry_after_seconds(), 1);
        assert!(
            q.take([2; 32], t0).is_ok(),
            "another key has its own bucket"
        );
        assert!(q.take([1; 32], t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_tenant_quota_spans_keys_and_refunds_the_key() {
        let t0 = Instant::now();
        let q = quotas(Some((10, 10)), Some((1, 3)), t0);
        for key in 1..=3u8 {
            assert!(q.take([key; 32], t0).is_ok());
        }
        let refused = q.take([4; 32], t0).unwrap_err();
        assert_eq!(refused.quota, Exceeded::Tenant);
        // Key 1 spent one of its 10 on the call that passed, none on refusals.
        for _ in 0..5 {
            let _ = q.take([1; 32], t0);
        }
        let later = t0 + Duration::from_secs(100);
        let passed = (0..20).filter(|_| q.take([1; 32], later).is_ok()).count();
        assert_eq!(passed, 3, "the tenant's burst caps even a fresh key");
    }

    #[test]
    fn no_quota_means_no_limit() {
        let t0 = Instant::now();
        let q = quotas(None, None, t0);
        assert!((0..10_000).all(|_| q.take([0; 32], t0).is_ok()));
    }
}
