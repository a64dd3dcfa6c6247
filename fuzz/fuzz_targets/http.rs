//! Arbitrary bytes from an HTTP client at the metrics endpoint: served (or refused) without
//! a panic, answered with HTTP or not at all, and never held past the limits.
#![no_main]
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tcpwatch::server::http::{Limits, Render, serve_connection};
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

fuzz_target!(|data: &[u8]| {
    let render: Render = Arc::new(|| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send("tcpwatch_up 1\n".to_string());
        Some(rx)
    });
    let limits = Limits {
        header_timeout: Duration::from_millis(200),
        lifetime: Duration::from_secs(2),
        ..Limits::default()
    };
    let input = data.to_vec();
    rt().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve_connection(server, render, limits));
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection outlived its limits");
        assert!(out.is_empty() || out.starts_with(b"HTTP/1."), "{:?}", &out[..out.len().min(64)]);
        let _ = task.await;
    });
});
