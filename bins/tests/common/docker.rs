//! Docker helpers of the end-to-end tests: whether an engine runs, the demo image
//! (built by `images/build.sh` from the binary under test), and guards that remove
//! every container and network a test made, also when it fails.

use super::{bin, run_bounded};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The image the tests build and run.
pub const TEST_IMAGE: &str = "physarum/hello:test";

/// Whether a Docker engine answers. When it does not, say so: the caller skips.
pub fn engine_available(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: no Docker engine answers on this machine (docker version failed)");
    }
    ok
}

/// Run `docker ARGS…` (bounded); (success, stdout, stderr).
pub fn docker(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_bounded(cmd, Duration::from_secs(120))
}

/// `docker ARGS…`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let (ok, out, err) = docker(args);
    assert!(ok, "docker {} failed:\n{out}\n{err}", args.join(" "));
    out.trim().to_string()
}

/// Build (or find up to date) [`TEST_IMAGE`] from the `physarum` binary under test.
pub fn build_test_image() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg("--physarum").arg(bin("physarum")).arg("--tag").arg(TEST_IMAGE);
    let (ok, out, err) = run_bounded(cmd, Duration::from_secs(300));
    assert!(ok, "images/build.sh failed:\n{out}\n{err}");
}

/// Ids of the containers (running or not) carrying `label` (`key=value`).
pub fn containers_labelled(label: &str) -> Vec<String> {
    let out = docker_ok(&["ps", "-aq", "--filter", &format!("label={label}")]);
    out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

/// Removes, on drop, every container carrying `label` and the named networks.
pub struct DockerGuard {
    pub label: String,
    pub networks: Vec<String>,
}

impl DockerGuard {
    pub fn new(label: impl Into<String>) -> Self {
        DockerGuard { label: label.into(), networks: Vec::new() }
    }
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        let ids = containers_labelled(&self.label);
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
    }
}
