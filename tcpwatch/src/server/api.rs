//! The local API's transport: a unix socket speaking newline-delimited JSON (model::api).
//! Every connection's peer credentials (SO_PEERCRED) are checked before anything else; at
//! most `max_connections` at once; a request line within `request_timeout` and
//! `MAX_REQUEST` bytes; every write within `write_timeout` (a client that stops reading is
//! cut off); streams come through a bounded channel their producer never waits on, so a
//! stalled client only ever holds its own task.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::model::api::{API_VERSION, Failure, MAX_REQUEST, Request};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// The first request must arrive within this.
    pub request_timeout: Duration,
    /// A connection with nothing asked for this long is closed.
    pub idle_timeout: Duration,
    /// Each write must complete within this.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Who is on the other end, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What a request is answered with.
pub enum Answer {
    /// One response line.
    Line(Vec<u8>),
    /// A response line, then the chunks (whole lines) the channel brings, until it closes or
    /// the client hangs up.
    Stream {
        first: Vec<u8>,
        rx: mpsc::Receiver<Vec<u8>>,
    },
}

pub type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The daemon's side of the API.
pub trait Handler: Send + Sync + 'static {
    /// May this peer use the API? `Err` says why not, in a line.
    fn allowed(&self, peer: &Peer) -> Result<(), String>;
    /// The line every accepted connection starts with.
    fn hello(&self) -> Vec<u8>;
    fn handle(&self, peer: Peer, req: Request) -> Pending;
}

/// A failure as a response line.
pub fn failure(error: impl Into<String>) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Failure::new(error)).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Serves until `stop` turns true; an error is a failure of the socket itself.
pub async fn run(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
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
                    // Told why, without waiting for it to read.
                    let mut s = stream;
                    let _ = tokio::time::timeout(
                        Duration::from_millis(100),
                        s.write_all(&failure(
                            "the daemon is serving too many clients; try again",
                        )),
                    )
                    .await;
                    continue;
                };
                let peer = match stream.peer_cred() {
                    Ok(c) => Peer {
                        uid: c.uid(),
                        gid: c.gid(),
                        pid: c.pid(),
                    },
                    Err(_) => continue,
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, handler, limits).await;
                    drop(slot);
                });
            }
            Err(e) if super::transient(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(anyhow::anyhow!("accepting API connections: {e}")),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8], limits: &Limits) -> bool {
    matches!(
        tokio::time::timeout(limits.write_timeout, w.write_all(buf)).await,
        Ok(Ok(()))
    )
}

/// One connection, any byte stream (a unix socket; an in-memory pipe in tests).
pub async fn serve_connection<S>(stream: S, peer: Peer, handler: Arc<dyn Handler>, limits: Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    if let Err(why) = handler.allowed(&peer) {
        let _ = write(&mut wr, &failure(why), &limits).await;
        return;
    }
    if !write(&mut wr, &handler.hello(), &limits).await {
        return;
    }
    let mut rd = BufReader::new(rd);
    let mut first = true;
    loop {
        let wait = if first {
            limits.request_timeout
        } else {
            limits.idle_timeout
        };
        first = false;
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            wait,
            (&mut rd)
                .take(MAX_REQUEST as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await;
        match read {
            Err(_) => {
                let _ = write(&mut wr, &failure("no request in time; closing"), &limits).await;
                return;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
        }
        if line.last() != Some(&b'\n') {
            let msg = if line.len() > MAX_REQUEST {
                format!("a request line is at most {MAX_REQUEST} bytes")
            } else {
                "a request ends with a newline".to_string()
            };
            let _ = write(&mut wr, &failure(msg), &limits).await;
            return;
        }
        let req: Request = match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(v) => {
                let api = v.get("api").and_then(|a| a.as_u64());
                if api != Some(API_VERSION as u64) {
                    let said =
                        api.map_or("no API version".to_string(), |a| format!("API version {a}"));
                    let msg = format!(
                        "this daemon speaks API version {API_VERSION}, the request has {said}: use a tcpwatch of the daemon's version"
                    );
                    let _ = write(&mut wr, &failure(msg), &limits).await;
                    return;
                }
                match serde_json::from_value(v) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ =
                            write(&mut wr, &failure(format!("not a request: {e}")), &limits).await;
                        return;
                    }
                }
            }
            Err(_) => {
                let _ = write(
                    &mut wr,
                    &failure("not JSON: the API speaks one JSON object per line"),
                    &limits,
                )
                .await;
                return;
            }
        };
        match handler.handle(peer, req).await {
            Answer::Line(l) => {
                if !write(&mut wr, &l, &limits).await {
                    return;
                }
            }
            Answer::Stream { first, mut rx } => {
                if !write(&mut wr, &first, &limits).await {
                    return;
                }
                // Until the producer ends or the client hangs up (anything it sends now ends
                // the stream too).
                let mut probe = [0u8; 1];
                loop {
                    tokio::select! {
                        chunk = rx.recv() => match chunk {
                            Some(c) => if !write(&mut wr, &c, &limits).await { return },
                            None => return,
                        },
                        _ = rd.read(&mut probe) => return,
                    }
                }
            }
        }
    }
}
