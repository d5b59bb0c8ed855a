//! Protocol detection on the first bytes of a connection. Pure functions over a buffer:
//! each answers "not yet" while a longer prefix could change the answer.

/// What the first bytes arriving at the inbound listener are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Too few bytes to tell.
    NeedMore,
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS ClientHello; `alpn` lists the protocols it offers (empty when none).
    Tls { alpn: Vec<Vec<u8>> },
}

/// The largest prefix detection looks at; past this, the answer is final.
pub const MAX_SNIFF: usize = 16 * 1024 + 5;

/// Reads a TLS ClientHello from the start of `buf`, far enough to find its ALPN offer.
///
/// Only the first record is read: a ClientHello fragmented over records (which no meshlet
/// sidecar sends) is reported as TLS without ALPN, i.e. not meshlet's.
pub fn client_hello(buf: &[u8]) -> Hello {
    const HANDSHAKE: u8 = 0x16;
    const CLIENT_HELLO: u8 = 0x01;
    const EXT_ALPN: u16 = 0x0010;
    let Some(&first) = buf.first() else {
        return Hello::NeedMore;
    };
    if first != HANDSHAKE {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::NeedMore;
    }
    if buf[1] != 0x03 {
        return Hello::NotTls;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return Hello::NeedMore;
    }
    let no_alpn = Hello::Tls { alpn: vec![] };
    let mut r = Reader(&buf[5..5 + record_len]);
    // handshake header, legacy version, random, session id, cipher suites, compression
    let parsed = (|| {
        if r.u8()? != CLIENT_HELLO {
            return None;
        }
        r.skip(3 + 2 + 32)?;
        let sid = r.u8()?;
        r.skip(usize::from(sid))?;
        let suites = r.u16()?;
        r.skip(usize::from(suites))?;
        let compression = r.u8()?;
        r.skip(usize::from(compression))?;
        let mut exts = r.block16()?;
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let mut data = exts.block16()?;
            if kind == EXT_ALPN {
                let mut list = data.block16()?;
                let mut alpn = Vec::new();
                while !list.0.is_empty() {
                    let len = list.u8()?;
                    alpn.push(list.take(usize::from(len))?.to_vec());
                }
                return Some(alpn);
            }
        }
        Some(vec![])
    })();
    match parsed {
        Some(alpn) => Hello::Tls { alpn },
        None => no_alpn,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A block prefixed by its 16-bit length.
    fn block16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(Reader)
    }
}

/// The application protocol of a plaintext stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];
/// The longest HTTP/1 request line we wait for before calling the stream opaque.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Detects HTTP/1.1 (a known method, then a request line ending in `HTTP/1.x`), HTTP/2
/// (the prior-knowledge preface), or anything else. `None` means "need more bytes".
/// CONNECT is treated as opaque: it tunnels.
pub fn protocol(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    let method_prefix = METHODS
        .iter()
        .any(|m| m.starts_with(buf) || buf.starts_with(m));
    if !method_prefix {
        return Some(Protocol::Opaque);
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
            let http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
            Some(if http1 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            })
        }
        None if buf.len() >= MAX_REQUEST_LINE => Some(Protocol::Opaque),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello as rustls writes it, offering `alpn`.
    fn rustls_hello(alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("x.invalid").expect("valid name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to a Vec");
        }
        out
    }

    #[test]
    fn client_hellos_are_recognised_with_their_alpn() {
        let mesh = rustls_hello(&[b"meshlet/1"]);
        let h2 = rustls_hello(&[b"h2", b"http/1.1"]);
        let none = rustls_hello(&[]);
        let cases: Vec<(&str, Vec<u8>, Hello)> = vec![
            (
                "meshlet",
                mesh.clone(),
                Hello::Tls {
                    alpn: vec![b"meshlet/1".to_vec()],
                },
            ),
            (
                "browser",
                h2,
                Hello::Tls {
                    alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                },
            ),
            ("no alpn", none, Hello::Tls { alpn: vec![] }),
            ("partial record", mesh[..100].to_vec(), Hello::NeedMore),
            ("record header only", mesh[..5].to_vec(), Hello::NeedMore),
            ("one byte", vec![0x16], Hello::NeedMore),
            ("empty", vec![], Hello::NeedMore),
            ("http", b"GET / HTTP/1.1\r\n".to_vec(), Hello::NotTls),
            ("ssh", b"SSH-2.0-OpenSSH\r\n".to_vec(), Hello::NotTls),
            ("not tls version", vec![0x16, 0x01, 0, 0, 0], Hello::NotTls),
            (
                "not a client hello",
                vec![0x16, 0x03, 0x01, 0, 4, 0x02, 0, 0, 0],
                Hello::Tls { alpn: vec![] },
            ),
            (
                "truncated alpn list",
                vec![0x16, 0x03, 0x01, 0, 2, 0x01, 0],
                Hello::Tls { alpn: vec![] },
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(client_hello(&bytes), want, "{name}");
        }
    }

    #[test]
    fn every_prefix_of_a_hello_is_need_more_and_never_panics() {
        let hello = rustls_hello(&[b"meshlet/1"]);
        for n in 1..hello.len() {
            assert_eq!(client_hello(&hello[..n]), Hello::NeedMore, "prefix {n}");
        }
        // Corrupt lengths anywhere: an answer, never a panic.
        for i in 5..hello.len() {
            let mut bad = hello.clone();
            bad[i] = 0xff;
            let _ = client_hello(&bad);
        }
    }

    #[test]
    fn protocols_are_detected_from_prefixes() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"GET / HTTP/1.1\r\nHost: x\r\n", Some(Protocol::Http1)),
            (b"POST /a?b HTTP/1.0\r\n", Some(Protocol::Http1)),
            (b"DELETE /x HTTP/1.1\n", Some(Protocol::Http1)),
            (b"GET / HTTP/1.1", None),
            (b"GE", None),
            (b"GET /", None),
            (b"GET / SPDY/3\r\n", Some(Protocol::Opaque)),
            (b"CONNECT example:443 HTTP/1.1\r\n", Some(Protocol::Opaque)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Some(Protocol::Http2),
            ),
            (b"PRI * HTTP/2", None),
            (b"PRI * HTTP/1.1\r\n\r\nxx\r\n\r\n", Some(Protocol::Opaque)),
            (b"\x16\x03\x01", Some(Protocol::Opaque)),
            (b"hello world\n", Some(Protocol::Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Protocol::Opaque)),
            (b"", None),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                protocol(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(protocol(&long), Some(Protocol::Opaque));
    }
}
