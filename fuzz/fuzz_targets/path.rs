//! Path normalisation for authorization: total, idempotent, and never leaves the root.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_identity::authz::normalize_path;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        if let Some(once) = normalize_path(raw) {
            assert!(once.starts_with('/'));
            assert!(!once.split('/').any(|s| s == ".." || s == "."), "{once:?}");
            assert!(!once.contains("//"), "{once:?}");
        }
    }
});
