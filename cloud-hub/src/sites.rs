//! The configured sites, changed live by a config reload (`crate::reload`).
//!
//! A site added to the config file (by hand, or by `cloud-hub site add`) is admitted from the next
//! connection; a removed one is refused from then on and its live links drain and close with
//! `Unauthorized`. A site whose namespace changed keeps the old one until a restart, because messages it
//! already published were deduplicated and routed under it; the reload says so.
//!
//! Dedup state is per site and outlives its configuration: what was restored at start for a site not in
//! the config, and the state of a site removed while running, is kept here, so adding the site back resumes
//! its agent where it was instead of taking its queue again as new messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use shared::config::HubConfig;
use shared::policy::dedup::Dedup;
use shared::topic::Namespace;
use tracing::info;

use crate::agent_conn::{owned_by, Site};
use crate::metrics::HubMetrics;
use crate::store::{DedupStore, PendingRefusals, SiteRow, FLUSH_EVERY};
use crate::HubError;

/// Dedup state and pending refusals of a site that is not configured (now).
#[derive(Debug, Default)]
struct Spare {
    dedup: HashMap<String, Dedup>,
    /// Per origin, as the store keeps them.
    refusals: HashMap<String, PendingRefusals>,
}

/// The live set of sites.
#[derive(Debug)]
pub(crate) struct Sites {
    map: RwLock<HashMap<String, Arc<Site>>>,
    spare: Mutex<Spare>,
    /// Sites removed while their last changes were not yet written; the next flush takes them.
    retired: Mutex<Vec<Arc<Site>>>,
    /// `dedup.window` for a site without stored state.
    window: u32,
    metrics: Arc<HubMetrics>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SiteChanges {
    /// Admitted from now on.
    pub(crate) added: Vec<String>,
    /// Refused from now on; their live links were told to close.
    pub(crate) removed: Vec<String>,
    /// Namespace changed: kept as it was until a restart.
    pub(crate) restart: Vec<String>,
}

impl Sites {
    /// The sites of `cfg`, with the dedup state and refusals restored from the store.
    pub(crate) fn new(
        cfg: &HubConfig,
        restored: HashMap<String, Dedup>,
        refusals: HashMap<String, PendingRefusals>,
        metrics: Arc<HubMetrics>,
    ) -> Result<Self, HubError> {
        let sites = Self {
            map: RwLock::new(HashMap::with_capacity(cfg.sites.len())),
            spare: Mutex::new(Spare {
                dedup: restored,
                refusals,
            }),
            retired: Mutex::new(Vec::new()),
            window: cfg.dedup.window,
            metrics,
        };
        for site in &cfg.sites {
            let built = sites.build(&site.name, &site.namespace)?;
            sites.write().insert(site.name.clone(), built);
        }
        for forgotten in sites.lock_spare().dedup.keys() {
            info!(site = %forgotten, "stored dedup state of a site no longer configured is kept but unused");
        }
        Ok(sites)
    }

    /// The site named `name`, if configured.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Site>> {
        self.read().get(name).cloned()
    }

    /// The configured sites' names.
    pub(crate) fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The configured sites.
    pub(crate) fn all(&self) -> Vec<(String, Arc<Site>)> {
        self.read()
            .iter()
            .map(|(name, site)| (name.clone(), Arc::clone(site)))
            .collect()
    }

