//! The inbound sidecar's first-bytes parser: any bytes, an answer, never a panic; and a
//! longer prefix never turns a final answer back into "need more".
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_proxy::detect::{Hello, client_hello};

fuzz_target!(|data: &[u8]| {
    let answer = client_hello(data);
    if answer != Hello::NeedMore {
        let mut longer = data.to_vec();
        longer.push(0);
        assert_ne!(client_hello(&longer), Hello::NeedMore);
    }
});
