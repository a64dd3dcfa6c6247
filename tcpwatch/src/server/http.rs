//! The HTTP endpoint: hyper on a tokio runtime. One task per connection, at most
//! `max_connections` of them (more are closed at once), headers within `header_timeout` and
//! `max_header_bytes`, each connection at most `lifetime` long, request bodies never read (a
//! request with one is answered and its connection closed). A scrape waits for the metrics
//! text from the thread that keeps the model; a slow or stalled client only ever holds its
//! own task.
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, TRANSFER_ENCODING};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

/// What one client may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// A request's headers must arrive within this (also the idle time between requests).
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// A connection ends after this, whatever it is doing (Prometheus reconnects).
    pub lifetime: Duration,
    /// How long a scrape waits for the metrics text before it is answered 503.
    pub render_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 16 << 10,
            lifetime: Duration::from_secs(60),
            render_timeout: Duration::from_secs(10),
        }
    }
}

/// Asks for the metrics text: `None` when the model thread cannot take the request now.
pub type Render = Arc<dyn Fn() -> Option<oneshot::Receiver<String>> + Send + Sync>;

/// Connections refused because `max_connections` were open (shown in the metrics).
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Serves until `stop` turns true. An error is a failure of the endpoint itself (the listening
/// socket broke): the caller exits non-zero.
pub async fn run(
    listener: TcpListener,
    render: Render,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                };
                let render = render.clone();
                tokio::spawn(async move {
                    serve_connection(stream, render, limits).await;
                    drop(slot);
                });
            }
            // Out of descriptors or memory, or a client that gave up while queued: the
            // listener itself is fine; wait a little and go on.
            Err(e) if transient(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(anyhow::anyhow!("accepting HTTP connections: {e}")),
        }
    }
}

/// As for the API socket, and EPERM: a TCP connection a firewall refused while queued.
fn transient(e: &std::io::Error) -> bool {
    super::transient(e) || e.raw_os_error() == Some(libc::EPERM)
}

/// Serves one connection, any byte stream (a TCP socket; an in-memory pipe for the fuzzer).
pub async fn serve_connection<T>(stream: T, render: Render, limits: Limits)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let svc = service_fn(move |req| handle(req, render.clone(), limits));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true)
        .serve_connection(io, svc);
    // Whatever the client does (never reads, sends forever), the connection ends.
    let _ = tokio::time::timeout(limits.lifetime, conn).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn handle(
    req: Request<Incoming>,
    render: Render,
    limits: Limits,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // The body is never read, whatever length it announces: answer, then close.
    let has_body = req.headers().contains_key(TRANSFER_ENCODING)
        || req
            .headers()
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match render() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n", PLAIN),
            Some(rx) => match tokio::time::timeout(limits.render_timeout, rx).await {
                Ok(Ok(body)) => text(StatusCode::OK, body, EXPOSITION),
                _ => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metrics not ready\n",
                    PLAIN,
                ),
            },
        },
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n", PLAIN),
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "tcpwatch: metrics at /metrics, health at /healthz\n",
            PLAIN,
        ),
        (&Method::GET | &Method::HEAD, _) => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n",
            PLAIN,
        ),
    };
    if has_body {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn server(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let render: Render = Arc::new(|| {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send("tcpwatch_up 1\n".to_string());
            Some(rx)
        });
        tokio::spawn(run(l, render, limits, rx));
        (addr, tx)
    }

    async fn get(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn huge_content_lengths_are_answered_and_closed() {
        rt().block_on(async {
            let (addr, _stop) = server(Limits::default()).await;
            for len in [
                "4611686018427387904",
                "18446744073709551615",
                "99999999999999999999",
            ] {
                let r = get(
                    addr,
                    format!("GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
                        .as_bytes(),
                )
                .await;
                // Answered (the body is never read), refused as malformed, or closed.
                assert!(
                    r.is_empty() || r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.1 4"),
                    "{len}: {r}"
                );
            }
            let r = get(
                addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.contains("tcpwatch_up 1"), "{r}");
        });
    }

    #[test]
    fn other_methods_and_paths() {
        rt().block_on(async {
            let (addr, _stop) = server(Limits::default()).await;
            let r = get(
                addr,
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 405"), "{r}");
            let r = get(
                addr,
                b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 404"), "{r}");
            let r = get(
                addr,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.ends_with("ok\n"), "{r}");
        });
    }

    #[test]
    fn a_stalled_client_is_cut_and_holds_nobody_else() {
        rt().block_on(async {
            let limits = Limits {
                header_timeout: Duration::from_millis(300),
                ..Limits::default()
            };
            let (addr, _stop) = server(limits).await;
            // Half a request line, then nothing.
            let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
            stalled.write_all(b"GET /met").await.unwrap();
            let t = std::time::Instant::now();
            let r = get(
                addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.contains("tcpwatch_up 1"), "{r}");
            assert!(
                t.elapsed() < Duration::from_millis(250),
                "{:?}",
                t.elapsed()
            );
            // The stalled one is closed by the header timeout.
            let mut buf = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(3), stalled.read_to_end(&mut buf))
                .await
                .expect("closed within the timeout");
            assert!(n.is_ok());
        });
    }

    #[test]
    fn connections_beyond_the_cap_are_closed_at_once() {
        rt().block_on(async {
            let limits = Limits {
                max_connections: 4,
                ..Limits::default()
            };
            let (addr, _stop) = server(limits).await;
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(r, "", "the fifth is closed without an answer");
            drop(held);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = get(
                addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.contains("tcpwatch_up 1"), "{r}");
        });
    }
}
