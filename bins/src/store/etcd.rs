//! The etcd store: entries live in an etcd cluster (the v3 API, through the
//! `etcd-client` crate), one key per name holding the operator-signed entry as
//! JSON, so any number of registry daemons serve from one cluster.
//!
//! - **Writes** read the stored entry (a linearizable read), decide with the core's
//!   [`admit`] against it, and store it with a transaction that holds only if the
//!   key has not changed since (another registry may write at the same time; then
//!   the write is decided again). Without a quorum the write is refused with the reason.
//! - **Reads** are the node's in-memory copy, kept in step by a watch on the key
//!   prefix (changes arrive within milliseconds). Every entry etcd hands back goes
//!   through the core's verification as a put, so etcd is never trusted to say what runs.
//! - **Cut off from the quorum** (a minority partition, or most members down), the
//!   copy keeps answering, and [`Store::stale`] says so; a registry started in that
//!   state loads with a serializable read from whichever member it reaches.

use super::{NodeFeed, Store};
use anyhow::{anyhow, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use physarum_core::registry::{admit, check};
use physarum_core::trust::{Operators, SignedEntry};
use physarum_core::wire::Response;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every entry's key is this prefix and the service name.
pub const KEY_PREFIX: &str = "/physarum/registry/entries/";
/// Each etcd request; a member without a leader answers at once (require-leader).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// A write is given up on after this long (the registry client waits 2 s per answer).
const WRITE_DEADLINE: Duration = Duration::from_millis(1800);
/// How often the store checks that it reaches a quorum.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a start-up waits for etcd to answer at all.
const START_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    operators: Operators,
    endpoints: Vec<String>,
    /// Set while the last quorum check failed.
    stale: Arc<AtomicBool>,
}

fn key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// A stored value as an entry the registry may hold, if it is one.
fn decode(value: &[u8], operators: &Operators) -> Result<SignedEntry, String> {
    let entry: SignedEntry = serde_json::from_slice(value).map_err(|e| format!("not an entry: {e}"))?;
    check(operators, &entry)?;
    Ok(entry)
}

