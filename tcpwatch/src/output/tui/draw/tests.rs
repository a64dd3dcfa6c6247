//! The TUI drawn into a TestBackend: each screen at two sizes, as insta snapshots.
use std::collections::BTreeMap;

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::*;
use crate::model::snapshot::*;
use crate::testkit::{overflow_finding, overflowing_listener};

fn snap() -> Snapshot {
    let mut s = Snapshot {
        version: 1,
        host: "h".into(),
        kernel: "6.18.0".into(),
        ..Default::default()
    };
    for (k, v) in [
        ("ESTABLISHED", 12),
        ("TIME_WAIT", 3000),
        ("CLOSE_WAIT", 2),
        ("SYN_SENT", 0),
        ("LISTEN", 2),
    ] {
        s.states.insert(k.into(), v);
    }
    s.hooks.push(HookView {
        signal: "state".into(),
        hook: Some("tp_btf/inet_sock_set_state".into()),
        note: None,
    });
    s.hooks.push(HookView {
        signal: "kprobe thing".into(),
        hook: None,
        note: Some("no".into()),
    });
    s.listeners.push(overflowing_listener(7, 8080));
    s.listeners.push(ListenerView {
        netns: 7,
        addr: "::".into(),
        port: 443,
        cookie: 1,
        owner: None,
        accept_queue: QueueView {
            now: 0,
            max: 4096,
            peak: 1,
        },
        syn_queue: QueueView::default(),
        drops: 0,
        overflows: OverflowsView::default(),
        synack_retransmits: 1,
    });
    s.time_wait.total = 3000;
    s.time_wait.entered = 3000;
    s.time_wait.by_remote.push(RemoteCount {
        netns: 7,
        addr: "127.0.0.1".into(),
        port: 8096,
        count: 3000,
    });
    s.time_wait.by_local_port.push(PortCount {
        netns: 7,
        port: 40000,
        count: 1,
    });
    s.time_wait.by_owner.push(OwnerCount {
        pid: 4242,
        comm: "loadgen".into(),
        count: 2990,
        source: "closed".into(),
    });
    s.time_wait.owner_unknown = 10;
    s.findings
        .push(overflow_finding(vec!["127.0.0.1:8080".into()]));
    s
}

fn conns() -> Vec<SocketView> {
    let mut a = crate::testkit::conn(5, "CLOSE_WAIT", "127.0.0.1:8080", "srv", 42);
    a.transitions = vec![
        TransitionView {
            ts_ns: 1,
            wall_ns: None,
            old: "LISTEN".into(),
            new: "SYN_RECV".into(),
            prev_state_ns: None,
        },
        TransitionView {
            ts_ns: 2,
            wall_ns: None,
            old: "SYN_RECV".into(),
            new: "ESTABLISHED".into(),
            prev_state_ns: Some(5_000),
        },
        TransitionView {
            ts_ns: 3,
            wall_ns: None,
            old: "ESTABLISHED".into(),
            new: "CLOSE_WAIT".into(),
            prev_state_ns: Some(2_000_000_000),
        },
    ];
    a.closed_first = Some(false);
    let mut b = crate::testkit::conn(6, "SYN_SENT", "127.0.0.1:40000", "curl", 7);
    b.retransmits = BTreeMap::from([("syn".into(), 2)]);
    b.retransmit_intervals_ns = vec![1_000_000_000];
    vec![a, b]
}

