//! Wakes the agent when a directory's files change: the endpoints directory,
//! where the CNI plugin writes a pod's description once its interface
//! exists. With inotify the pod is enforced as its file lands, not at the
//! next poll; a slow backstop tick covers what no event announces (an
//! interface that appeared after its file, an attach to retry). Without
//! inotify (or once its watch is gone) the directory is polled.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

pub struct DirEvents {
    events: Option<mpsc::Receiver<()>>,
    tick: Interval,
    poll: Duration,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for DirEvents {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn interval(every: Duration) -> Interval {
    let mut i = tokio::time::interval(every);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

impl DirEvents {
    /// Watches `dir` (nothing to watch: ticks every `backstop`).
    pub fn watch(dir: Option<&Path>, backstop: Duration, poll: Duration) -> Self {
        let Some(dir) = dir else {
            return Self { events: None, tick: interval(backstop), poll, task: None };
        };
        let setup = || -> std::io::Result<inotify::EventStream<[u8; 4096]>> {
            let ino = Inotify::init()?;
            // Whole files only: written and closed, or renamed into place.
            ino.watches().add(
                dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )?;
            ino.into_event_stream([0u8; 4096])
        };
        match setup() {
            Ok(mut stream) => {
                let (tx, rx) = mpsc::channel(1);
                let dir_name = dir.display().to_string();
                let task = tokio::spawn(async move {
                    while let Some(event) = stream.next().await {
                        match event {
                            Ok(e) if e.mask.intersects(inotify::EventMask::DELETE_SELF | inotify::EventMask::MOVE_SELF) => {
                                tracing::warn!(dir = %dir_name, "watched directory removed; polling it instead");
                                break;
                            }
                            // A full queue (IN_Q_OVERFLOW) also wakes: the agent re-reads everything.
                            Ok(_) => {
                                let _ = tx.try_send(());
                            }
                            Err(error) => {
                                tracing::warn!(dir = %dir_name, %error, "cannot read inotify events; polling instead");
                                break;
                            }
                        }
                    }
                });
                Self { events: Some(rx), tick: interval(backstop), poll, task: Some(task) }
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch the directory; polling it");
                Self { events: None, tick: interval(poll), poll, task: None }
            }
        }
    }

    /// Resolves when the directory may have changed.
    pub async fn changed(&mut self) {
        let Some(rx) = self.events.as_mut() else {
            self.tick.tick().await;
            return;
        };
        tokio::select! {
            got = rx.recv() => match got {
                Some(()) => while rx.try_recv().is_ok() {},
                // The watch ended: poll from now on.
                None => {
                    self.events = None;
                    self.tick = interval(self.poll);
                }
            },
            _ = self.tick.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_written_into_the_directory_wakes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ev = DirEvents::watch(Some(dir.path()), Duration::from_secs(3600), Duration::from_secs(3600));
        ev.changed().await; // an interval's first tick is immediate
        let path = dir.path().join("pod.yaml");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(path, "x").unwrap();
        });
        tokio::time::timeout(Duration::from_secs(5), ev.changed()).await.expect("no wake-up for a new file");
        writer.await.unwrap();
        // A rename into place wakes too.
        std::fs::write(dir.path().join(".tmp"), "y").unwrap();
        ev.changed().await;
        std::fs::rename(dir.path().join(".tmp"), dir.path().join("other.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), ev.changed()).await.expect("no wake-up for a rename");
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_watched_is_polled() {
        let mut ev = DirEvents::watch(Some(Path::new("/nonexistent/meshguard")), Duration::from_secs(3600), Duration::from_millis(10));
        ev.changed().await;
        tokio::time::timeout(Duration::from_secs(5), ev.changed()).await.expect("polls");
    }
}