async fn bounded<T>(what: &str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

impl EtcdStore {
    /// A client for the cluster at `endpoints` (`HOST:PORT`); connections are made lazily.
    pub async fn connect(endpoints: &[String], operators: Operators) -> Result<EtcdStore> {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(&urls, Some(options))
            .await
            .map_err(|e| anyhow!("cannot set up the etcd client for {}: {e}", endpoints.join(",")))?;
        Ok(EtcdStore { client, operators, endpoints: endpoints.to_vec(), stale: Arc::new(AtomicBool::new(false)) })
    }

    /// Every entry etcd holds that verifies, and the revision read at: from the
    /// quorum if it answers, else (marked stale) from any member that does.
    async fn read_all(&self) -> Result<(Vec<SignedEntry>, i64), String> {
        let mut kv = self.client.kv_client();
        let linearizable = bounded("read", kv.get(KEY_PREFIX, Some(GetOptions::new().with_prefix()))).await;
        let response = match linearizable {
            Ok(r) => {
                self.stale.store(false, Ordering::Relaxed);
                r
            }
            Err(quorum_error) => {
                let options = GetOptions::new().with_prefix().with_serializable();
                let r = bounded("serializable read", kv.get(KEY_PREFIX, Some(options)))
                    .await
                    .map_err(|e| format!("{quorum_error}; {e}"))?;
                if !self.stale.swap(true, Ordering::Relaxed) {
                    tracing::warn!("etcd has no quorum reachable from here ({quorum_error}): serving a member's copy");
                }
                r
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        let mut entries = Vec::new();
        for kv in response.kvs() {
            match decode(kv.value(), &self.operators) {
                Ok(e) => entries.push(e),
                Err(e) => tracing::warn!("etcd key {:?} skipped: {e}", String::from_utf8_lossy(kv.key())),
            }
        }
        Ok((entries, revision))
    }

    /// The entries at start, waiting a while for etcd to come up.
    pub async fn load(&self) -> Result<(Vec<SignedEntry>, i64)> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.read_all().await {
                Ok(loaded) => return Ok(loaded),
                Err(e) if Instant::now() >= deadline => {
                    return Err(anyhow!(
                        "cannot read the registry from etcd at {} within {START_DEADLINE:?}: {e}",
                        self.endpoints.join(",")
                    ))
                }
                Err(e) => tracing::info!("waiting for etcd: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Keep the node's copy in step with etcd from `revision` on, and watch the
    /// quorum: runs until the node goes away.
    pub fn follow(&self, node: NodeFeed, revision: i64) {
        let store = self.clone();
        tokio::spawn(async move { store.sync(node, revision).await });
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let mut kv = store.client.kv_client();
                let options = GetOptions::new().with_prefix().with_count_only();
                let reached = bounded("quorum check", kv.get(KEY_PREFIX, Some(options))).await;
                let was = store.stale.swap(reached.is_err(), Ordering::Relaxed);
                match (&reached, was) {
                    (Err(e), false) => tracing::warn!("etcd quorum lost ({e}): reads may be stale, writes are refused"),
                    (Ok(_), true) => tracing::info!("etcd quorum reached again"),
                    _ => {}
                }
                tokio::time::sleep(HEALTH_INTERVAL).await;
            }
        });
    }

    /// Watch the prefix; when the watch breaks, read everything again and watch on.
    async fn sync(&self, node: NodeFeed, mut revision: i64) {
        loop {
            match self.watch(&node, &mut revision).await {
                Ok(()) => return, // the node is gone
                Err(e) => tracing::warn!("etcd watch ended ({e}); reading the registry again"),
            }
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match self.read_all().await {
                    Ok((entries, at)) => {
                        for entry in entries {
                            if node.put(entry).await.is_none() {
                                return; // the node is gone
                            }
                        }
                        revision = at;
                        break;
                    }
                    Err(e) => tracing::debug!("etcd unreachable: {e}"),
                }
            }
        }
    }

    /// Feed every change after `revision` to the node. `Ok` when the node is gone.
    async fn watch(&self, node: &NodeFeed, revision: &mut i64) -> Result<(), String> {
        let options = WatchOptions::new().with_prefix().with_start_revision(*revision + 1);
        let mut watch = self.client.watch_client();
        let mut stream = bounded("watch", watch.watch(KEY_PREFIX, Some(options))).await?;
        loop {
            let Some(response) = stream.message().await.map_err(|e| e.to_string())? else {
                return Err("the watch stream closed".into());
            };
            if response.canceled() {
                return Err(format!("watch cancelled: {}", response.cancel_reason()));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                *revision = (*revision).max(kv.mod_revision());
                if event.event_type() != EventType::Put {
                    continue; // removals are signed entries too; a deleted key is just withheld
                }
                match decode(kv.value(), &self.operators) {
                    Ok(entry) => {
                        if node.put(entry).await.is_none() {
                            return Ok(()); // the node is gone
                        }
                    }
                    Err(e) => tracing::warn!("etcd key {:?} skipped: {e}", String::from_utf8_lossy(kv.key())),
                }
            }
        }
    }

    /// One attempt at storing `entry`: `Ok(None)` when another write got in between.
    async fn try_put(&self, entry: &SignedEntry) -> Result<Option<Response>, String> {
        let mut kv = self.client.kv_client();
        let key = key(&entry.name);
        let held = bounded("read", kv.get(key.clone(), None)).await?;
        let (held, held_revision) = match held.kvs().first() {
            // What does not verify is as good as absent (and is overwritten).
            Some(kv) => (decode(kv.value(), &self.operators).ok(), kv.mod_revision()),
            None => (None, 0),
        };
        let names = match held {
            Some(_) => 0,
            None => {
                let count = GetOptions::new().with_prefix().with_count_only();
                bounded("count", kv.get(KEY_PREFIX, Some(count))).await?.count() as usize
            }
        };
        match admit(&self.operators, held.as_ref(), names, entry) {
            Err(reason) => return Ok(Some(Response::Error { reason })),
            Ok(false) => return Ok(Some(Response::Done)),
            Ok(true) => {}
        }
        let value = serde_json::to_vec(entry).map_err(|e| format!("cannot encode the entry: {e}"))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, held_revision)])
            .and_then([TxnOp::put(key, value, None)]);
        let done = bounded("write", kv.txn(txn)).await?;
        Ok(done.succeeded().then_some(Response::Done))
    }
}

impl Store for EtcdStore {
    fn put(&self, entry: SignedEntry, node: NodeFeed) -> impl Future<Output = Response> + Send {
        let store = self.clone();
        async move {
            let deadline = Instant::now() + WRITE_DEADLINE;
            let mut last_error = String::from("no attempt finished");
            while Instant::now() < deadline {
                match store.try_put(&entry).await {
                    Ok(Some(Response::Done)) => {
                        // Seen by this registry's readers at once (the watch brings it too).
                        node.put(entry).await;
                        return Response::Done;
                    }
                    Ok(Some(refused)) => return refused,
                    Ok(None) => continue, // another registry wrote this name meanwhile: decide again
                    Err(e) => last_error = e,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Response::Error {
                reason: format!(
                    "refused: this registry cannot reach a quorum of its etcd cluster ({last_error}); \
                     writes are refused until it can, reads are answered from its last copy"
                ),
            }
        }
    }

    fn persist(&self, _entries: Vec<SignedEntry>) {
        // etcd is the store: the node's copy only follows it.
    }

    fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}
