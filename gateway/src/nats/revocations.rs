//! Revocations on the bus: stored in a KV bucket (`tether-<ns>-revoked`, one key per
//! revoked agent or token) so that pods started later, and restarted ones, know them;
//! announced on `<root>.revoke` so that every running pod applies them at once.
//!
//! Pods read the whole bucket at start and again every [`RESYNC`] — a revocation
//! announced while a pod was cut off from NATS reaches it then. Like the directory's
//! sweep, the bucket is read with direct gets, without a consumer or a KV watch (which
//! NATS 2.9 does not answer the way `async-nats` expects). Lapsed entries are deleted
//! by whichever pod reads them, only if unchanged since (a revocation renewed
//! meanwhile stays).

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tracing::{debug, warn};

use super::directory::{DirectoryError, open_bucket};
use super::subjects::Subjects;
use crate::hub::{Hub, unix_now};
use crate::revocation::Revocation;

/// How often a pod re-reads the whole bucket.
pub const RESYNC: Duration = Duration::from_secs(30);

/// The pool's revocation bucket and announcement subject.
#[derive(Debug, Clone)]
pub struct RevocationBus {
    client: Client,
    store: kv::Store,
    subject: String,
}

fn err(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError(format!("revocations: {e}"))
}

impl RevocationBus {
    /// Opens (creating if needed) the bucket, applies what it holds to `hub`, and
    /// starts following announcements and resyncing. `replicas`: copies of the bucket
    /// (the NATS cluster's size, as for the directory's buckets).
    pub async fn start(
        client: Client,
        js: &jetstream::Context,
        subjects: &Subjects,
        hub: Arc<Hub>,
        replicas: usize,
    ) -> Result<Self, DirectoryError> {
        let store = open_bucket(
            js,
            &subjects.revocations_bucket(),
            "tether: revoked agents and tokens",
            replicas,
        )
        .await?;
        let bus = Self {
            client: client.clone(),
            store,
            subject: subjects.revocations(),
        };
        // Subscribed before the first read: a revocation stored between the read and
        // the subscription would otherwise wait for the next resync.
        let mut announcements = client.subscribe(bus.subject.clone()).await.map_err(err)?;
        bus.load(&hub).await?;
        let listener_hub = hub.clone();
        tokio::spawn(async move {
            while let Some(message) = announcements.next().await {
                match serde_json::from_slice::<Revocation>(&message.payload) {
                    Ok(revocation) => {
                        let closed = listener_hub.revoke(&revocation);
                        debug!(?revocation.revoked, closed, "revocation announced");
                    }
                    Err(e) => warn!(%e, "ignoring a malformed revocation announcement"),
                }
            }
        });
        let resync = bus.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = resync.load(&hub).await {
                    debug!(%e, "revocation resync failed; retrying at the next one");
                }
                hub.revocations.prune(unix_now());
            }
        });
        Ok(bus)
    }

    /// Stores `revocation` (a longer one already stored is kept) and announces it.
    pub async fn publish(&self, revocation: &Revocation) -> Result<(), DirectoryError> {
        let key = Subjects::revocation_key(&revocation.revoked);
        // Never shorten: the stored entry may be a longer revocation of the same name.
        // Compare-and-set so two pods revoking at once both end at the later `until`.
        loop {
            let current = self.store.entry(&key).await.map_err(err)?;
            let (revision, stored_until) = match &current {
                Some(e) if e.operation == kv::Operation::Put => (
                    e.revision,
                    serde_json::from_slice::<Revocation>(&e.value)
                        .map(|r| r.until)
                        .unwrap_or(0),
                ),
                Some(e) => (e.revision, 0),
                None => (0, 0),
            };
            if stored_until >= revocation.until {
                break;
            }
            let value = serde_json::to_vec(revocation).map_err(err)?;
            match self.store.update(&key, value.into(), revision).await {
                Ok(_) => break,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(err(e)),
            }
        }
        let payload = serde_json::to_vec(revocation).map_err(err)?;
        self.client
            .publish(self.subject.clone(), payload.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Applies every revocation in the bucket to `hub`; deletes lapsed ones.
    async fn load(&self, hub: &Hub) -> Result<usize, DirectoryError> {
        let filter = format!("{}>", self.store.prefix);
        let now = unix_now();
        let mut applied = 0;
        let mut sequence = 1;
        loop {
            let message = match self
                .store
                .stream
                .direct_get_next_for_subject(filter.as_str(), Some(sequence))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(err(e)),
            };
            sequence = message.sequence + 1;
            // Delete markers carry no value and fail to parse.
            let Ok(revocation) = serde_json::from_slice::<Revocation>(&message.payload) else {
                continue;
            };
            if revocation.until <= now {
                let key = Subjects::revocation_key(&revocation.revoked);
                let _ = self
                    .store
                    .delete_expect_revision(key, Some(message.sequence))
                    .await;
                continue;
            }
            hub.revoke(&revocation);
            applied += 1;
        }
        Ok(applied)
    }
}
