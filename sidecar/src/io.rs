//! Stream helpers: read the first bytes of a connection within a time box, then replay
//! them to whoever handles the connection next.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A stream whose first bytes were already read: they are replayed before the rest.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Self { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Frees the sniffing buffer (4 KiB) that would otherwise live as long as
                // the connection.
                self.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads from `stream` into `buf` until `enough` says the bytes read so far decide the
/// matter, the peer stops sending (EOF), `limit` bytes were read, or `time_box` passes. A
/// peer that waits for the other side to speak first simply runs into the time box.
///
/// Returns whether the peer has closed its side (EOF).
///
/// Cancel-safe: bytes already read are in `buf`, none are lost.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    time_box: Duration,
    limit: usize,
    enough: impl Fn(&[u8]) -> bool,
) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + time_box;
    while !enough(buf) && buf.len() < limit {
        let want = (limit - buf.len()).min(4096);
        buf.reserve(want);
        let mut chunk = (&mut *stream).take(want as u64);
        match tokio::time::timeout_at(deadline, chunk.read_buf(buf)).await {
            Err(_elapsed) => break,
            Ok(Ok(0)) => return Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(false)
}

/// A stream that counts the bytes read from and written to it.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    count: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.count.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_before_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap_or_default();
        let mut buf = BytesMut::new();
        sniff(&mut b, &mut buf, Duration::from_secs(5), 1024, |buf| {
            buf.contains(&b'\n')
        })
        .await
        .expect("reading from a duplex");
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
        a.write_all(b"rest").await.unwrap_or_default();
        drop(a);
        let mut all = Vec::new();
        let mut s = Prefixed::new(buf, b);
        s.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"GET / HTTP/1.1\r\nrest");
    }

    #[tokio::test]
    async fn the_prefix_buffer_is_freed_once_replayed() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut prefix = BytesMut::with_capacity(4096);
        prefix.extend_from_slice(b"0123456789");
        let mut s = Prefixed::new(prefix, b);
        // Replayed over three reads: the buffer is kept until its last byte is out.
        let mut part = [0u8; 4];
        for want in [&b"0123"[..], b"4567"] {
            let n = s.read(&mut part).await.expect("read from the prefix");
            assert_eq!(&part[..n], want);
            assert!(s.prefix.capacity() > 0);
        }
        let n = s.read(&mut part).await.expect("read from the prefix");
        assert_eq!(&part[..n], b"89");
        assert_eq!(
            s.prefix.capacity(),
            0,
            "an idle connection keeps no sniffing buffer"
        );
        a.write_all(b"ab").await.expect("write to a duplex");
        let n = s.read(&mut part).await.expect("read from the stream");
        assert_eq!(&part[..n], b"ab");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_runs_into_the_time_box() {
        let (_a, mut b) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        sniff(&mut b, &mut buf, Duration::from_millis(300), 1024, |buf| {
            !buf.is_empty()
        })
        .await
        .expect("no error");
        assert!(buf.is_empty());
        drop(_a);
        let closed = sniff(&mut b, &mut buf, Duration::from_millis(300), 1024, |buf| {
            !buf.is_empty()
        })
        .await
        .expect("no error");
        assert!(closed, "EOF is told apart from silence");
    }
}