    /// Makes the set follow `cfg` (already validated): adds and removes sites, reports namespace changes.
    ///
    /// # Errors
    /// A namespace that does not compile or a dedup window refused; nothing changed then.
    pub(crate) fn apply(&self, cfg: &HubConfig) -> Result<SiteChanges, HubError> {
        let mut changes = SiteChanges::default();
        let mut built = Vec::new();
        {
            let map = self.read();
            for site in &cfg.sites {
                match map.get(&site.name) {
                    None => {
                        built.push((site.name.clone(), self.build(&site.name, &site.namespace)?))
                    }
                    Some(old) => {
                        let namespace = Namespace::from_template(&site.namespace, &site.name)
                            .map_err(|source| HubError::Namespace {
                                site: site.name.clone(),
                                source,
                            })?;
                        if namespace != old.namespace {
                            changes.restart.push(site.name.clone());
                        }
                    }
                }
            }
        }
        let mut map = self.write();
        let keep: Vec<&str> = cfg.sites.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = map
            .keys()
            .filter(|name| !keep.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(site) = map.remove(&name) {
                site.removed.cancel();
                self.retired
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arc::clone(&site));
                let mut spare = self.lock_spare();
                let dedup = site
                    .dedup
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                spare.dedup.insert(name.clone(), dedup);
                let refusals = site
                    .refusals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                spare.refusals.extend(refusals);
                changes.removed.push(name);
            }
        }
        for (name, site) in built {
            map.insert(name.clone(), site);
            changes.added.push(name);
        }
        changes.added.sort();
        changes.removed.sort();
        changes.restart.sort();
        Ok(changes)
    }

    /// A site with its kept dedup state and refusals, or fresh ones.
    fn build(&self, name: &str, namespace: &str) -> Result<Arc<Site>, HubError> {
        let compiled =
            Namespace::from_template(namespace, name).map_err(|source| HubError::Namespace {
                site: name.to_owned(),
                source,
            })?;
        let mut spare = self.lock_spare();
        let dedup = match spare.dedup.remove(name) {
            Some(dedup) => {
                if dedup.window_size() != self.window {
                    info!(
                        site = %name,
                        stored = dedup.window_size(),
                        configured = self.window,
                        "keeping the stored dedup window size for this site"
                    );
                }
                dedup
            }
            None => Dedup::new(self.window).map_err(HubError::DedupWindow)?,
        };
        let origins: Vec<String> = spare
            .refusals
            .keys()
            .filter(|origin| owned_by(name, origin))
            .cloned()
            .collect();
        let refusals = origins
            .into_iter()
            .filter_map(|origin| spare.refusals.remove_entry(&origin))
            .collect();
        Ok(Arc::new(Site::new(
            name.to_owned(),
            compiled,
            dedup,
            refusals,
            self.metrics.site(name),
        )))
    }

    /// The rows of every site (configured or just removed) whose state changed since the last call.
    fn take_rows(&self) -> Vec<SiteRow> {
        let retired =
            std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner));
        self.all()
            .into_iter()
            .map(|(_, site)| site)
            .chain(retired)
            .filter_map(|site| site.take_row())
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Site>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Site>>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_spare(&self) -> std::sync::MutexGuard<'_, Spare> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes the sites' changed dedup rows every [`FLUSH_EVERY`] until `stop`, then once more (the connections
/// have drained by then, so a graceful stop leaves nothing unwritten). Rows a failed commit did not write
/// are kept and written with the next, newer rows of the same site replacing them.
pub(crate) async fn flush_until(
    sites: Arc<Sites>,
    store: DedupStore,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unwritten: Vec<SiteRow> = Vec::new();
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let fresh = sites.take_rows();
        unwritten.retain(|old| !fresh.iter().any(|new| new.site == old.site));
        unwritten.extend(fresh);
        if !unwritten.is_empty() {
            let rows = std::mem::take(&mut unwritten);
            let store = store.clone();
            match tokio::task::spawn_blocking(move || {
                let result = store.write_rows_blocking(&rows);
                (rows, result)
            })
            .await
            {
                Ok((_, Ok(()))) => {}
                Ok((rows, Err(cause))) => {
                    tracing::error!(%cause, sites = rows.len(), "cannot write the dedup state; retrying (nothing is lost, a crash now could bring duplicates)");
                    unwritten = rows;
                }
                Err(cause) => tracing::error!(%cause, "the dedup flush task failed"),
            }
        }
        if stopping {
            return;
        }
    }
}
