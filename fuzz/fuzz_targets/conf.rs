#![no_main]
//! `conf.json`: parsing never panics, and what parses survives a write and a re-read.
use physarum_core::config::ConfFile;

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(conf) = ConfFile::parse(text) {
        let again = ConfFile::parse(&serde_json::to_string(&conf).unwrap()).expect("a written config parses");
        assert_eq!(again, conf);
        let req = conf.requirements();
        assert!(req.soft.rtt <= req.hard.rtt);
    }
});
