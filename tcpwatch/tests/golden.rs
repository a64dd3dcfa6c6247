//! Golden outputs: one recorded capture replayed through `trace` (JSON and text), the snapshot
//! (JSON and text) and the Prometheus exposition, compared byte for byte with the files beside
//! it. They pin what users see while the inside moves. `TCPWATCH_BLESS=1` rewrites them.
use std::path::{Path, PathBuf};

use tcpwatch::model::Loss;
use tcpwatch::model::aggregate::{Aggregator, Config};
use tcpwatch::model::snapshot::{Input, Thresholds, build};
use tcpwatch::output::Clock;
use tcpwatch::output::trace::TraceWriter;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn compare(name: &str, got: &[u8]) {
    let path = dir().join(name);
    if std::env::var_os("TCPWATCH_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if want != got {
        let (w, g) = (String::from_utf8_lossy(&want), String::from_utf8_lossy(got));
        let line = w
            .lines()
            .zip(g.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(w.lines().count().min(g.lines().count()));
        panic!(
            "{name} differs from the golden file at line {}:\n  want: {}\n  got:  {}",
            line + 1,
            w.lines().nth(line).unwrap_or("<end>"),
            g.lines().nth(line).unwrap_or("<end>")
        );
    }
}

#[test]
fn a_capture_renders_as_it_always_did() {
    let f = std::fs::File::open(dir().join("capture.jsonl")).unwrap();
    let capture = tcpwatch::source::replay::read(std::io::BufReader::new(f)).unwrap();
    let (events, skipped) = (&capture.events, capture.skipped);
    assert!(
        events.len() > 100,
        "the capture has {} events",
        events.len()
    );
    let clock = Clock {
        offset_ns: 1_765_000_000_000_000_000,
        utc_offset_s: 0,
    };
    for (json, name) in [(true, "trace.jsonl"), (false, "trace.txt")] {
        let mut w = TraceWriter::new(Vec::new(), json, clock, 4026531840)
            .with_reasons(capture.reasons.clone());
        for e in events {
            w.event(e).unwrap();
        }
        compare(name, &w.into_inner());
    }
    let mut agg = Aggregator::new(Config::default());
    for e in events {
        agg.apply(e);
    }
    let first = events.first().map_or(0, |e| e.ts_ns);
    let now = events.last().map_or(0, |e| e.ts_ns);
    agg.tick(now);
    let input = Input {
        now_ns: now,
        window_ns: now - first,
        host: "golden".into(),
        kernel: "(replay)".into(),
        hooks: Vec::new(),
        inventory: None,
        namespaces: Vec::new(),
        loss: Loss::default(),
        home_netns: 0,
        thresholds: Thresholds::default(),
        sockets_filtered: false,
        reasons: capture.reasons.clone(),
    };
    let snap = build(&agg, &input);
    let mut j = Vec::new();
    tcpwatch::output::snapshot::write_json(&mut j, &snap).unwrap();
    compare("snapshot.json", &j);
    let mut t = Vec::new();
    tcpwatch::output::snapshot::write_text(&mut t, &snap).unwrap();
    compare("snapshot.txt", &t);
    let m = tcpwatch::output::prometheus::render(
        &snap,
        &tcpwatch::output::prometheus::Extras {
            events: events.len() as u64 + skipped as u64,
            build_seconds: 0.0,
            max_listeners: 100,
        },
    );
    compare("metrics.txt", m.as_bytes());
}
