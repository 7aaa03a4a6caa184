//! The registry's embedded persistent store: one JSON file in the data directory,
//! replaced atomically (write a temporary file, fsync it, rename it over the old
//! one, fsync the directory) after every change, and read back at start. A crash
//! at any point leaves either the old or the new file whole.
//!
//! Writes happen on a dedicated thread (the node loop must not block on disk):
//! [`StoreWriter::persist`] hands over the full contents; the thread writes the
//! newest contents it has, skipping superseded ones. [`StoreWriter::flush`] waits
//! until everything handed over is on disk; a write is acknowledged only after it.

use anyhow::{bail, Context, Result};
use physarum_core::trust::SignedEntry;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

pub const STORE_FILE: &str = "registry.json";
/// Version 2: operator-signed entries (version 1 held unsigned service infos).
const STORE_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    entries: Vec<SignedEntry>,
}

/// The store in `data_dir`.
#[derive(Clone, Debug)]
pub struct RegistryStore {
    path: PathBuf,
}

impl RegistryStore {
    /// The store in `data_dir` (created if missing).
    pub fn open(data_dir: &Path) -> Result<RegistryStore> {
        fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        Ok(RegistryStore { path: data_dir.join(STORE_FILE) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored entries; none when the file does not exist yet. A file that
    /// exists but does not parse is an error (never silently emptied).
    pub fn load(&self) -> Result<Vec<SignedEntry>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read the registry store {}", self.path.display())),
        };
        let corrupt = || format!("the registry store {} is corrupt (move it away to start empty)", self.path.display());
        #[derive(Deserialize)]
        struct Header {
            version: u32,
        }
        let header: Header = serde_json::from_str(&text).with_context(corrupt)?;
        if header.version != STORE_VERSION {
            bail!(
                "the registry store {} has version {}, this registry reads version {STORE_VERSION} \
                 (entries are now operator-signed: register the services again)",
                self.path.display(),
                header.version
            );
        }
        let file: StoreFile = serde_json::from_str(&text).with_context(corrupt)?;
        Ok(file.entries)
    }

    /// Replace the stored entries atomically.
    pub fn save(&self, entries: &[SignedEntry]) -> Result<()> {
        let text = serde_json::to_vec_pretty(&StoreFile { version: STORE_VERSION, entries: entries.to_vec() })
            .context("cannot encode the registry")?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                // Make the rename itself durable.
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        };
        write().with_context(|| format!("cannot write the registry store {}", self.path.display()))
    }
}

enum Job {
    Save(Vec<SignedEntry>),
    /// Answered with the outcome of the last save once everything before it is written.
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// Persists registry contents off the caller's thread.
pub struct StoreWriter {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    pub fn spawn(store: RegistryStore) -> StoreWriter {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("registry-store".into())
            .spawn(move || {
                let mut last: Result<(), String> = Ok(());
                while let Ok(job) = rx.recv() {
                    let mut latest = None;
                    let mut flushes = Vec::new();
                    let mut next = Some(job);
                    // Coalesce everything queued: only the newest contents matter.
                    while let Some(job) = next {
                        match job {
                            Job::Save(s) => latest = Some(s),
                            Job::Flush(done) => flushes.push(done),
                        }
                        next = rx.try_recv().ok();
                    }
                    if let Some(services) = latest {
                        last = store.save(&services).map_err(|e| format!("{e:#}"));
                        match &last {
                            Ok(()) => tracing::debug!("registry store: saved {} entries", services.len()),
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                    for done in flushes {
                        let _ = done.send(last.clone());
                    }
                }
            })
            .ok();
        if thread.is_none() {
            tracing::error!("cannot start the registry store thread: changes will not be persisted");
        }
        StoreWriter { tx: thread.as_ref().map(|_| tx), thread }
    }

    /// Persist these full contents (asynchronously).
    pub fn persist(&self, entries: Vec<SignedEntry>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Save(entries));
        }
    }

    /// Wait until everything handed over so far is written; the error of the last
    /// write if it failed.
    pub async fn flush(&self) -> Result<(), String> {
        let Some(tx) = &self.tx else { return Err("the registry store thread is not running".into()) };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tx.send(Job::Flush(done_tx)).map_err(|_| "the registry store thread stopped".to_string())?;
        done_rx.await.map_err(|_| "the registry store thread stopped".to_string())?
    }
}

impl Drop for StoreWriter {
    /// Finish pending writes before going away.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::perf::Requirements;
    use physarum_core::trust::SecretKey;
    use physarum_core::types::{ContentHash, RunSpec, ServiceInfo};
    use std::time::Duration;

    fn info(name: &str) -> SignedEntry {
        let info = ServiceInfo {
            name: name.into(),
            hash: ContentHash(format!("hash-{name}")),
            run: RunSpec::Exec { program: "/bin/true".into(), args: vec!["a".into()], env: vec![] },
            requirements: Requirements::rtt(Duration::from_millis(10), Duration::from_millis(100)),
            cpu_millis: 1,
            memory_mb: 2,
            stateful: true,
            client_mode: false,
        };
        SignedEntry::sign(name.into(), 1, Some(info), &SecretKey::from_bytes([1; 32]))
    }

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("physarum-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saved_entries_survive_a_reopen() {
        let dir = tmp("reopen");
        let store = RegistryStore::open(&dir).unwrap();
        assert!(store.load().unwrap().is_empty());
        store.save(&[info("a"), info("b")]).unwrap();
        let again = RegistryStore::open(&dir).unwrap();
        assert_eq!(again.load().unwrap(), vec![info("a"), info("b")]);
        // No temporary file left.
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STORE_FILE)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_store_is_an_error_and_untouched() {
        let dir = tmp("corrupt");
        let store = RegistryStore::open(&dir).unwrap();
        fs::write(store.path(), "{\"version\": 2, \"entries\": [").unwrap();
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(err.contains("is corrupt"), "{err}");
        fs::write(store.path(), "{\"version\": 9, \"entries\": []}").unwrap();
        assert!(format!("{:#}", store.load().unwrap_err()).contains("version 9"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_writer_persists_the_newest_contents() {
        let dir = tmp("writer");
        let store = RegistryStore::open(&dir).unwrap();
        let writer = StoreWriter::spawn(store.clone());
        writer.persist(vec![info("a")]);
        writer.persist(vec![info("a"), info("b")]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(writer.flush()).unwrap();
        assert_eq!(store.load().unwrap(), vec![info("a"), info("b")]);
        writer.persist(vec![]);
        drop(writer); // drop finishes pending writes
        assert!(store.load().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_is_reported_by_flush() {
        let dir = tmp("failing");
        let store = RegistryStore::open(&dir).unwrap();
        let writer = StoreWriter::spawn(store);
        fs::remove_dir_all(&dir).unwrap();
        writer.persist(vec![info("a")]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = rt.block_on(writer.flush()).unwrap_err();
        assert!(err.contains("cannot write the registry store"), "{err}");
    }
}
