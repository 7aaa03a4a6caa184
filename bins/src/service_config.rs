//! Service configs, as `physarum registry add` reads them: the original
//! service-registry's fields plus what to run.
//!
//! ```json
//! {
//!     "Name": "hello-world-server",
//!     "Exec": {"Program": "hello", "Args": []},
//!     "NetworkSoftReq": 100,
//!     "NetworkHardReq": 1000,
//!     "CpuReq": 100,
//!     "MemoryReq": 16
//! }
//! ```
//! - `Name`: the service name (the first path segment of requests); `--name` overrides it.
//! - `Exec` (`Program`, optional `Args` and `Env`) or `Image` (a container image reference): what
//!   an allocator runs. A relative `Program` path is taken relative to the config
//!   file; a bare name is looked up next to the `physarum` executable, then on `PATH`.
//! - `NetworkSoftReq`, `NetworkHardReq`: RTT limits in milliseconds; missing or 0
//!   means "the client's `conf.json` defaults".
//! - `CpuReq` in thousandths of a core, `MemoryReq` in MiB (0: no reservation).
//! - `Stateful`: optional, false by default.
//! - `ProxyClientMode`: optional, false by default; true for a service whose
//!   instances only make requests: their sidecar runs in anonymous mode.
//!
//! The content hash is a SHA3-256 over the whole run spec (program path, arguments,
//! environment, or the image reference) and the executable's bytes, so a changed
//! executable, or the same one with other arguments, is another service.

use anyhow::{bail, Context, Result};
use physarum_core::perf::{PerfLimits, Requirements};
use physarum_core::types::{content_hash, RunSpec, ServiceInfo};
use physarum_net_real::driver::hash_file;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(rename = "Name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "Exec", default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecConfig>,
    #[serde(rename = "Image", default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(rename = "NetworkSoftReq", default)]
    pub network_soft_req: u64,
    #[serde(rename = "NetworkHardReq", default)]
    pub network_hard_req: u64,
    #[serde(rename = "CpuReq", default)]
    pub cpu_req: u32,
    #[serde(rename = "MemoryReq", default)]
    pub memory_req: u32,
    #[serde(rename = "Stateful", default)]
    pub stateful: bool,
    #[serde(rename = "ProxyClientMode", default)]
    pub client_mode: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    #[serde(rename = "Program")]
    pub program: String,
    #[serde(rename = "Args", default)]
    pub args: Vec<String>,
    #[serde(rename = "Env", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Whether `name` can be a service name: the first segment of a request path.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        bail!("invalid service name {name:?}: it must have 1 to 128 characters");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) || name.starts_with('.') {
        bail!("invalid service name {name:?}: use letters, digits, '-', '_' and '.' (not first)");
    }
    Ok(())
}

impl ServiceConfig {
    pub fn parse(text: &str) -> Result<ServiceConfig> {
        let conf: ServiceConfig = serde_json::from_str(text).context("invalid service config")?;
        match (&conf.exec, &conf.image) {
            (None, None) => bail!("invalid service config: say what to run with \"Exec\" or \"Image\""),
            (Some(_), Some(_)) => bail!("invalid service config: give either \"Exec\" or \"Image\", not both"),
            (Some(e), None) if e.program.trim().is_empty() => {
                bail!("invalid service config: \"Exec.Program\" is empty")
            }
            (None, Some(i)) if i.trim().is_empty() => bail!("invalid service config: \"Image\" is empty"),
            _ => {}
        }
        if conf.network_soft_req > 0 && conf.network_hard_req > 0 && conf.network_soft_req > conf.network_hard_req {
            bail!(
                "invalid service config: NetworkSoftReq ({} ms) is above NetworkHardReq ({} ms)",
                conf.network_soft_req,
                conf.network_hard_req
            );
        }
        Ok(conf)
    }

    /// Read a service config file.
    pub fn load(path: &Path) -> Result<ServiceConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        ServiceConfig::parse(&text).with_context(|| format!("service config {}", path.display()))
    }

    /// The registry entry: resolve the program (relative to `base_dir`, the config
    /// file's directory), hash it, and apply `name` (or the config's `Name`).
    pub fn to_service_info(&self, name: Option<&str>, base_dir: &Path) -> Result<ServiceInfo> {
        let name = name
            .or(self.name.as_deref())
            .context("the service has no name: set \"Name\" in the config or pass --name")?
            .to_string();
        validate_name(&name)?;
        // The hash covers the whole run spec and the program's bytes.
        let (run, artifact) = match (&self.exec, &self.image) {
            (Some(exec), _) => {
                let program = resolve_for_registration(&exec.program, base_dir)?;
                let digest = hash_file(&program).with_context(|| format!("cannot read {}", program.display()))?;
                let env = exec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                (RunSpec::Exec { program: program.display().to_string(), args: exec.args.clone(), env }, digest)
            }
            (None, Some(image)) => (RunSpec::Image { image: image.clone() }, String::new()),
            (None, None) => bail!("invalid service config: say what to run with \"Exec\" or \"Image\""),
        };
        let hash = content_hash(&run, &artifact);
        let ms = |v: u64| PerfLimits { rtt: (v > 0).then(|| Duration::from_millis(v)) };
        Ok(ServiceInfo {
            name,
            hash,
            run,
            requirements: Requirements { soft: ms(self.network_soft_req), hard: ms(self.network_hard_req) },
            cpu_millis: self.cpu_req,
            memory_mb: self.memory_req,
            stateful: self.stateful,
            client_mode: self.client_mode,
        })
    }
}

