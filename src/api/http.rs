//! A small, strict HTTP/1.1 request parser and response writer for the control plane.
//!
//! Only what the API needs: a request line, headers, and a body sized by `Content-Length`
//! (no chunked transfer encoding), with hard limits on the header block and the body so a
//! client cannot make the control thread buffer without bound. The parser is pure (bytes
//! in, request or error out); the server (`server.rs`) does the reading and the timeouts.

use std::fmt::Write as _;

/// Largest request line plus headers, up to and including the blank line.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// Most header lines in one request.
const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after the response (or spoke HTTP/1.0
    /// without keep-alive).
    pub close: bool,
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole request yet: read more.
    Incomplete,
    /// A request, and how many bytes of the buffer it used (the rest is the next request).
    Done(Request, usize),
}

/// Why a request was refused before routing. Every variant maps to a 4xx/5xx status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("Request line and headers exceed {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge,
    #[error("Body of {len} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge { len: u64 },
    #[error("Malformed request line (expected `METHOD /path HTTP/1.1`)")]
    BadRequestLine,
    #[error("Unsupported HTTP version {0} (only HTTP/1.0 and HTTP/1.1)")]
    BadVersion(String),
    #[error("Malformed header line")]
    BadHeader,
    #[error("More than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("Invalid Content-Length header")]
    BadContentLength,
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
    #[error("Request not complete within {0} ms")]
    Timeout(u64),
}

impl HttpError {
    /// The status the server answers with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeaderTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::BadVersion(_) => 505,
            HttpError::TransferEncoding => 501,
            HttpError::Timeout(_) => 408,
            _ => 400,
        }
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8]) -> Result<Parse, HttpError> {
    let Some(end) = find_blank_line(buf) else {
        if buf.len() > MAX_HEADER_BYTES {
            return Err(HttpError::HeaderTooLarge);
        }
        return Ok(Parse::Incomplete);
    };
    let head_len = end + 4;
    if head_len > MAX_HEADER_BYTES {
        return Err(HttpError::HeaderTooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::BadHeader)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if !is_token(method) || !target.starts_with('/') || target.bytes().any(|b| b <= b' ') {
        return Err(HttpError::BadRequestLine);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(HttpError::BadVersion(v.to_string())),
        _ => return Err(HttpError::BadRequestLine),
    };
    let mut content_length: Option<u64> = None;
    let mut close = http10;
    for (n, h) in lines.enumerate() {
        if n >= MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let (name, value) = h.split_once(':').ok_or(HttpError::BadHeader)?;
        if !is_token(name) {
            return Err(HttpError::BadHeader);
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadContentLength);
            }
            let v: u64 = value.parse().map_err(|_| HttpError::BadContentLength)?;
            if content_length.is_some_and(|c| c != v) {
                return Err(HttpError::BadContentLength);
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge { len });
    }
    let total = head_len + len as usize;
    if buf.len() < total {
        return Ok(Parse::Incomplete);
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Parse::Done(
        Request {
            method: method.to_string(),
            path,
            body: buf[head_len..total].to_vec(),
            close,
        },
        total,
    ))
}

/// A response to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The methods a path allows (the `Allow` header of a 405).
    pub allow: Option<&'static str>,
}

pub const JSON: &str = "application/json";
/// Prometheus text exposition format 0.0.4.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Response {
            status,
            content_type: JSON,
            body,
            allow: None,
        }
    }

    /// A JSON body `{"error": message, "status": status}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({ "error": message, "status": status }),
        )
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
            allow: None,
        }
    }

    /// The response as bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// The reason phrase of the statuses the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(raw: &str) -> (Request, usize) {
        match parse(raw.as_bytes()) {
            Ok(Parse::Done(r, n)) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_parse_get_without_body_is_done_and_keeps_alive() {
        let (r, n) = done("GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /vm");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        assert!(!r.close && r.body.is_empty());
        assert_eq!(n, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n".len());
    }

    #[test]
    fn test_parse_body_waits_for_content_length_bytes() {
        let raw = "PATCH /disks/blk0 HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"poll_us\": 5}";
        assert_eq!(parse(raw.as_bytes()), Ok(Parse::Incomplete));
        let (r, _) = done(&format!("{raw}\n"));
        assert_eq!(r.body, b"{\"poll_us\": 5}\n");
    }

    #[test]
    fn test_parse_incomplete_head_is_incomplete_until_limit() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Parse::Incomplete));
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEADER_BYTES));
        assert_eq!(parse(big.as_bytes()), Err(HttpError::HeaderTooLarge));
    }

    #[test]
    fn test_parse_oversized_body_fails_before_it_arrives() {
        let raw = "PUT /x HTTP/1.1\r\nContent-Length: 999999\r\n\r\n";
        let e = parse(raw.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn test_parse_bad_inputs_get_their_status() {
        for (raw, status) in [
            ("GARBAGE\r\n\r\n", 400),
            ("GET noslash HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET / HTTP/1.1 extra\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("GET / HTTP/1.1\r\nX: \u{e9}\r\n\r\n", 200),
        ] {
            let got = match parse(raw.as_bytes()) {
                Ok(Parse::Done(..)) => 200,
                Ok(Parse::Incomplete) => 0,
                Err(e) => e.status(),
            };
            assert_eq!(got, status, "{raw:?}");
        }
        let many: String = (0..40).map(|i| format!("X{i}: y\r\n")).collect();
        let e = parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
        assert_eq!(e, HttpError::TooManyHeaders);
    }

    #[test]
    fn test_parse_connection_close_and_http10_close() {
        assert!(done("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").0.close);
        assert!(done("GET / HTTP/1.0\r\n\r\n").0.close);
        assert!(
            !done("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .close
        );
    }

    #[test]
    fn test_response_bytes_carry_length_allow_and_close() {
        let mut r = Response::error(405, "no");
        r.allow = Some("GET");
        let s = String::from_utf8(r.to_bytes(true)).unwrap();
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{s}");
        assert!(s.contains("Allow: GET\r\n") && s.contains("Connection: close\r\n"));
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        assert!(s.contains(&format!("Content-Length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "no");
    }
}
