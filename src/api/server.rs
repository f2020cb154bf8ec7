//! The control thread's event loop: a tokio-uring runtime that accepts connections on the
//! API socket and serves each in a task of its own, with bounded buffers and deadlines, so
//! a slow or silent client holds only its own connection.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_uring::net::UnixStream;

use super::http::{self, HttpError, Parse, Response};
use super::routes::{route, Control};

/// How long a client may take to send a whole request once it started one.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// How long a kept-alive connection may stay silent between requests.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// How long writing a response may take (a client that does not read).
pub const WRITE_TIMEOUT_MS: u64 = 5_000;
/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// Bytes asked for per read.
const READ_CHUNK: usize = 4096;

enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Whichever of `a` and `b` finishes first (`a` when both are ready).
async fn first<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

/// Accepts until `shutdown` fires (or its sender is dropped). Connections are accepted
/// through tokio's readiness driver (tokio-uring 0.5 cannot bind a Unix listener on current
/// kernels, see `bind` in mod.rs) and served through io_uring.
pub(super) async fn serve(
    listener: std::os::unix::net::UnixListener,
    ctl: Arc<dyn Control + Send + Sync>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("api: cannot watch the listening socket: {e}");
            return;
        }
    };
    let active = Rc::new(Cell::new(0usize));
    loop {
        let accepted = first(listener.accept(), &mut shutdown).await;
        let stream = match accepted {
            Either::Right(_) => return,
            Either::Left(Ok((s, _))) => match s.into_std() {
                Ok(s) => UnixStream::from_std(s),
                Err(e) => {
                    log::warn!("api: cannot take over a connection: {e}");
                    continue;
                }
            },
            Either::Left(Err(e)) => {
                // Out of file descriptors and the like: back off instead of spinning.
                log::warn!("api: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            tokio_uring::spawn(async move {
                let r = Response::error(503, "Too many connections to the API socket");
                write(&stream, r.to_bytes(true)).await;
            });
            continue;
        }
        active.set(active.get() + 1);
        let (ctl, active) = (ctl.clone(), active.clone());
        tokio_uring::spawn(async move {
            connection(&stream, &*ctl).await;
            let _ = stream.shutdown(std::net::Shutdown::Both);
            active.set(active.get() - 1);
        });
    }
}

async fn write(stream: &UnixStream, bytes: Vec<u8>) -> bool {
    let w = tokio::time::timeout(
        Duration::from_millis(WRITE_TIMEOUT_MS),
        stream.write_all(bytes),
    );
    matches!(w.await, Ok((Ok(()), _)))
}

/// Serves the requests of one connection until the client closes it, asks to, errs or
/// times out.
async fn connection(stream: &UnixStream, ctl: &dyn Control) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        // Idle between requests; once a request's first byte is in, it has REQUEST_TIMEOUT.
        let mut deadline = (!buf.is_empty())
            .then(|| tokio::time::Instant::now() + Duration::from_millis(REQUEST_TIMEOUT_MS));
        let parsed = loop {
            match http::parse(&buf) {
                Ok(Parse::Incomplete) => {}
                other => break other,
            }
            let until = deadline.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_millis(IDLE_TIMEOUT_MS)
            });
            match tokio::time::timeout_at(until, stream.read(std::mem::take(&mut chunk))).await {
                Err(_) if buf.is_empty() => return,
                Err(_) => break Err(HttpError::Timeout(REQUEST_TIMEOUT_MS)),
                Ok((Ok(0), _)) | Ok((Err(_), _)) => return,
                Ok((Ok(n), c)) => {
                    buf.extend_from_slice(&c[..n]);
                    chunk = c;
                    deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + Duration::from_millis(REQUEST_TIMEOUT_MS)
                    });
                }
            }
        };
        match parsed {
            Ok(Parse::Done(req, used)) => {
                let resp = route(&req, ctl);
                if !write(stream, resp.to_bytes(req.close)).await || req.close {
                    return;
                }
                buf.drain(..used);
            }
            Ok(Parse::Incomplete) => unreachable!("the read loop only ends on a result"),
            Err(e) => {
                // The stream is out of step after a bad request: answer and close.
                let _ = write(
                    stream,
                    Response::error(e.status(), &e.to_string()).to_bytes(true),
                )
                .await;
                return;
            }
        }
    }
}
