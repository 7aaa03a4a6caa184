#![no_main]
libfuzzer_sys::fuzz_target!(|case: physarum_fuzz::node::Case| physarum_fuzz::node::check(&case));
