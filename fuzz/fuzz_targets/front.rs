#![no_main]
//! The front end's pure parts: how a request target splits into the service and the
//! target forwarded to the instance, and how headers are prepared for the next hop.
//! Input: the request target on the first line, then one `name: value` header a line.
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use physarum_runtime::http::strip_for_forwarding;
use physarum_runtime::{forward_path, split_path};

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let mut lines = bytes.split(|b| *b == b'\n');
    check_target(lines.next().unwrap_or_default());
    check_headers(lines);
});

fn check_target(target: &[u8]) {
    let Ok(uri) = Uri::try_from(target) else { return };
    let path = uri.path();
    let Some((service, rest)) = split_path(path) else {
        assert!(path.len() <= 1 || !path.starts_with('/') || path.starts_with("//"), "{path:?} has a service");
        return;
    };
    assert!(!service.is_empty() && !service.contains('/'));
    assert!(rest.starts_with('/'));
    assert!(path == format!("/{service}{rest}") || (rest == "/" && path == format!("/{service}")));
    let forward = forward_path(rest, uri.query()).expect("parts of a valid target form a valid target");
    assert_eq!(forward.path(), rest);
    assert_eq!(forward.query(), uri.query());
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus what the next hop must not see again.
const NEVER_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "expect",
];

fn check_headers<'a>(lines: impl Iterator<Item = &'a [u8]>) {
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        else {
            continue;
        };
        headers.append(name, value);
    }
    let before = headers.clone();
    // Names the Connection header lists are hop-by-hop too.
    let listed: Vec<String> = before
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    strip_for_forwarding(&mut headers);
    for name in before.keys() {
        let dropped = NEVER_FORWARDED.contains(&name.as_str()) || listed.iter().any(|l| l == name.as_str());
        let kept: Vec<_> = headers.get_all(name).iter().collect();
        if dropped {
            assert!(kept.is_empty(), "{name} was forwarded");
        } else {
            assert_eq!(kept, before.get_all(name).iter().collect::<Vec<_>>(), "{name} changed");
        }
    }
    assert!(headers.keys().all(|k| before.contains_key(k)), "a header appeared");
}
