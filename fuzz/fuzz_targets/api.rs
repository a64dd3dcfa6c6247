//! Arbitrary bytes from a client at the daemon's API socket: served or refused without a
//! panic, every answer line JSON, the connection ended within its limits.
#![no_main]
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tcpwatch::model::api::Request;
use tcpwatch::server::api::{Answer, Handler, Limits, Peer, Pending, serve_connection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Answers every request with one line, or a short stream for a subscription.
struct Echo;

impl Handler for Echo {
    fn allowed(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid == 7 {
            Err("no".into())
        } else {
            Ok(())
        }
    }

    fn hello(&self) -> Vec<u8> {
        b"{\"service\":\"tcpwatch\",\"api\":1}\n".to_vec()
    }

    fn handle(&self, _peer: Peer, req: Request) -> Pending {
        Box::pin(async move {
            let line = format!("{{\"ok\":true,\"op\":{:?}}}\n", format!("{:?}", req.op).len());
            if matches!(req.op, tcpwatch::model::api::Op::Subscribe { .. }) {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(async move {
                    for _ in 0..3 {
                        let _ = tx.send(b"{\"type\":\"state\"}\n".to_vec()).await;
                    }
                });
                Answer::Stream {
                    first: line.into_bytes(),
                    rx,
                }
            } else {
                Answer::Line(line.into_bytes())
            }
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        request_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        write_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let uid = data.first().copied().unwrap_or(0) as u32 & 7;
    let input = data.get(1..).unwrap_or_default().to_vec();
    rt().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let h: Arc<dyn Handler> = Arc::new(Echo);
        let peer = Peer {
            uid,
            gid: 0,
            pid: None,
        };
        let task = tokio::spawn(serve_connection(server, peer, h, limits));
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection outlived its limits");
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(
                serde_json::from_slice::<serde_json::Value>(line).is_ok(),
                "not a JSON line: {:?}",
                String::from_utf8_lossy(line)
            );
        }
        let _ = task.await;
        // What a client makes of the same bytes as a daemon's answer: an error, never a panic.
        let _ = serde_json::from_slice::<tcpwatch::model::api::Response>(&data[..]);
        let _ = serde_json::from_slice::<tcpwatch::model::api::Hello>(&data[..]);
    });
});
