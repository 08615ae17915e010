//! The agent's status topic (`shared/src/status.rs`): a retained JSON message on the local broker at
//! `$meshbridge/status` saying whether each priority lane's uplink is connected, how much waits in its disk
//! queue and which config runs, so a line's own tools (HMI, Node-RED) see the link without Prometheus.
//!
//! Published on a change (a lane connects or drops, the config version moves) and every
//! `status.interval`; queue depths and ages are reported but do not count as changes, or a busy line would
//! publish every second. It goes out on a connection of its own to where downlink messages go (the
//! embedded broker's internal port, behind the front; or the site's broker), so it is never captured for
//! the uplink; a `$` topic is not matched by `#` either.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shared::envelope::{Envelope, Properties, QoS};
use shared::queue::Queue;
use shared::status::{self, AgentStatus, LaneStatus, Publication};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::lanes::Lanes;
use crate::local::deliver::{Deliverer, Target};
use crate::pushed::Pushed;

/// How often the state is looked at (a change is published within this).
const CHECK: Duration = Duration::from_secs(1);

/// Who the agent is, for its status.
pub(crate) struct Identity {
    pub(crate) site: String,
    pub(crate) agent_name: String,
    pub(crate) hub: String,
}

fn snapshot(identity: &Identity, lanes: &Lanes, pushed: &Pushed) -> AgentStatus {
    let now = crate::ingest::now_ms();
    let mut all: Vec<LaneStatus> = lanes
        .all()
        .iter()
        .map(|l| {
            let stats = l.queue.stats();
            LaneStatus {
                lane: l.lane,
                connected: l.counters.connected.get() > 0,
                queued: stats.depth,
                queued_bytes: stats.bytes,
                oldest_age_s: stats.oldest_age(now).map_or(0, |a| a.as_secs()),
            }
        })
        .collect();
    all.sort_by_key(|l| l.lane);
    AgentStatus {
        site: identity.site.clone(),
        agent_name: identity.agent_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hub: identity.hub.clone(),
        connected: !all.is_empty() && all.iter().all(|l| l.connected),
        config_version: pushed.version(),
        lanes: all,
        at_ms: now,
    }
}

/// The status connection's client id, beside the delivery connection's.
fn client_id(target: &Target) -> String {
    match target.client_id.strip_suffix("-downlink") {
        Some(base) => format!("{base}-status"),
        None => format!("{}-status", target.client_id),
    }
}

/// Publishes the agent's status until `stop`.
pub(crate) async fn run(
    identity: Identity,
    lanes: Arc<Lanes>,
    pushed: Arc<Pushed>,
    mut target: watch::Receiver<Option<Target>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut publication = Publication::new(interval);
    let mut deliverer: Option<Deliverer> = None;
    let mut tick = tokio::time::interval(CHECK.min(interval));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let status = snapshot(&identity, &lanes, &pushed);
        let now = started.elapsed();
        if !publication.due(&status, now) {
            continue;
        }
        if deliverer.is_none() {
            let Some(t) = target.borrow_and_update().clone() else {
                continue;
            };
            deliverer = Some(Deliverer::new(
                &client_id(&t),
                &t.host,
                t.port,
                t.credentials,
                t.transport,
            ));
        }
        let Some(d) = deliverer.as_mut() else {
            continue;
        };
        let envelope = Envelope {
            origin: identity.site.clone(),
            seq: 0,
            topic: status::STATUS_TOPIC.to_owned(),
            payload: Bytes::from(status::payload(&status)),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                content_type: Some("application/json".to_owned()),
                ..Properties::default()
            },
            trace: None,
            enqueued_at_ms: status.at_ms,
        };
        let batch = [envelope];
        let sent = tokio::select! {
            () = stop.cancelled() => break,
            sent = d.deliver(&batch, status.at_ms) => sent,
        };
        match sent {
            Ok(_) => {
                debug!(connected = status.connected, "status published");
                publication.published(&status, now);
            }
            Err(cause) => {
                debug!(%cause, "status not published; tried again later");
                if let Some(d) = deliverer.take() {
                    d.close().await;
                }
            }
        }
    }
    if let Some(d) = deliverer {
        d.close().await;
    }
}
