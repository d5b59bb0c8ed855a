//! HTTP/1, HTTP/2 or opaque detection on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshlet_proxy::detect::protocol(data);
    let _ = meshlet_proxy::inbound::classify(data);
});
