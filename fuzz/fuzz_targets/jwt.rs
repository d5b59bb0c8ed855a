//! Workload token authentication on any string: a refusal (or, never, a panic).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlet_control::token::{Authenticator, LocalSigner};

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let dir = std::env::temp_dir().join("meshlet-fuzz-jwt");
        let signer = LocalSigner::load_or_create(&dir).expect("a key in the temp dir");
        Authenticator::new(vec![signer.trusted_key()], None)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = auth().authenticate(token);
    }
});
