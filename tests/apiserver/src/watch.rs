//! Watch streams: newline-delimited JSON events over a chunked response, replayed from the
//! history and then live, with selector transitions, bookmarks, `timeoutSeconds`, and the
//! 410 `Expired` ERROR event for a forgotten resourceVersion, as the watch cache sends them.

use std::sync::Arc;
use std::time::Duration;

use hyper::Response;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::http::{self, Body, WatchCut};
use crate::meta::{self, View};
use crate::resource::Resource;
use crate::selector::Filter;
use crate::server::Shared;
use crate::store::{Change, ChangeKind, ResourceId, WatchRx};

/// Lines buffered towards a slow client before the watch waits for it.
const BUFFERED_LINES: usize = 64;

/// The annotation on the bookmark that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// No resourceVersion, or `0`: ADDED for every object that matches now, then changes.
    Current,
    /// `sendInitialEvents=true`: the same, then a bookmark marking the end of the initial events.
    InitialEvents,
    /// Every change after this revision, from the history (410 when it is forgotten).
    After(u64),
}

#[derive(Debug)]
pub(crate) struct WatchParams {
    pub(crate) resource: ResourceId,
    pub(crate) filter: Filter,
    pub(crate) start: Start,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) view: View,
}

/// Opens a watch: the initial events are taken and the live subscription made under one store
/// lock, so no change falls between them.
pub(crate) fn serve(shared: &Arc<Shared>, p: WatchParams) -> Response<Body> {
    let (tx, rx) = mpsc::channel(BUFFERED_LINES);
    let setup = {
        let mut store = shared.lock();
        let res = store.resource(p.resource).clone();
        let revision = store.revision();
        let initial = match p.start {
            Start::Current | Start::InitialEvents => Ok(store
                .objects(p.resource)
                .values()
                .filter(|o| p.filter.matches(o))
                .map(|o| line("ADDED", &p.view.show(o)))
                .collect::<Vec<_>>()),
            Start::After(rv) => {
                store.history.since(rv, Some(p.resource)).map(|cs| cs.iter().filter_map(|c| event_for(c, &p.filter, p.view)).collect())
            }
        };
        initial.map(|lines| {
            let (id, live) = store.history.subscribe(p.resource);
            let after = match p.start {
                Start::After(rv) => rv.max(revision),
                _ => revision,
            };
            (res, lines, id, live, after)
        })
    };
    match setup {
        Err(expired) => {
            // The real server answers 200 and reports the 410 as the stream's only event.
            let _ = tx.try_send(Ok(line("ERROR", &expired.status())));
        }
        Ok((res, mut lines, id, live, after)) => {
            if p.start == Start::InitialEvents {
                lines.push(bookmark(&res, after, true));
            }
            let watch = Watch {
                shared: shared.clone(),
                subscription: id,
                res,
                filter: p.filter,
                view: p.view,
                bookmarks: p.bookmarks,
                deadline: p.timeout.map(|t| Instant::now() + t),
                seen: after,
            };
            tokio::spawn(watch.run(tx, lines, live));
        }
    }
    http::stream(rx)
}

/// One open watch; dropping it ends the subscription.
struct Watch {
    shared: Arc<Shared>,
    subscription: u64,
    res: Arc<Resource>,
    filter: Filter,
    view: View,
    bookmarks: bool,
    deadline: Option<Instant>,
    /// The revision everything up to which this watcher has been sent (what a bookmark promises).
    seen: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.lock().history.unsubscribe(self.subscription);
    }
}

impl Watch {
    async fn run(mut self, tx: mpsc::Sender<Result<Bytes, WatchCut>>, initial: Vec<Bytes>, mut live: WatchRx) {
        for l in initial {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        let mut next_bookmark = Instant::now() + self.shared.bookmark_interval();
        loop {
            let out = tokio::select! {
                change = live.recv() => match change {
                    Some(c) => self.take(&c),
                    None => {
                        // close_watches() or a stop: cut the stream mid-flight.
                        let _ = tx.send(Err(WatchCut)).await;
                        return;
                    }
                },
                _ = sleep_until(next_bookmark), if self.bookmarks => {
                    next_bookmark = Instant::now() + self.shared.bookmark_interval();
                    let revision = self.shared.lock().revision();
                    // Every change up to `revision` is already queued (the store hands changes
                    // out under its lock): send those first so the bookmark promises no more
                    // than was delivered.
                    while let Ok(c) = live.try_recv() {
                        if let Some(l) = self.take(&c)
                            && tx.send(Ok(l)).await.is_err()
                        {
                            return;
                        }
                    }
                    self.seen = self.seen.max(revision);
                    Some(bookmark(&self.res, self.seen, false))
                },
                _ = until(self.deadline) => return, // timeoutSeconds: a clean end
                _ = tx.closed() => return,
            };
            if let Some(l) = out
                && tx.send(Ok(l)).await.is_err()
            {
                return;
            }
        }
    }

    fn take(&mut self, c: &Change) -> Option<Bytes> {
        if c.rv <= self.seen {
            // Asked to start at a revision the store had not reached yet.
            return None;
        }
        self.seen = c.rv;
        event_for(c, &self.filter, self.view)
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The event one watcher gets for a change, as the watch cache decides it: an update that makes
/// an object match is ADDED, one that makes it stop matching is DELETED (with the previous
/// content at the new resourceVersion).
pub(crate) fn event_for(c: &Change, filter: &Filter, view: View) -> Option<Bytes> {
    let was = c.prev.as_deref().is_some_and(|p| filter.matches(p));
    match c.kind {
        ChangeKind::Deleted => was.then(|| line("DELETED", &view.show(&c.object))),
        ChangeKind::Added | ChangeKind::Modified => match (was, filter.matches(&c.object)) {
            (true, true) => Some(line("MODIFIED", &view.show(&c.object))),
            (false, true) => Some(line("ADDED", &view.show(&c.object))),
            (true, false) => {
                let mut gone = c.prev.as_deref().cloned().unwrap_or(Value::Null);
                meta::set_meta(&mut gone, "resourceVersion", json!(c.rv.to_string()));
                Some(line("DELETED", &view.show(&gone)))
            }
            (false, false) => None,
        },
    }
}

fn bookmark(res: &Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut obj = json!({ "kind": res.kind, "apiVersion": res.api_version(), "metadata": { "resourceVersion": rv.to_string() } });
    if initial_end {
        obj["metadata"]["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
    }
    line("BOOKMARK", &obj)
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut out = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    // Serializing a Value cannot fail.
    let _ = serde_json::to_writer(&mut out, object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}
