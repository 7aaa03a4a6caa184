//! `physarum registry add|get|list|rm`: a short-lived P2P node that finds a
//! registry through the DHT rendezvous key and asks it.

use crate::cli::{default_listen, NetArgs, RegistryOp};
use crate::daemon::{self, KeyDefault};
use crate::service_config::{describe, ServiceConfig};
use anyhow::{anyhow, bail, Context, Result};
use physarum_core::types::{DhtKey, RunSpec};
use physarum_core::wire::{Request, Response};
use physarum_runtime::transport::Transport;
use std::path::Path;
use std::time::{Duration, Instant};

/// The request an operation sends (reading and hashing the service config first,
/// so a bad config fails before any network is touched).
pub fn request_for(op: &RegistryOp) -> Result<Request> {
    Ok(match op {
        RegistryOp::Add { config, name } => {
            let sc = ServiceConfig::load(config)?;
            let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Request::RegistryPut { info: sc.to_service_info(name.as_deref(), base)? }
        }
        RegistryOp::Get { name } => Request::RegistryGet { name: name.clone() },
        RegistryOp::List => Request::RegistryList,
        RegistryOp::Rm { name } => Request::RegistryDelete { name: name.clone() },
    })
}

/// What to print for an answer, or the error it means.
pub fn render(request: &Request, response: Response) -> Result<String> {
    match (request, response) {
        (_, Response::Error { reason }) | (_, Response::Refused { reason }) => bail!("the registry refused: {reason}"),
        (Request::RegistryPut { info }, Response::Done) => {
            let what = match &info.run {
                RunSpec::Exec { program, .. } => program.clone(),
                RunSpec::Image { image } => format!("image {image}"),
            };
            Ok(format!("Registered {} ({what}, hash {})", info.name, info.hash))
        }
        (Request::RegistryDelete { name }, Response::Done) => Ok(format!("Removed {name}")),
        (Request::RegistryGet { .. }, Response::Service { info: Some(info) }) => Ok(describe(&info)),
        (Request::RegistryGet { name }, Response::Service { info: None }) => bail!("no service named {name:?}"),
        (Request::RegistryList, Response::Services { infos }) if infos.is_empty() => {
            Ok("No services registered".into())
        }
        (Request::RegistryList, Response::Services { infos }) => {
            let width = infos.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
            let mut out = format!("{:width$}  HASH              RUN", "NAME");
            for i in infos {
                let run = match &i.run {
                    RunSpec::Exec { program, .. } => program.clone(),
                    RunSpec::Image { image } => format!("image {image}"),
                };
                let hash: String = i.hash.0.chars().take(16).collect();
                out.push_str(&format!("\n{:width$}  {hash:16}  {run}", i.name));
            }
            Ok(out)
        }
        (_, other) => bail!("unexpected answer from the registry: {other:?}"),
    }
}

/// Run one registry operation against the network.
pub async fn run(net: &NetArgs, timeout: Duration, op: &RegistryOp) -> Result<String> {
    let request = request_for(op)?;
    let prepared = daemon::prepare(net, KeyDefault::Ephemeral, &default_listen())?;
    if prepared.bootstraps.is_empty() {
        bail!("no bootstrap nodes: pass --bootstrap MULTIADDR, set \"Bootstraps\" in the config file, or set P2P_BOOTSTRAPS");
    }
    let deadline = Instant::now() + timeout;
    let work = async {
        let (p2p, _inbound) = daemon::start_network(&prepared, prepared.p2p_options()).await?;
        let mut last_error = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let providers = p2p.find_providers(DhtKey::Registry, left.min(Duration::from_secs(3))).await;
            match providers {
                Ok(found) if !found.is_empty() => {
                    for registry in found {
                        match p2p.send_request(registry.clone(), request.clone(), Duration::from_secs(10)).await {
                            Ok(resp) => return render(&request, resp),
                            Err(e) => last_error = Some(format!("registry {}: {e}", registry.peer)),
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "no registry answered within {timeout:?}{}",
                    last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(timeout + Duration::from_secs(1), work)
        .await
        .with_context(|| format!("no answer from the registry within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::perf::Requirements;
    use physarum_core::types::{ContentHash, ServiceInfo};

    fn info() -> ServiceInfo {
        ServiceInfo {
            name: "svc".into(),
            hash: ContentHash("0123456789abcdef0123".into()),
            run: RunSpec::Image { image: "img".into() },
            requirements: Requirements::default(),
            cpu_millis: 0,
            memory_mb: 0,
            stateful: false,
            client_mode: false,
        }
    }

    #[test]
    fn answers_render_or_fail() {
        let put = Request::RegistryPut { info: info() };
        assert!(render(&put, Response::Done).unwrap().starts_with("Registered svc (image img"));
        let get = Request::RegistryGet { name: "svc".into() };
        assert!(render(&get, Response::Service { info: Some(info()) }).unwrap().contains("hash:     0123"));
        let err = render(&get, Response::Service { info: None }).unwrap_err().to_string();
        assert!(err.contains("no service named \"svc\""), "{err}");
        let list = render(&Request::RegistryList, Response::Services { infos: vec![info()] }).unwrap();
        assert!(list.contains("svc") && list.contains("0123456789abcdef") && !list.contains("0123456789abcdef0"));
        let err = render(&put, Response::Error { reason: "bad".into() }).unwrap_err().to_string();
        assert!(err.contains("refused: bad"));
        assert!(render(&put, Response::Pong { nonce: 1 }).is_err());
    }

    #[test]
    fn a_bad_service_config_fails_before_the_network() {
        let op = RegistryOp::Add { config: "/no/such/config.json".into(), name: None };
        let err = format!("{:#}", request_for(&op).unwrap_err());
        assert!(err.contains("cannot read /no/such/config.json"), "{err}");
    }
}
