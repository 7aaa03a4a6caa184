//! What an allocator that died without stopping its instances (SIGKILL, a crash)
//! leaves behind: instance directories holding identity keys and logs, and — if
//! the parent-death signal did not reach them — processes still running in them.
//! A restarted allocator reclaims its instance directory before it starts anything:
//! it stops every process working in a leftover `instance-*` directory and removes
//! the directory. A pid file keeps two live allocators off one directory.

use std::fs;
use std::path::{Path, PathBuf};

const PID_FILE: &str = "allocator.pid";

/// What [`reclaim`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub dirs: Vec<PathBuf>,
    pub killed: Vec<u32>,
}

/// Claim `work_dir` for this process (refused while another live process holds it),
/// then stop the processes of leftover instance directories and remove those.
pub fn reclaim(work_dir: &Path) -> Result<Reclaimed, String> {
    claim(work_dir)?;
    let mut done = Reclaimed::default();
    let entries = match fs::read_dir(work_dir) {
        Ok(e) => e,
        Err(e) => return Err(format!("cannot read the instance directory {}: {e}", work_dir.display())),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("instance-") && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        for pid in working_in(&dir) {
            // SAFETY: kill(2) with a valid signal has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            done.killed.push(pid);
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => done.dirs.push(dir),
            Err(e) => tracing::warn!("cannot remove the leftover instance directory {}: {e}", dir.display()),
        }
    }
    Ok(done)
}

/// Per-run instance directories named `<prefix><pid>` in `parent` whose allocator
/// is no longer running: reclaimed and removed whole. Returns those removed.
pub fn reclaim_abandoned(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let live = Path::new(&format!("/proc/{pid}")).exists() && is_allocator(pid);
        if pid == std::process::id() || live || !entry.path().is_dir() {
            continue;
        }
        if reclaim(&entry.path()).is_ok() && fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed.sort();
    removed
}

/// Give up the claim on `work_dir` (on a clean shutdown).
pub fn release(work_dir: &Path) {
    let _ = fs::remove_file(work_dir.join(PID_FILE));
}

fn claim(work_dir: &Path) -> Result<(), String> {
    let file = work_dir.join(PID_FILE);
    if let Some(pid) = fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() && is_allocator(pid) {
            return Err(format!(
                "the instance directory {} is in use by another allocator (pid {pid}); give each allocator its own",
                work_dir.display()
            ));
        }
    }
    fs::write(&file, format!("{}\n", std::process::id())).map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// Whether `pid` runs the same executable as this process (a pid file's pid may
/// have been reused by an unrelated process since).
fn is_allocator(pid: u32) -> bool {
    let exe = |p: &str| fs::read_link(format!("/proc/{p}/exe")).ok();
    exe(&pid.to_string()).is_some_and(|e| Some(e) == exe("self"))
}

/// Processes whose working directory is `dir` (instances run in theirs).
fn working_in(dir: &Path) -> Vec<u32> {
    let Ok(dir) = fs::canonicalize(dir) else { return Vec::new() };
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    let mut pids: Vec<u32> = procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect();
    pids.sort();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn leftover_directories_and_their_processes_are_reclaimed() {
        let root = std::env::temp_dir().join(format!("physarum-leftovers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("instance-7");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("identity.key"), b"secret").unwrap();
        fs::create_dir_all(root.join("unrelated")).unwrap();
        let mut orphan = Command::new("sleep").arg("600").current_dir(&dir).spawn().unwrap();
        let done = reclaim(&root).unwrap();
        let status = orphan.wait().unwrap();
        assert!(!status.success(), "the orphan was killed");
        assert_eq!(done.killed, vec![orphan.id()]);
        assert_eq!(done.dirs, vec![dir.clone()]);
        assert!(!dir.exists());
        assert!(root.join("unrelated").exists(), "only instance directories are touched");
        // Our own claim does not lock ourselves out; releasing removes it.
        reclaim(&root).unwrap();
        release(&root);
        assert!(!root.join(PID_FILE).exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
