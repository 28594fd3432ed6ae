//! Leader election through a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas can run with one active.
//!
//! The algorithm is client-go's: the holder renews the Lease every `renew_every`; a
//! candidate takes it over when the holder's record has not changed for the lease's
//! duration, measured on the candidate's own clock (so clock skew between nodes does
//! not matter); every write carries the `resourceVersion` it read, so of two candidates
//! racing for an expired lease exactly one write succeeds (the other gets 409). A
//! holder that cannot renew for `duration` steps down before anyone can take over, and
//! a holder that stops cleanly clears `holderIdentity` so a follower takes over at once.
//! kube-runtime 5 has no elector of its own, hence this module.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// Where the lease lives and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the operator's own).
    pub namespace: String,
    /// This process's identity (its pod name).
    pub identity: String,
    /// How long a silent holder keeps the lease.
    pub duration: Duration,
    /// How often the holder renews (and a follower looks again).
    pub renew_every: Duration,
    /// How long the holder may go without a successful renewal before it steps down;
    /// shorter than `duration`, so it stops acting before anyone may take over. Every
    /// lease call is bounded by what is left of it (kube's client sets no read timeout:
    /// a hung call would otherwise keep a stale leader acting).
    pub renew_deadline: Duration,
}

/// What to do with the lease as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free, released or expired: take it.
    Acquire,
    /// Someone else holds it.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// Decides from the lease's spec and how long its record has stood unchanged (on our
/// clock).
pub fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Acquire,
        Some(holder) if holder == me => Decision::Renew,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(default_duration);
            if unchanged_for >= duration {
                Decision::Acquire
            } else {
                Decision::Follow {
                    holder: holder.into(),
                }
            }
        }
    }
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last record seen (holder, renew time, transitions) and when it was first seen.
    observed: Option<(String, Instant)>,
}

// === impl Elector ===

impl Elector {
    /// A candidate for the lease in `config`.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    fn spec_for_us(&self, previous: Option<&LeaseSpec>, acquiring: bool) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs().max(1) as i32),
            acquire_time: if acquiring {
                Some(now.clone())
            } else {
                previous.and_then(|s| s.acquire_time.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if acquiring && previous.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..Default::default()
        }
    }

    /// Reads the lease and acquires or renews it if it may. Returns whether this process
    /// holds it afterwards; losing a race is `Ok(false)`.
    pub async fn step(&mut self) -> Result<bool, kube::Error> {
        let name = self.config.name.clone();
        let Some(lease) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec_for_us(None, true)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone();
        let record = spec
            .as_ref()
            .map(|s| {
                format!(
                    "{:?}/{:?}/{:?}",
                    s.holder_identity, s.renew_time, s.lease_transitions
                )
            })
            .unwrap_or_default();
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record, now));
                now
            }
        };
        let decision = decide(
            spec.as_ref(),
            &self.config.identity,
            now - since,
            self.config.duration,
        );
        let acquiring = match decision {
            Decision::Follow { .. } => return Ok(false),
            Decision::Acquire => true,
            Decision::Renew => false,
        };
        let mut updated = lease.clone();
        updated.spec = Some(self.spec_for_us(spec.as_ref(), acquiring));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                if acquiring {
                    info!(identity = %self.config.identity, lease = %self.config.name, "acquired the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up if held, so a follower need not wait for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Campaigns until `stop` turns true, publishing leadership on `leader`. On stop the
    /// lease is released if held.
    pub async fn run(mut self, leader: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_renewal: Option<Instant> = None;
        let deadline = self.config.renew_deadline.min(self.config.duration);
        loop {
            // A leader's call may take what is left until its renew deadline; a
            // follower's, the whole deadline.
            let bound = last_renewal.map_or(deadline, |t| deadline.saturating_sub(t.elapsed()));
            let outcome = match tokio::time::timeout(bound, self.step()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(kube::Error::Service(
                    format!("lease call took longer than {bound:?}").into(),
                )),
            };
            match outcome {
                Ok(true) => {
                    last_renewal = Some(Instant::now());
                    leader.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(false) => {
                    last_renewal = None;
                    leader.send_if_modified(|l| std::mem::replace(l, false));
                }
                Err(err) => {
                    warn!(%err, "lease request failed");
                    // Step down before the lease can expire for the others: from then
                    // on a follower may hold it, and two leaders must never overlap.
                    if last_renewal.is_none_or(|t| t.elapsed() >= deadline) {
                        last_renewal = None;
                        leader.send_if_modified(|l| std::mem::replace(l, false));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.renew_every) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            match tokio::time::timeout(deadline, self.release()).await {
                Ok(Ok(())) => {
                    info!(identity = %self.config.identity, "released the leader lease")
                }
                Ok(Err(err)) => warn!(%err, "could not release the leader lease"),
                Err(_) => warn!("releasing the leader lease timed out; it will expire"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn free_or_missing_leases_are_taken() {
        assert_eq!(decide(None, "a", Duration::ZERO, D), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", Duration::ZERO, D),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held_by("", 15)), "a", Duration::ZERO, D),
            Decision::Acquire
        );
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(
            decide(Some(&held_by("a", 15)), "a", Duration::from_secs(99), D),
            Decision::Renew
        );
    }

    #[test]
    fn another_holder_is_followed_until_its_record_goes_stale() {
        let spec = held_by("b", 10);
        assert_eq!(
            decide(Some(&spec), "a", Duration::from_secs(9), D),
            Decision::Follow { holder: "b".into() }
        );
        // The lease's own duration counts, not ours.
        assert_eq!(
            decide(Some(&spec), "a", Duration::from_secs(10), D),
            Decision::Acquire
        );
    }
}
