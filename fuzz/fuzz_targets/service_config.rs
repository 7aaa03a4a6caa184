#![no_main]
//! Service configs (`physarum registry add`): parsing never panics, and what parses
//! survives a write and a re-read.
use physarum::service_config::{validate_name, ServiceConfig};

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(conf) = ServiceConfig::parse(text) {
        let again = ServiceConfig::parse(&serde_json::to_string(&conf).unwrap()).expect("a written config parses");
        assert_eq!(again, conf);
        if let Some(name) = &conf.name {
            if validate_name(name).is_ok() {
                // A valid name is one path segment.
                assert!(!name.contains('/') && !name.is_empty());
            }
        }
    }
});
