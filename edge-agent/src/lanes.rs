//! The agent's priority lanes (see `shared::link::lane`): one durable queue and one uplink connection per
//! route priority in use.
//!
//! Lane 0 is the queue every agent has (`queue.redb`) and is opened at start. Another lane is opened the
//! first time it is needed: a capture of that priority commits a message, or the pushed config lists it
//! (the hub delivers downlink messages of that priority on it). A lane found on disk at start is opened
//! and drained even if no route uses its priority any more, so nothing queued is stranded. Each lane's
//! uplink is started by the function [`Lanes::new`] is given, which owns the pieces a connection needs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use shared::link::lane::{self, MAX_LANE};
use shared::queue::{Queue, QueueLimits, RedbQueue};
use tokio::sync::Notify;
use tracing::info;

use crate::error::AgentError;

/// One lane: its queue and the signal that it grew.
#[derive(Debug)]
pub(crate) struct Lane {
    /// Its priority.
    pub(crate) lane: u8,
    /// Its durable queue.
    pub(crate) queue: Arc<RedbQueue>,
    /// Notified after each append, to wake the lane's uplink.
    pub(crate) appended: Arc<Notify>,
    /// Its event counters.
    pub(crate) counters: crate::metrics::LaneCounters,
}

/// Starts a lane's uplink (once per lane).
pub(crate) type Starter = Box<dyn Fn(Arc<Lane>) + Send + Sync>;

/// The lanes open in this process.
pub(crate) struct Lanes {
    data_dir: PathBuf,
    limits: QueueLimits,
    open: Mutex<[Option<Arc<Lane>>; MAX_LANE as usize + 1]>,
    /// Serialises opening, so two callers never open one file twice.
    opening: tokio::sync::Mutex<()>,
    starter: std::sync::OnceLock<Starter>,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("data_dir", &self.data_dir)
            .field(
                "open",
                &self.all().iter().map(|l| l.lane).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Lanes {
    /// Opens lane 0 and every other lane whose file is in `data_dir` (blocking: run it off the async
    /// workers). Nothing is started until [`Self::start`].
    ///
    /// # Errors
    /// [`AgentError::OpenQueue`] if a queue file cannot be opened.
    pub(crate) fn open_blocking(
        data_dir: &Path,
        limits: QueueLimits,
        metrics: Arc<crate::metrics::AgentMetrics>,
    ) -> Result<Self, AgentError> {
        let lanes = Self {
            data_dir: data_dir.to_path_buf(),
            limits,
            metrics,
            open: Mutex::new(Default::default()),
            opening: tokio::sync::Mutex::new(()),
            starter: std::sync::OnceLock::new(),
        };
        let mut found = vec![0];
        if let Ok(dir) = std::fs::read_dir(data_dir) {
            for entry in dir.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "redb") {
                    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                    if let Some(l) = lane::from_file_stem(stem, QUEUE_STEM) {
                        if l > 0 {
                            found.push(l);
                        }
                    }
                }
            }
        }
        found.sort_unstable();
        for l in found {
            lanes.open_lane_blocking(l)?;
        }
        Ok(lanes)
    }

    /// The path of `lane`'s queue file.
    pub(crate) fn path(data_dir: &Path, lane: u8) -> PathBuf {
        data_dir.join(format!("{QUEUE_STEM}{}.redb", lane::file_suffix(lane)))
    }

    fn open_lane_blocking(&self, l: u8) -> Result<Arc<Lane>, AgentError> {
        // Logged: each append is made durable in a small append log beside the file, not by a redb
        // commit of its own (`shared/src/queue/log.rs` says why).
        let queue = RedbQueue::open_logged(
            Self::path(&self.data_dir, l),
            self.limits,
            shared::queue::DEFAULT_LOG_BYTES,
        )
        .map_err(AgentError::OpenQueue)?;
        let stats = queue.stats();
        info!(
            lane = l,
            path = %queue.path().display(),
            incarnation = queue.incarnation(),
            depth = stats.depth,
            acked = stats.acked,
            next_seq = stats.next_seq,
            repaired = queue.repaired_on_open(),
            "queue opened"
        );
        let opened = Arc::new(Lane {
            lane: l,
            queue: Arc::new(queue),
            appended: Arc::new(Notify::new()),
            counters: self.metrics.lane(l),
        });
        lock(&self.open)[usize::from(l)] = Some(Arc::clone(&opened));
        Ok(opened)
    }

    /// Installs the uplink starter and starts every lane open so far; lanes opened later start as they
    /// open.
    pub(crate) fn start(&self, starter: Starter) {
        let starter = self.starter.get_or_init(|| starter);
        for l in self.all() {
            starter(l);
        }
    }

    /// `lane` if it is open.
    pub(crate) fn get(&self, l: u8) -> Option<Arc<Lane>> {
        lock(&self.open).get(usize::from(l)).cloned().flatten()
    }

    /// Every open lane, highest priority first.
    pub(crate) fn all(&self) -> Vec<Arc<Lane>> {
        lock(&self.open).iter().rev().flatten().cloned().collect()
    }

    /// `lane`, opening its queue and starting its uplink if this is its first use. Lanes above
    /// [`MAX_LANE`] are the highest lane (a config never gives one: it is validated).
    ///
    /// # Errors
    /// [`AgentError::OpenQueue`] or [`AgentError::TaskPanicked`]; the caller refuses (or retries) what
    /// needed the lane.
    pub(crate) async fn ensure(self: &Arc<Self>, l: u8) -> Result<Arc<Lane>, AgentError> {
        let l = l.min(MAX_LANE);
        if let Some(found) = self.get(l) {
            return Ok(found);
        }
        let _opening = self.opening.lock().await;
        if let Some(found) = self.get(l) {
            return Ok(found);
        }
        let this = Arc::clone(self);
        let opened = tokio::task::spawn_blocking(move || this.open_lane_blocking(l))
            .await
            .map_err(|source| AgentError::TaskPanicked {
                task: "lane open",
                source,
            })??;
        if let Some(starter) = self.starter.get() {
            starter(Arc::clone(&opened));
        }
        Ok(opened)
    }
}

/// The stem of lane 0's queue file (`crate::QUEUE_FILE`); other lanes add their suffix.
const QUEUE_STEM: &str = "queue";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_found_on_disk_are_opened_and_strangers_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = QueueLimits::default();
        drop(RedbQueue::open(Lanes::path(dir.path(), 7), limits).expect("lane 7"));
        std::fs::write(dir.path().join("queue+p12.redb"), b"not a lane").expect("write");
        std::fs::write(dir.path().join("dead-letters.redb"), b"not a lane").expect("write");
        let metrics = Arc::new(crate::metrics::AgentMetrics::new());
        let lanes = Lanes::open_blocking(dir.path(), limits, metrics).expect("open");
        let open: Vec<u8> = lanes.all().iter().map(|l| l.lane).collect();
        assert_eq!(open, [7, 0], "highest first");
        assert_eq!(
            Lanes::path(dir.path(), 0),
            dir.path().join(crate::QUEUE_FILE)
        );
    }
}
