//! The QUIC accept loop: a connection cap, then one task per agent connection.

use std::sync::Arc;

use quinn::Endpoint;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::agent_conn::{self, Hub, Stops};

/// Accepts agents until `stops.shutdown` is cancelled or the endpoint closes. Connections beyond
/// `max_connections` are refused before their handshake (cheap for the hub, and the agent retries later).
pub(crate) async fn accept_loop(
    endpoint: &Endpoint,
    hub: &Arc<Hub>,
    max_connections: usize,
    stops: &Stops,
    tracker: &TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let incoming = tokio::select! {
            () = stops.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(
                remote = %incoming.remote_address(),
                limit = max_connections,
                "agent connection limit reached; refusing"
            );
            incoming.refuse();
            continue;
        };
        let hub = Arc::clone(hub);
        let stops = stops.clone();
        tracker.spawn(async move {
            agent_conn::serve(hub, incoming, stops).await;
            drop(permit);
        });
    }
}
