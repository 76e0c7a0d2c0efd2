//! A small HTTP/1.1 server for the metrics endpoint and the dashboard.
//!
//! Requests are parsed by `httparse`; each connection serves one request
//! and closes (what Prometheus and a browser need here, with nothing to
//! keep per connection). Bounded everywhere: the request head, the body,
//! the time to send them and the connections at once. Bad input gets a
//! 400 and the server keeps serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head (request line and headers).
pub const HEAD_BYTES_MAX: usize = 16 << 10;
/// Largest request body.
pub const BODY_BYTES_MAX: usize = 64 << 10;
/// Longest a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a response may take to go out.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;
/// Headers read at most.
const HEADERS_MAX: usize = 64;

/// A request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string (after `?`), undecoded.
    pub query: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The peer.
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// A header's value (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        form_value(&self.query, name)
    }

    /// A field of a form body (`application/x-www-form-urlencoded`).
    pub fn form(&self, name: &str) -> Option<String> {
        form_value(&String::from_utf8_lossy(&self.body), name)
    }
}

/// The value of `name` in `a=1&b=2`, percent-decoded.
pub fn form_value(encoded: &str, name: &str) -> Option<String> {
    encoded
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| decode(k) == name)
        .map(|(_, v)| decode(v))
}

/// Percent-decoding, with `+` as a space; bad escapes are kept as they are.
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Extra headers (`Content-Length` and `Connection` are added).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `body` of `content_type`.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// Plain text.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into())
    }

    /// A header added.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// A redirect to `location`.
    pub fn redirect(location: &str) -> Self {
        Self::text(303, "").with_header("Location", location)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What answers requests.
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// A listener on `ip:port`; when that port is taken and `fallback`, on a
/// free port instead.
pub async fn bind(ip: std::net::IpAddr, port: u16, fallback: bool) -> std::io::Result<TcpListener> {
    match TcpListener::bind(SocketAddr::new(ip, port)).await {
        Ok(listener) => Ok(listener),
        Err(e) if fallback && port != 0 => {
            tracing::info!(port, error = %e, "port taken; serving HTTP on a free port");
            TcpListener::bind(SocketAddr::new(ip, 0)).await
        }
        Err(e) => Err(e),
    }
}

/// Serves `handler` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "accepting an HTTP connection failed");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let _permit = permit;
            serve_one(stream, peer, handler).await;
        });
    }
}

/// Why a request could not be read.
#[derive(Debug)]
enum ReadError {
    /// Answer with this status.
    Bad(u16, String),
    /// The client went away or was too slow: nothing to answer.
    Gone,
}

async fn serve_one(mut stream: TcpStream, peer: SocketAddr, handler: Handler) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(mut request)) => {
            request.peer = Some(peer);
            // The handler may read the head's tables: off the I/O threads.
            let handler = Arc::clone(&handler);
            match tokio::task::spawn_blocking(move || handler(request)).await {
                Ok(response) => response,
                Err(_) => Response::text(500, "the handler failed\n"),
            }
        }
        Ok(Err(ReadError::Bad(status, why))) => Response::text(status, format!("{why}\n")),
        Ok(Err(ReadError::Gone)) | Err(_) => return,
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write_response(&mut stream, &response)).await;
}

async fn read_request(stream: &mut TcpStream) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| ReadError::Gone)?;
        if n == 0 {
            return Err(ReadError::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let target = parsed.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let mut request = Request {
                    method: parsed.method.unwrap_or("GET").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    body: Vec::new(),
                    peer: None,
                };
                let length = match request.header("content-length") {
                    None => 0,
                    Some(v) => v.trim().parse::<usize>().map_err(|_| {
                        ReadError::Bad(400, format!("Content-Length {v:?} is not a number"))
                    })?,
                };
                if length > BODY_BYTES_MAX {
                    return Err(ReadError::Bad(
                        413,
                        format!("a body of {length} bytes; at most {BODY_BYTES_MAX}"),
                    ));
                }
                let mut body = buf.split_off(head_len);
                while body.len() < length {
                    let n = stream.read(&mut chunk).await.map_err(|_| ReadError::Gone)?;
                    if n == 0 {
                        return Err(ReadError::Gone);
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(length);
                request.body = body;
                return Ok(request);
            }
            Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ReadError::Bad(
                    431,
                    format!("the request head is over {HEAD_BYTES_MAX} bytes"),
                ))
            }
            Err(e) => return Err(ReadError::Bad(400, format!("bad request: {e}"))),
        }
    }
}

async fn write_response(stream: &mut TcpStream, response: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        // A value never splits the head.
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&response.body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value("a=1&token=ab%2Bc+d&x", "token").as_deref(),
            Some("ab+c d")
        );
        assert_eq!(form_value("x", "x").as_deref(), Some(""));
        assert_eq!(form_value("a=1", "b"), None);
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert_eq!(decode("%e2%82%ac"), "€");
    }

    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw).await.expect("write");
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn requests_are_answered_and_bad_ones_refused_while_serving_on() {
        let listener = bind("127.0.0.1".parse().expect("ip"), 0, false)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler: Handler = Arc::new(|r: Request| {
            let body = format!(
                "{} {} q={:?} c={:?} f={:?}",
                r.method,
                r.path,
                r.param("q"),
                r.cookie("k"),
                r.form("f")
            );
            Response::text(200, body)
        });
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, handler, shutdown.clone()));
        let ok = exchange(addr, b"GET /x?q=a%20b HTTP/1.1\r\nCookie: j=1; k=v\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.ends_with("GET /x q=Some(\"a b\") c=Some(\"v\") f=None"),
            "{ok}"
        );
        let post = exchange(
            addr,
            b"POST /login HTTP/1.1\r\nContent-Length: 5\r\n\r\nf=abc",
        )
        .await;
        assert!(post.ends_with("f=Some(\"abc\")"), "{post}");
        let garbage = exchange(addr, b"\x00\x01 nonsense\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(HEAD_BYTES_MAX)
        );
        let huge = exchange(addr, huge.as_bytes()).await;
        assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
        let big_body = exchange(
            addr,
            b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
        )
        .await;
        assert!(big_body.starts_with("HTTP/1.1 413"), "{big_body}");
        // Still serving.
        let again = exchange(addr, b"GET /again HTTP/1.1\r\n\r\n").await;
        assert!(again.contains("GET /again"), "{again}");
        shutdown.cancel();
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_taken_port_falls_back_to_a_free_one_when_asked() {
        let ip = "127.0.0.1".parse().expect("ip");
        let first = bind(ip, 0, false).await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        assert!(bind(ip, port, false).await.is_err());
        let second = bind(ip, port, true).await.expect("fallback");
        assert_ne!(second.local_addr().expect("addr").port(), port);
    }
}
