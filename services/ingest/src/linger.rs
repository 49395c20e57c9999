//! Lingering close: a refused request's answer reaches its client.
//!
//! A request refused before its body is read (401, 413, 415, …) leaves the
//! rest of the body in flight. Closing a socket that still has unread data
//! makes the kernel send a reset instead of an orderly end, and a reset that
//! overtakes the answer discards it at the client: the producer sees
//! "connection reset" instead of the problem+json that says what was wrong.
//! Like nginx's `lingering_close`, a connection that the server ends first
//! half-closes its side (the answer is already written, so the client reads
//! it and an end of stream), then reads and drops what the client still
//! sends until the client closes too, for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How long a closing connection waits for its client to stop sending.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// How much of an unread body a closing connection reads and drops.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A TCP listener whose connections linger on close.
pub struct LingeringListener(pub TcpListener);

impl axum::serve::Listener for LingeringListener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Lingering, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        (Lingering { io, state: State::Open }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// One accepted connection.
pub struct Lingering {
    io: TcpStream,
    state: State,
}

enum State {
    Open,
    Draining { deadline: Pin<Box<Sleep>>, drained: usize },
    Closed,
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// Half-closes, then drains the client's remaining bytes before the
    /// socket is dropped.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open => {
                    let shut = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
                    if shut.is_err() {
                        this.state = State::Closed;
                        return Poll::Ready(shut);
                    }
                    this.state = State::Draining { deadline: Box::pin(tokio::time::sleep(LINGER_TIME)), drained: 0 };
                }
                State::Draining { deadline, drained } => {
                    if deadline.as_mut().poll(cx).is_ready() || *drained > LINGER_BYTES {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 16 * 1024];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.io).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() => *drained += buf.filled().len(),
                        // The client's end of stream, or its reset: done.
                        _ => this.state = State::Closed,
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends an 8 MiB body to a route that refuses without reading it, the
    /// whole body first and then reads the answer, as a simple client does.
    async fn refused_upload(lingering: bool) -> io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router =
            axum::Router::new().route("/", post(|| async { (axum::http::StatusCode::UNAUTHORIZED, "refused unread") }));
        let server = if lingering {
            tokio::spawn(async move { axum::serve(LingeringListener(listener), router).await })
        } else {
            tokio::spawn(async move { axum::serve(listener, router).await })
        };
        let body = vec![b'a'; 8 * 1024 * 1024];
        let mut client = TcpStream::connect(addr).await?;
        let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
        let answer = async {
            client.write_all(head.as_bytes()).await?;
            client.write_all(&body).await?;
            let mut answer = String::new();
            client.read_to_string(&mut answer).await?;
            Ok(answer)
        }
        .await;
        server.abort();
        answer
    }

    #[tokio::test]
    async fn a_body_refused_unread_still_gets_its_answer() {
        let answer = refused_upload(true).await.expect("the client sent its body and read the answer");
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.ends_with("refused unread"), "{answer}");
    }

    /// The reason for this module: without it the same client is reset.
    #[tokio::test]
    async fn without_lingering_the_same_client_is_reset() {
        let error = refused_upload(false).await.expect_err("a plain listener resets the connection");
        assert!(matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{error:?}");
    }
}
