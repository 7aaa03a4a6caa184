//! Loading `conf/conf.json` and resolving bootstraps and the private-network key
//! the way the original does: command line, else config file, else environment.

use anyhow::{bail, Context, Result};
use physarum_core::config::ConfFile;
use std::path::{Path, PathBuf};

/// The config file read when `--configfile` is not given (as the original).
pub const DEFAULT_CONFIG: &str = "conf/conf.json";

/// Where the configuration came from, for the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfSource {
    File(PathBuf),
    /// No `--configfile` and no `conf/conf.json` here: the original's defaults.
    Defaults,
}

/// Read and validate the config file. An explicitly named file must exist; the
/// default `conf/conf.json` may be missing (then the defaults apply). A file that
/// exists but does not parse or validate is always an error naming the file.
pub fn load(path: Option<&Path>) -> Result<(ConfFile, ConfSource)> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok((ConfFile::parse("{}").context("built-in defaults")?, ConfSource::Defaults));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read config file {}", path.display())),
    };
    let conf = ConfFile::parse(&text).with_context(|| format!("config file {}", path.display()))?;
    Ok((conf, ConfSource::File(path)))
}

/// Bootstrap multiaddrs: the command line's, else the config file's, else the
/// space-separated `P2P_BOOTSTRAPS`.
pub fn bootstraps(cli: &[String], conf: &ConfFile, env: Option<&str>) -> Vec<String> {
    if !cli.is_empty() {
        return cli.to_vec();
    }
    if !conf.bootstraps.is_empty() {
        return conf.bootstraps.clone();
    }
    env.map(|e| e.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
}

/// The private-network passphrase: the command line's, else `P2P_PSK`. Empty means none.
pub fn psk(cli: Option<&str>, env: Option<&str>) -> Option<String> {
    cli.or(env).filter(|p| !p.is_empty()).map(str::to_string)
}

/// Bootstraps and PSK from the process environment.
pub fn env_bootstraps() -> Option<String> {
    std::env::var("P2P_BOOTSTRAPS").ok()
}

pub fn env_psk() -> Option<String> {
    std::env::var("P2P_PSK").ok()
}

/// Check that every bootstrap is a multiaddr ending in `/p2p/<peer id>`.
pub fn validate_bootstraps(addrs: &[String]) -> Result<()> {
    for a in addrs {
        let ma: libp2p::Multiaddr = a.parse().with_context(|| format!("invalid bootstrap address {a:?}"))?;
        if !ma.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_))) {
            bail!("invalid bootstrap address {a:?}: it must end in /p2p/<peer id>");
        }
    }
    Ok(())
}

/// Where a daemon keeps its identity key when `--key` is not given:
/// `$PHYSARUM_HOME/<name>.key`, else `$HOME/.physarum/<name>.key`.
pub fn default_key_path(name: &str) -> PathBuf {
    let home = std::env::var_os("PHYSARUM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".physarum")))
        .unwrap_or_else(|| PathBuf::from(".physarum"));
    home.join(format!("{name}.key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("physarum-conf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_shipped_config_parses() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/conf.json");
        let (conf, src) = load(Some(&shipped)).unwrap();
        assert_eq!(src, ConfSource::File(shipped));
        assert_eq!(conf.perf.soft.rtt_ms, 100);
        assert_eq!(conf.perf.hard.rtt_ms, 1000);
    }

    #[test]
    fn broken_and_missing_files_are_clear_errors() {
        let dir = tmp("broken");
        let path = dir.join("conf.json");
        std::fs::write(&path, "{\"Perf\": {\"SoftReq\": {\"RTT\": 100}").unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("conf.json") && err.contains("invalid config"), "{err}");
        std::fs::write(&path, r#"{"Perf": {"SoftReq": {"RTT": 500}, "HardReq": {"RTT": 100}}}"#).unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("is above"), "{err}");
        std::fs::write(&path, r#"{"Bootstrap": []}"#).unwrap();
        let err = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(err.contains("unknown field"), "{err}");
        let err = format!("{:#}", load(Some(&dir.join("missing.json"))).unwrap_err());
        assert!(err.contains("cannot read config file") && err.contains("missing.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bootstraps_come_from_cli_then_file_then_env() {
        let mut conf = ConfFile::parse("{}").unwrap();
        let env = Some("/ip4/1.2.3.4/tcp/1 /ip4/1.2.3.4/tcp/2");
        assert_eq!(bootstraps(&[], &conf, env), vec!["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/2"]);
        assert!(bootstraps(&[], &conf, None).is_empty());
        conf.bootstraps = vec!["/file".into()];
        assert_eq!(bootstraps(&[], &conf, env), vec!["/file"]);
        assert_eq!(bootstraps(&["/cli".into()], &conf, env), vec!["/cli"]);
    }

    #[test]
    fn psk_comes_from_cli_then_env() {
        assert_eq!(psk(Some("a"), Some("b")).as_deref(), Some("a"));
        assert_eq!(psk(None, Some("b")).as_deref(), Some("b"));
        assert_eq!(psk(None, Some("")), None);
        assert_eq!(psk(None, None), None);
    }

    #[test]
    fn bootstrap_addresses_are_validated() {
        let ok = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWGegi4bWDPw9f6x2mZ6zxtsjR8w4ax1tEMDKCNqdYBt7X".to_string();
        validate_bootstraps(std::slice::from_ref(&ok)).unwrap();
        let err = validate_bootstraps(&["/ip4/127.0.0.1/tcp/4001".into()]).unwrap_err().to_string();
        assert!(err.contains("/p2p/<peer id>"), "{err}");
        assert!(validate_bootstraps(&["not an address".into()]).is_err());
    }
}
