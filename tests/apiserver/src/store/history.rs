//! The change log behind watches and consistent list pages, like etcd's revisions: every write is
//! one change with its revision, the state before and after; watchers subscribe to new changes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use super::ResourceId;
use crate::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as stored in the log.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: ResourceId,
    pub(crate) key: String,
    pub(crate) kind: ChangeKind,
    /// The new state; for a deletion, the last state stamped with the deletion's revision (what a
    /// DELETED event carries).
    pub(crate) object: Arc<Value>,
    /// The state before, for undoing the change and for selector transitions.
    pub(crate) prev: Option<Arc<Value>>,
}

pub(crate) type WatchRx = mpsc::UnboundedReceiver<Arc<Change>>;

/// The retained changes since the last compaction, and the open watches.
#[derive(Debug, Default)]
pub(crate) struct History {
    changes: VecDeque<Arc<Change>>,
    /// Changes at or below this revision are forgotten: older resourceVersions get 410.
    compacted: u64,
    watchers: HashMap<u64, (ResourceId, mpsc::UnboundedSender<Arc<Change>>)>,
    next_watcher: u64,
}

impl History {
    pub(crate) fn new(start: u64) -> Self {
        History { compacted: start, ..Default::default() }
    }

    pub(crate) fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Appends a change and hands it to every watcher of its resource. Called under the store
    /// lock, so watchers see changes in revision order and none between subscribe and replay.
    pub(crate) fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.watchers.retain(|_, (res, tx)| *res != change.resource || tx.send(change.clone()).is_ok());
        self.changes.push_back(change);
    }

    /// The changes after `rv` (to one resource, when given), or 410 when they are forgotten.
    pub(crate) fn since(&self, rv: u64, resource: Option<ResourceId>) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::too_old(rv, self.compacted));
        }
        let start = self.changes.partition_point(|c| c.rv <= rv);
        Ok(self.changes.range(start..).filter(|c| resource.is_none_or(|r| c.resource == r)).cloned().collect())
    }

    /// Forgets every change up to `current`, as an etcd compaction does.
    pub(crate) fn compact(&mut self, current: u64) {
        self.changes.clear();
        self.compacted = current;
    }

    pub(crate) fn subscribe(&mut self, resource: ResourceId) -> (u64, WatchRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.insert(id, (resource, tx));
        (id, rx)
    }

    pub(crate) fn unsubscribe(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Drops every watcher's channel; their streams end abruptly.
    pub(crate) fn close_all(&mut self) {
        self.watchers.clear();
    }

    pub(crate) fn open_watches(&self) -> usize {
        self.watchers.len()
    }
}
