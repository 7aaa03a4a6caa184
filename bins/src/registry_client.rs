//! `physarum registry add|get|list|rm`: a short-lived P2P node that finds a
//! registry through the DHT rendezvous key and asks it. Writes are signed with an
//! operator key; what is read is verified against the configured operators and
//! shown with who signed it.

use crate::cli::{default_listen, NetArgs, RegistryOp};
use crate::daemon::{self, KeyDefault};
use crate::service_config::{describe, ServiceConfig};
use anyhow::{anyhow, bail, Context, Result};
use physarum_core::trust::{Operators, SignedEntry};
use physarum_core::types::{DhtKey, RunSpec};
use physarum_core::wire::{Request, Response};
use physarum_runtime::transport::Transport;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A version above every earlier one from this operator's machine: the time in
/// milliseconds (the registry refuses one that is not newer than what it holds).
fn next_version() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}

/// The first request an operation sends (reading, hashing and signing first, so a
/// bad config or key fails before any network is touched).
pub fn request_for(op: &RegistryOp) -> Result<Request> {
    Ok(match op {
        RegistryOp::Add { config, name, operator_key } => {
            let sc = ServiceConfig::load(config)?;
            let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let info = sc.to_service_info(name.as_deref(), base)?;
            let key = crate::keys::load_operator_key(operator_key)?;
            Request::RegistryPut {
                entry: Box::new(SignedEntry::sign(info.name.clone(), next_version(), Some(info), &key)),
            }
        }
        RegistryOp::Rm { name, operator_key } => {
            let key = crate::keys::load_operator_key(operator_key)?;
            Request::RegistryPut { entry: Box::new(SignedEntry::sign(name.clone(), next_version(), None, &key)) }
        }
        RegistryOp::Get { name } => Request::RegistryGet { name: name.clone() },
        RegistryOp::List => Request::RegistryList { after: None },
    })
}

/// Who signed `entry`, as far as `operators` can tell.
fn signed_by(entry: &SignedEntry, operators: &Operators) -> String {
    match operators.verify_entry(entry) {
        Ok(()) => format!("operator {} (verified)", entry.signer),
        Err(e) => format!("NOT VERIFIED: {e}"),
    }
}

/// What to print for an answer (pages of a list are joined by the caller), or the error it means.
pub fn render(request: &Request, response: Response, operators: &Operators) -> Result<String> {
    match (request, response) {
        (_, Response::Error { reason }) | (_, Response::Refused { reason }) => bail!("the registry refused: {reason}"),
        (Request::RegistryPut { entry }, Response::Done) => match &entry.info {
            Some(info) => {
                let what = match &info.run {
                    RunSpec::Exec { program, .. } => program.clone(),
                    RunSpec::Image { image } => format!("image {image}"),
                };
                Ok(format!("Registered {} ({what}, hash {}, version {})", info.name, info.hash, entry.version))
            }
            None => Ok(format!("Removed {}", entry.name)),
        },
        (Request::RegistryGet { .. }, Response::Entry { entry: Some(entry) }) => match &entry.info {
            Some(info) => Ok(format!(
                "{}\n  version:  {}\n  signed:   {}",
                describe(info),
                entry.version,
                signed_by(&entry, operators)
            )),
            None => bail!("service {:?} was removed", entry.name),
        },
        (Request::RegistryGet { name }, Response::Entry { entry: None }) => bail!("no service named {name:?}"),
        (Request::RegistryList { .. }, Response::Entries { entries, .. }) if entries.is_empty() => {
            Ok("No services registered".into())
        }
        (Request::RegistryList { .. }, Response::Entries { entries, .. }) => {
            let width = entries.iter().map(|e| e.name.len()).max().unwrap_or(4).max(4);
            let mut out = format!("{:width$}  HASH              RUN", "NAME");
            for e in entries {
                let Some(i) = &e.info else { continue };
                let run = match &i.run {
                    RunSpec::Exec { program, .. } => program.clone(),
                    RunSpec::Image { image } => format!("image {image}"),
                };
                let hash: String = i.hash.0.chars().take(16).collect();
                let mark = if operators.verify_entry(&e).is_ok() { "" } else { "  (NOT VERIFIED)" };
                out.push_str(&format!("\n{:width$}  {hash:16}  {run}{mark}", i.name));
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
    let operators = prepared.operators.clone();
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
                        match ask(&p2p, &registry, &request).await {
                            Ok(resp) => return render(&request, resp, &operators),
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

/// Send `request` to one registry; a list is fetched page by page into one answer.
async fn ask(
    p2p: &physarum_net_real::P2p,
    registry: &physarum_core::types::PeerAddr,
    request: &Request,
) -> Result<Response, String> {
    let per_request = Duration::from_secs(10);
    if !matches!(request, Request::RegistryList { .. }) {
        return p2p.send_request(registry.clone(), request.clone(), per_request).await;
    }
    let mut all = Vec::new();
    let mut after = None;
    loop {
        match p2p.send_request(registry.clone(), Request::RegistryList { after }, per_request).await? {
            Response::Entries { entries, next } => {
                all.extend(entries);
                match next {
                    Some(n) => after = Some(n),
                    None => return Ok(Response::Entries { entries: all, next: None }),
                }
            }
            other => return Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use physarum_core::perf::Requirements;
    use physarum_core::trust::SecretKey;
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
        let key = SecretKey::from_bytes([1; 32]);
        let ops = Operators::new(vec![key.public()]);
        let entry = SignedEntry::sign("svc".into(), 7, Some(info()), &key);
        let put = Request::RegistryPut { entry: Box::new(entry.clone()) };
        assert!(render(&put, Response::Done, &ops).unwrap().starts_with("Registered svc (image img"));
        let get = Request::RegistryGet { name: "svc".into() };
        let shown = render(&get, Response::Entry { entry: Some(Box::new(entry.clone())) }, &ops).unwrap();
        assert!(shown.contains("hash:     0123") && shown.contains("(verified)"), "{shown}");
        let shown =
            render(&get, Response::Entry { entry: Some(Box::new(entry.clone())) }, &Operators::default()).unwrap();
        assert!(shown.contains("NOT VERIFIED"), "{shown}");
        let err = render(&get, Response::Entry { entry: None }, &ops).unwrap_err().to_string();
        assert!(err.contains("no service named \"svc\""), "{err}");
        let list = Request::RegistryList { after: None };
        let shown = render(&list, Response::Entries { entries: vec![entry], next: None }, &ops).unwrap();
        assert!(shown.contains("svc") && shown.contains("0123456789abcdef") && !shown.contains("0123456789abcdef0"));
        let err = render(&put, Response::Error { reason: "bad".into() }, &ops).unwrap_err().to_string();
        assert!(err.contains("refused: bad"));
        assert!(render(&put, Response::Pong { nonce: 1 }, &ops).is_err());
    }

    #[test]
    fn a_bad_service_config_or_key_fails_before_the_network() {
        let op = RegistryOp::Add { config: "/no/such/config.json".into(), name: None, operator_key: "k".into() };
        let err = format!("{:#}", request_for(&op).unwrap_err());
        assert!(err.contains("cannot read /no/such/config.json"), "{err}");
        let op = RegistryOp::Rm { name: "x".into(), operator_key: "/no/such/operator.key".into() };
        let err = format!("{:#}", request_for(&op).unwrap_err());
        assert!(err.contains("cannot load the operator key"), "{err}");
    }
}