fn app() -> App {
    let mut a = App::new("host vm");
    a.update(snap(), conns(), 1234.0);
    a.log("20:00:00.000001 42/srv   state  127.0.0.1:8080 -> 127.0.0.1:40000  ESTABLISHED -> CLOSE_WAIT".into());
    a
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| draw(f, app)).unwrap();
    let buf = t.backend().buffer().clone();
    let mut s = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            s.push_str(buf[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

fn key(a: &mut App, c: KeyCode) {
    a.key(KeyEvent::new(c, KeyModifiers::NONE));
}

#[test]
fn overview_80x24() {
    insta::assert_snapshot!("overview_80x24", render(&app(), 80, 24));
}

#[test]
fn overview_wide() {
    insta::assert_snapshot!("overview_160x45", render(&app(), 160, 45));
}

/// A busy host: more listeners and findings than fit, at both sizes.
fn busy() -> App {
    let mut s = snap();
    let l = s.listeners[0].clone();
    for i in 0..30u16 {
        let mut x = l.clone();
        x.port = 9000 + i;
        x.addr = format!("10.1.2.{i}");
        s.listeners.push(x);
    }
    let f = s.findings[0].clone();
    for _ in 0..6 {
        s.findings.push(f.clone());
    }
    let mut a = App::new("host vm");
    a.update(s, conns(), 1234.0);
    a
}

#[test]
fn overview_busy() {
    insta::assert_snapshot!("overview_busy_80x24", render(&busy(), 80, 24));
    insta::assert_snapshot!("overview_busy_160x45", render(&busy(), 160, 45));
}

#[test]
fn overview_panels_share_the_height_without_gaps() {
    // Everything fits: each panel its need, the latest events the rest.
    assert_eq!(overview_heights(21, 2, 1), [4, 4, 4, 3, 6]);
    // Too little left for events: the findings take it.
    assert_eq!(overview_heights(21, 2, 4), [4, 4, 4, 9, 0]);
    // Too many listeners: findings keep what they need (up to half).
    assert_eq!(overview_heights(21, 40, 1), [4, 10, 4, 3, 0]);
    assert_eq!(overview_heights(21, 40, 20), [4, 7, 4, 6, 0]);
    // Tiny screens do not underflow; otherwise the panels fill the height exactly.
    assert_eq!(overview_heights(5, 3, 3), [4, 0, 4, 0, 0]);
    for h in 8..60 {
        for (l, n) in [(0, 0), (5, 5), (50, 0), (0, 50)] {
            let v = overview_heights(h, l, n);
            assert_eq!(v.iter().sum::<u16>(), h, "{h} {l} {n}: {v:?}");
        }
    }
}

#[test]
fn connections_view_and_filter() {
    let mut a = app();
    key(&mut a, KeyCode::Char('2'));
    insta::assert_snapshot!("connections_80x24", render(&a, 80, 24));
    key(&mut a, KeyCode::Char('/'));
    for c in "state:syn".chars() {
        key(&mut a, KeyCode::Char(c));
    }
    insta::assert_snapshot!("connections_filtered", render(&a, 80, 24));
}

#[test]
fn socket_and_listener_details() {
    let mut a = app();
    key(&mut a, KeyCode::Enter);
    insta::assert_snapshot!("listener_detail", render(&a, 80, 24));
    key(&mut a, KeyCode::Esc);
    key(&mut a, KeyCode::Char('2'));
    key(&mut a, KeyCode::Enter);
    insta::assert_snapshot!("socket_detail", render(&a, 80, 24));
}

#[test]
fn events_and_help() {
    let mut a = app();
    key(&mut a, KeyCode::Char('3'));
    insta::assert_snapshot!("events_80x24", render(&a, 80, 24));
    key(&mut a, KeyCode::Char('?'));
    insta::assert_snapshot!("help_80x24", render(&a, 80, 24));
}

#[test]
fn tiny_and_zero_sizes_do_not_panic() {
    let a = app();
    for (w, h) in [(0, 0), (1, 1), (39, 9), (40, 10), (200, 3), (3, 200)] {
        let s = render(&a, w, h);
        if w < MIN_W || h < MIN_H {
            assert!(
                w == 0 || h == 0 || s.contains("terminal") || s.contains("t"),
                "{w}x{h}: {s}"
            );
        }
    }
    let mut b = app();
    key(&mut b, KeyCode::Char('2'));
    key(&mut b, KeyCode::Enter);
    render(&b, 40, 10);
    key(&mut b, KeyCode::Char('?'));
    render(&b, 40, 10);
}

/// A process naming itself with escape sequences cannot drive the terminal through the TUI.
#[test]
fn no_control_character_reaches_a_cell() {
    let mut app = App::new("test \x1b[2J");
    let mut c = crate::testkit::conn(5, "ESTABLISHED", "127.0.0.1:8080", "\x1b]0;x\x07", 42);
    c.remote = "\u{9b}31m".into();
    app.update(Snapshot::default(), vec![c], 0.0);
    app.log("event \x1b[31mred".into());
    for view in ["1", "2", "3"] {
        app.key(KeyEvent::new(
            KeyCode::Char(view.chars().next().unwrap()),
            KeyModifiers::NONE,
        ));
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| draw(f, &app)).unwrap();
        for cell in t.backend().buffer().content.iter() {
            assert!(
                !cell.symbol().chars().any(|c| c.is_control()),
                "view {view}: {:?}",
                cell.symbol()
            );
        }
    }
}
