//! The admission webhook on any request body: a response or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_control::inject::{InjectConfig, InjectMode};

fuzz_target!(|data: &[u8]| {
    let cfg = InjectConfig {
        image: "img".into(),
        mode: InjectMode::Native,
        control_addr: "cp:15012".into(),
        control_identity: "spiffe://cluster.local/ns/meshlet-system/sa/meshlet-control".into(),
        otlp_endpoint: None,
    };
    let _ = meshlet_control::webhook::review(data, &cfg);
});