/// The absolute path of a program named in a service config.
fn resolve_for_registration(program: &str, base_dir: &Path) -> Result<PathBuf> {
    let path = Path::new(program);
    let candidate = if path.is_absolute() {
        path.to_path_buf()
    } else if program.contains('/') {
        base_dir.join(path)
    } else {
        return physarum_net_real::driver::process::resolve_program(program)
            .map_err(anyhow::Error::msg)
            .and_then(|p| std::fs::canonicalize(&p).with_context(|| format!("cannot resolve {}", p.display())));
    };
    if !candidate.is_file() {
        bail!("the program {} does not exist", candidate.display());
    }
    std::fs::canonicalize(&candidate).with_context(|| format!("cannot resolve {}", candidate.display()))
}

/// A human-readable summary of an entry (for `registry get`/`list`).
pub fn describe(info: &ServiceInfo) -> String {
    let run = match &info.run {
        RunSpec::Exec { program, args, .. } if args.is_empty() => format!("exec {program}"),
        RunSpec::Exec { program, args, .. } => format!("exec {program} {}", args.join(" ")),
        RunSpec::Image { image } => format!("image {image}"),
    };
    let ms = |l: PerfLimits| l.rtt.map(|d| format!("{} ms", d.as_millis())).unwrap_or_else(|| "default".into());
    format!(
        "{}\n  hash:     {}\n  run:      {run}\n  rtt:      soft {}, hard {}\n  cpu:      {} millicores\n  memory:   {} MiB\n  stateful: {}\n  client mode: {}",
        info.name,
        info.hash,
        ms(info.requirements.soft),
        ms(info.requirements.hard),
        info.cpu_millis,
        info.memory_mb,
        info.stateful,
        info.client_mode
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_fields_parse() {
        let c = ServiceConfig::parse(
            r#"{"Name": "svc", "Image": "reg/svc:1", "NetworkSoftReq": 50, "NetworkHardReq": 200, "CpuReq": 500, "MemoryReq": 64}"#,
        )
        .unwrap();
        let info = c.to_service_info(None, Path::new(".")).unwrap();
        assert_eq!(info.name, "svc");
        assert_eq!(info.run, RunSpec::Image { image: "reg/svc:1".into() });
        assert_eq!(info.hash, content_hash(&info.run, ""));
        assert_eq!(info.requirements, Requirements::rtt(Duration::from_millis(50), Duration::from_millis(200)));
        assert_eq!((info.cpu_millis, info.memory_mb, info.stateful, info.client_mode), (500, 64, false, false));
        let c = ServiceConfig::parse(r#"{"Name": "c", "Image": "x", "ProxyClientMode": true}"#).unwrap();
        assert!(c.to_service_info(None, Path::new(".")).unwrap().client_mode);
        // --name overrides, zero limits mean the defaults.
        let c = ServiceConfig::parse(r#"{"Image": "x", "NetworkSoftReq": 0}"#).unwrap();
        let info = c.to_service_info(Some("other"), Path::new(".")).unwrap();
        assert_eq!(info.name, "other");
        assert_eq!(info.requirements, Requirements::default());
    }

    #[test]
    fn exec_programs_are_resolved_and_hashed() {
        let dir = std::env::temp_dir().join(format!("physarum-svcconf-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        let c = ServiceConfig::parse(r#"{"Name": "a", "Exec": {"Program": "bin/app", "Args": ["-v"]}}"#).unwrap();
        let info = c.to_service_info(None, &dir).unwrap();
        let abs = std::fs::canonicalize(dir.join("bin/app")).unwrap();
        assert_eq!(
            info.run,
            RunSpec::Exec { program: abs.display().to_string(), args: vec!["-v".into()], env: vec![] }
        );
        let digest = physarum_net_real::driver::hash_bytes(b"#!/bin/sh\necho hi\n");
        assert_eq!(info.hash, content_hash(&info.run, &digest));
        // The same program with other arguments or environment is another service.
        let other = ServiceConfig::parse(r#"{"Name": "a", "Exec": {"Program": "bin/app", "Args": ["-q"]}}"#).unwrap();
        assert_ne!(other.to_service_info(None, &dir).unwrap().hash, info.hash);
        let env = r#"{"Name": "a", "Exec": {"Program": "bin/app", "Args": ["-v"], "Env": {"MODE": "x"}}}"#;
        let with_env = ServiceConfig::parse(env).unwrap().to_service_info(None, &dir).unwrap();
        assert_ne!(with_env.hash, info.hash);
        assert!(matches!(&with_env.run, RunSpec::Exec { env, .. } if env == &[("MODE".to_string(), "x".to_string())]));
        let c = ServiceConfig::parse(r#"{"Name": "a", "Exec": {"Program": "bin/missing"}}"#).unwrap();
        let err = c.to_service_info(None, &dir).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        for (text, want) in [
            ("{", "invalid service config"),
            (r#"{"Name": "a"}"#, "\"Exec\" or \"Image\""),
            (r#"{"Image": "a", "Exec": {"Program": "b"}}"#, "not both"),
            (r#"{"Image": "a", "NetworkSoftReq": 300, "NetworkHardReq": 100}"#, "is above"),
            (r#"{"Image": "a", "CpuReq": -1}"#, "invalid service config"),
            (r#"{"Image": "a", "Unknown": 1}"#, "unknown field"),
            (r#"{"Exec": {"Program": ""}}"#, "empty"),
        ] {
            let err = format!("{:#}", ServiceConfig::parse(text).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
        let c = ServiceConfig::parse(r#"{"Image": "a"}"#).unwrap();
        assert!(c.to_service_info(None, Path::new(".")).unwrap_err().to_string().contains("no name"));
        assert!(c.to_service_info(Some("a/b"), Path::new(".")).is_err());
        assert!(c.to_service_info(Some(""), Path::new(".")).is_err());
    }

    #[test]
    fn the_shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/services");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            ServiceConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
        assert!(n >= 2);
    }
}
