#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| physarum_fuzz::wire::check_all(bytes));
