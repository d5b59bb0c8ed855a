//! SPIFFE ID parsing: whatever parses prints back to the same string and parses again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = SpiffeId::parse(text) {
            assert_eq!(id.as_str(), text);
            assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
            assert!(id.path().starts_with('/'));
        }
    }
});
