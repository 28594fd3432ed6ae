//! The pool's connection count, for `quotas.maxConnections`: every pod announces its
//! count on `<root>.census` every [`INTERVAL`] and sums what the others announced.
//!
//! The sum is at most one interval old, so a burst of connections spread over several
//! pods within one interval can pass the cap by what they admitted in that interval;
//! a pod silent for [`STALE`] (gone, or cut off) no longer counts. The sum is a pure
//! function of the announcements ([`elsewhere`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::hub::Hub;

/// How often each pod announces its count.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Announcements older than this no longer count.
pub const STALE: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    pod: String,
    connections: u64,
}

/// The other pods' last announcements: pod → (count, when heard).
#[derive(Debug, Default)]
pub struct Census {
    heard: Mutex<HashMap<String, (u64, Instant)>>,
}

/// The connections of the pods other than `me` whose announcement is fresh at `now`.
pub fn elsewhere(heard: &HashMap<String, (u64, Instant)>, me: &str, now: Instant) -> u64 {
    heard
        .iter()
        .filter(|(pod, (_, at))| pod.as_str() != me && now.saturating_duration_since(*at) <= STALE)
        .map(|(_, (count, _))| count)
        .sum()
}

impl Census {
    /// Announces this pod's count and listens to the others', until the client closes.
    pub async fn start(
        client: Client,
        subject: String,
        hub: Arc<Hub>,
        me: String,
    ) -> Result<Arc<Self>, String> {
        let census = Arc::new(Self::default());
        let mut heard = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| e.to_string())?;
        let listener = census.clone();
        let own = me.clone();
        tokio::spawn(async move {
            while let Some(message) = heard.next().await {
                if let Ok(a) = serde_json::from_slice::<Announcement>(&message.payload)
                    && a.pod != own
                {
                    listener
                        .heard
                        .lock()
                        .insert(a.pod, (a.connections, Instant::now()));
                }
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tick.tick().await;
                let announcement = Announcement {
                    pod: me.clone(),
                    connections: hub.len() as u64,
                };
                let payload = serde_json::to_vec(&announcement).expect("serialises");
                if let Err(e) = client.publish(subject.clone(), payload.into()).await {
                    debug!(%e, "census announcement not sent");
                }
            }
        });
        Ok(census)
    }

    /// The other pods' connections, as last announced.
    pub fn elsewhere(&self, me: &str) -> u64 {
        let now = Instant::now();
        let mut heard = self.heard.lock();
        heard.retain(|_, (_, at)| now.saturating_duration_since(*at) <= STALE * 10);
        elsewhere(&heard, me, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fresh_announcements_of_other_pods_count() {
        let now = Instant::now();
        let mut heard = HashMap::new();
        heard.insert("gw-0".to_string(), (5, now));
        heard.insert("gw-1".to_string(), (7, now - Duration::from_secs(1)));
        heard.insert(
            "gw-2".to_string(),
            (100, now - STALE - Duration::from_millis(1)),
        );
        assert_eq!(elsewhere(&heard, "gw-9", now), 12);
        assert_eq!(
            elsewhere(&heard, "gw-0", now),
            7,
            "a pod never counts itself twice"
        );
    }
}
