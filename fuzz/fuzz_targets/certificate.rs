//! Peer certificate handling (X509-SVID leaf rules, summaries) on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data);
    let _ = meshlet_identity::cert::svid_id(&der);
    let _ = meshlet_identity::cert::summarize(data);
});
