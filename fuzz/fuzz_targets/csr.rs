//! The CA's CSR checks on any bytes: a clear refusal or a key, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/fuzz/sa/fuzz").expect("a valid constant");
    let _ = meshlet_identity::csr::check_csr(data, &id);
});
