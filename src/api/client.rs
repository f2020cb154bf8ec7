//! A blocking client for the API socket (`ringvm ctl`, tests): one request per connection
//! ([`request`]), or many on one kept-alive connection ([`Session`], `ringvm ctl … --every`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the client waits for an answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response the client reads (a `/stats` of many queues is a few MiB at most).
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot connect to {path} (is ringvm running with --api-socket {path}?)", path = path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Lost the connection to the API socket")]
    Io(#[from] std::io::Error),
    #[error("Malformed response from the API socket: {0}")]
    Malformed(String),
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// The `error` field of a JSON error body, else the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.trim().to_string())
    }
}

/// Sends `method path` with an optional JSON body and reads the whole response.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: ringvm\r\nConnection: close\r\n");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw)?;
    parse_reply(&raw)
}

/// One kept-alive connection for repeated `GET`s (a scraper): the request bytes and the
/// receive buffer are reused, so a scrape costs one write and the reads of its answer.
pub struct Session {
    stream: UnixStream,
    buf: Vec<u8>,
    /// The request being sent, built here first so that it leaves in one write: a
    /// `write!` straight to the socket sends each piece of the format on its own, and each
    /// wakes the server again.
    request: Vec<u8>,
}

impl Session {
    /// Connects to `socket`.
    pub fn connect(socket: &Path) -> Result<Session, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Session {
            stream,
            buf: vec![0; 64 << 10],
            request: Vec::with_capacity(256),
        })
    }

    /// Sends `GET path` and returns the status and the body (valid until the next call).
    pub fn get(&mut self, path: &str) -> Result<(u16, &[u8]), ClientError> {
        let bad = |m: &str| ClientError::Malformed(m.to_string());
        self.request.clear();
        write!(self.request, "GET {path} HTTP/1.1\r\nHost: ringvm\r\n\r\n")?;
        self.stream.write_all(&self.request)?;
        let mut filled = 0;
        let (end, status, len) = loop {
            if let Some(end) = self.buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| bad("headers are not UTF-8"))?;
                let status = status_of(head).ok_or_else(|| bad("no status code"))?;
                let len = content_length(head).ok_or_else(|| bad("no Content-Length"))?;
                break (end, status, len);
            }
            filled = self.fill(filled)?;
        };
        let want = end + 4 + len;
        if want as u64 > MAX_RESPONSE_BYTES {
            return Err(bad("response larger than the client reads"));
        }
        while filled < want {
            filled = self.fill(filled)?;
        }
        if filled > want {
            return Err(bad("more bytes than one answer"));
        }
        Ok((status, &self.buf[end + 4..want]))
    }

    /// Reads more of the answer after the `filled` bytes already in the buffer.
    fn fill(&mut self, filled: usize) -> Result<usize, ClientError> {
        if self.buf.len() < filled + 16384 {
            let grown = (filled + 16384).max(2 * self.buf.len());
            self.buf.resize(grown, 0);
        }
        match self.stream.read(&mut self.buf[filled..])? {
            0 => Err(ClientError::Malformed(
                "the VM closed the API connection".to_string(),
            )),
            n => Ok(filled + n),
        }
    }
}

fn status_of(head: &str) -> Option<u16> {
    head.split(' ').nth(1).and_then(|s| s.parse().ok())
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })
}

fn parse_reply(raw: &[u8]) -> Result<Reply, ClientError> {
    let bad = |m: &str| ClientError::Malformed(m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let status = status_of(head).ok_or_else(|| bad("no status code"))?;
    let len = content_length(head).ok_or_else(|| bad("no Content-Length"))?;
    let body = raw
        .get(end + 4..end + 4 + len)
        .ok_or_else(|| bad("body shorter than Content-Length"))?;
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_reply_reads_status_and_sized_body() {
        let r = parse_reply(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 15\r\n\r\n{\"error\":\"x\"}\n\nextra",
        )
        .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.error_message(), "x");
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
    }

    #[test]
    fn test_request_to_missing_socket_says_what_to_do() {
        let e = request(Path::new("/nonexistent/api.sock"), "GET", "/vm", None).unwrap_err();
        assert!(e.to_string().contains("--api-socket"), "{e}");
    }
}
