//! Rendering of the `top` views with ratatui. Reads `App` only.
#[cfg(test)]
mod tests;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap,
};

use super::{App, Detail, View};
use crate::model::findings::Severity;
use crate::model::snapshot::endpoint;
use crate::output::human_ns;
use crate::output::snapshot::{bar, bar_n};

pub const MIN_W: u16 = 40;
pub const MIN_H: u16 = 10;

const KEY_STATES: [&str; 4] = ["ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "SYN_SENT"];

pub fn draw(f: &mut Frame, app: &App) {
    draw_screens(f, app);
    // Every cell, whatever text put it there (process names, capture contents): a control
    // character would be obeyed by the terminal, so none leaves here.
    for cell in f.buffer_mut().content.iter_mut() {
        if cell.symbol().chars().any(|c| c.is_control()) {
            cell.set_symbol("?");
        }
    }
}

fn draw_screens(f: &mut Frame, app: &App) {
    let area = f.area();
    if area.width < MIN_W || area.height < MIN_H {
        let msg = format!(
            "terminal too small: {}x{}, need {MIN_W}x{MIN_H}",
            area.width, area.height
        );
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    header(f, app, head);
    match &app.detail {
        Some(d) => detail(f, app, d, body),
        None => match app.view {
            View::Overview => overview(f, app, body),
            View::Connections => connections(f, app, body),
            View::Events => events(f, app, body),
        },
    }
    footer(f, app, foot);
    if app.help {
        help(f, area);
    }
}

fn header(f: &mut Frame, app: &App, area: Rect) {
    let s = &app.snap;
    let active = s.hooks.iter().filter(|h| h.hook.is_some()).count();
    let missing: Vec<&str> = s
        .hooks
        .iter()
        .filter(|h| h.hook.is_none())
        .map(|h| h.signal.as_str())
        .collect();
    let lost = s.loss.kernel_dropped
        + s.loss.kernel_skipped
        + s.loss.channel_dropped
        + s.loss.decode_errors;
    let mut l1 = vec![
        Span::styled(" tcpwatch ", Style::new().add_modifier(Modifier::REVERSED)),
        Span::raw(format!(
            " {} | kernel {} | {:.0} events/s | ",
            app.source, s.kernel, app.events_per_s
        )),
    ];
    if lost > 0 {
        l1.push(Span::styled(
            format!("LOST {lost}"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    } else {
        l1.push(Span::raw("no loss"));
    }
    if app.paused {
        l1.push(Span::styled("  PAUSED", Style::new().fg(Color::Yellow)));
    }
    if let (Some(at), Some(clock)) = (app.at, &app.clock) {
        let mono = (at as i128 - clock.offset_ns).max(0) as u64;
        let t = clock.hms(mono);
        l1.push(Span::styled(
            format!(
                "  AT {} (the record; [ ] step, l live)",
                t.split('.').next().unwrap_or(&t)
            ),
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    let l2 = if missing.is_empty() {
        format!(" hooks: {active} signals active")
    } else {
        format!(
            " hooks: {active} active, unavailable: {}",
            missing.join(", ")
        )
    };
    f.render_widget(Paragraph::new(vec![Line::from(l1), Line::from(l2)]), area);
}

fn footer(f: &mut Frame, app: &App, area: Rect) {
    let tabs = [
        ("1", "overview", View::Overview),
        ("2", "connections", View::Connections),
        ("3", "events", View::Events),
    ];
    let mut spans = Vec::new();
    for (k, name, v) in tabs {
        let st = if app.view == v && app.detail.is_none() {
            Style::new().add_modifier(Modifier::REVERSED)
        } else {
            Style::new()
        };
        spans.push(Span::styled(format!(" {k} {name} "), st));
    }
    spans.push(Span::raw(
        " | j/k move  Enter detail  / filter  s sort  p pause  ? help  q quit",
    ));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// The overview's panels, each as tall as what it has to show: listeners and findings share
/// what the fixed panels leave (findings up to half when both want more); what is still left
/// shows the latest events (or goes to the findings when too little for that), so no blank
/// rows sit between or below the panels.
fn overview_heights(height: u16, listeners: usize, findings: usize) -> [u16; 5] {
    const STATES: u16 = 4;
    const TIME_WAIT: u16 = 4;
    let flex = height.saturating_sub(STATES + TIME_WAIT);
    // Title and header, one row each (an empty table still shows its header).
    let l_need = 2 + listeners.max(1).min(u16::MAX as usize / 2) as u16;
    // Title, and two lines a finding ("none" takes one).
    let f_need = 1 + (2 * findings).max(1).min(u16::MAX as usize / 2) as u16;
    let lh = l_need
        .min(flex.saturating_sub(f_need.min(flex / 2)))
        .max(3.min(flex));
    let fh = flex - lh;
    let spare = fh.saturating_sub(f_need);
    if spare >= 3 {
        [STATES, lh, TIME_WAIT, f_need, spare]
    } else {
        [STATES, lh, TIME_WAIT, fh, 0]
    }
}

fn overview(f: &mut Frame, app: &App, area: Rect) {
    let [sh, lh, th, fh, eh] = overview_heights(
        area.height,
        app.snap.listeners.len(),
        app.snap.findings.len(),
    );
    let [states, listeners, tw, finds, evs] = Layout::vertical([
        Constraint::Length(sh),
        Constraint::Length(lh),
        Constraint::Length(th),
        Constraint::Length(fh),
        Constraint::Length(eh),
    ])
    .areas(area);
    if eh > 0 {
        latest_events(f, app, evs);
    }
    state_panel(f, app, states);
    listener_table(f, app, listeners);
    timewait_panel(f, app, tw);
    findings_panel(f, app, finds);
}

fn state_panel(f: &mut Frame, app: &App, area: Rect) {
    let block = Block::new().borders(Borders::TOP).title(" states ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let others: Vec<String> = app
        .snap
        .states
        .iter()
        .filter(|(k, n)| **n > 0 && !KEY_STATES.contains(&k.as_ref()))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let [grid, rest] = Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(inner);
    let rows = Layout::vertical([Constraint::Length(1); 2]).split(grid);
    for (i, st) in KEY_STATES.iter().enumerate() {
        let cols = Layout::horizontal([Constraint::Ratio(1, 2); 2]).split(rows[i / 2]);
        let cell = cols[i % 2];
        let [label, spark] =
            Layout::horizontal([Constraint::Length(20), Constraint::Min(0)]).areas(cell);
        let n = app.snap.states.get(*st).copied().unwrap_or(0);
        f.render_widget(Paragraph::new(format!("{st:<12}{n:>7} ")), label);
        let data: Vec<u64> = app
            .history
            .iter()
            .map(|h| h.get(*st).copied().unwrap_or(0))
            .collect();
        let w = spark.width as usize;
        let tail = &data[data.len().saturating_sub(w)..];
        f.render_widget(
            Sparkline::default()
                .data(tail)
                .style(Style::new().fg(Color::Cyan)),
            spark,
        );
    }
    f.render_widget(
        Paragraph::new(format!(
            "other: {}",
            if others.is_empty() {
                "-".into()
            } else {
                others.join("  ")
            }
        )),
        rest,
    );
}

fn listener_table(f: &mut Frame, app: &App, area: Rect) {
    let header = Row::new([
        "LISTENER",
        "OWNER",
        "ACCEPT now/max pk",
        "SYN pk",
        "DROPS",
        "OVF a/s/c",
        "SYNACK",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let owner = |l: &crate::model::snapshot::ListenerView| {
        l.owner
            .as_ref()
            .map_or("?".into(), |o| format!("{}/{}", o.pid, o.comm))
    };
    // Columns as wide as their longest entry, not wider.
    let addr_w = app
        .snap
        .listeners
        .iter()
        .map(|l| endpoint(&l.addr, l.port).chars().count())
        .max()
        .unwrap_or(0)
        .max("LISTENER".len()) as u16;
    let owner_w = app
        .snap
        .listeners
        .iter()
        .map(|l| owner(l).chars().count())
        .max()
        .unwrap_or(0)
        .clamp("OWNER".len(), 22) as u16;
    let rows = app.snap.listeners.iter().map(|l| {
        let addr = endpoint(&l.addr, l.port);
        let ovfl = l.overflows.accept + l.overflows.syn + l.overflows.syncookies;
        let style = if ovfl > 0 {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        Row::new(vec![
            Cell::from(addr),
            Cell::from(owner(l)),
            Cell::from(format!(
                "{} {}/{} {}",
                bar_n(&l.accept_queue, 6),
                l.accept_queue.now,
                l.accept_queue.max,
                l.accept_queue.peak
            )),
            Cell::from(format!("{} {}", l.syn_queue.now, l.syn_queue.peak)),
            Cell::from(l.drops.to_string()),
            Cell::from(format!(
                "{}/{}/{}",
                l.overflows.accept, l.overflows.syn, l.overflows.syncookies
            )),
            Cell::from(l.synack_retransmits.to_string()),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Length(addr_w),
        Constraint::Length(owner_w),
        Constraint::Length(18),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(6),
    ];
    let t = Table::new(rows, widths)
        .header(header)
        .block(
            Block::new()
                .borders(Borders::TOP)
                .title(format!(" listeners ({}) ", app.snap.listeners.len())),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut st = TableState::default()
        .with_selected((!app.snap.listeners.is_empty()).then_some(app.selected));
    f.render_stateful_widget(t, area, &mut st);
}

fn timewait_panel(f: &mut Frame, app: &App, area: Rect) {
    let tw = &app.snap.time_wait;
    let block = Block::new()
        .borders(Borders::TOP)
        .title(format!(" TIME_WAIT {} ", tw.total));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let remotes: Vec<String> = tw
        .by_remote
        .iter()
        .take(4)
        .map(|r| format!("{} {}", endpoint(&r.addr, r.port), r.count))
        .collect();
    let ports: Vec<String> = tw
        .by_local_port
        .iter()
        .take(6)
        .map(|p| format!("{} {}", p.port, p.count))
        .collect();
    let owners: Vec<String> = tw
        .by_owner
        .iter()
        .take(3)
        .map(|o| format!("{}/{} {}", o.pid, o.comm, o.count))
        .collect();
    let headroom = tw
        .port_headroom
        .first()
        .map_or("ports: plenty".into(), |h| {
            format!(
                "ports to {}: {}/{} in use, {} free",
                endpoint(&h.remote_addr, h.remote_port),
                h.in_use,
                h.range,
                h.free
            )
        });
    let lines = vec![
        Line::from(format!(
            "FIN_WAIT2 substate {}  entered {}  left {}",
            tw.fin_wait2,
            tw.entered,
            tw.exited.values().sum::<u64>()
        )),
        Line::from(format!(
            "by remote: {}   {headroom}",
            if remotes.is_empty() {
                "-".into()
            } else {
                remotes.join(", ")
            }
        )),
        Line::from(format!(
            "by local port: {}{}",
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(", ")
            },
            if owners.is_empty() {
                String::new()
            } else {
                format!("   by owner: {}", owners.join(", "))
            }
        )),
    ];
    f.render_widget(Paragraph::new(lines), inner);
}

fn severity_style(sev: Severity) -> Style {
    match sev {
        Severity::Critical => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Severity::Warning => Style::new().fg(Color::Yellow),
        Severity::Info => Style::new(),
    }
}

fn findings_panel(f: &mut Frame, app: &App, area: Rect) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(format!(" findings ({}) ", app.snap.findings.len()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if app.snap.findings.is_empty() {
        f.render_widget(Paragraph::new("none"), inner);
        return;
    }
    let mut lines = Vec::new();
    for x in &app.snap.findings {
        lines.push(Line::from(vec![
            Span::styled(format!("[{}] ", x.severity), severity_style(x.severity)),
            Span::raw(x.what.clone()),
        ]));
        let g: Vec<String> = x
            .governed_by
            .iter()
            .map(|g| {
                g.value
                    .as_ref()
                    .map_or(g.name.clone(), |v| format!("{}={v}", g.name))
            })
            .collect();
        lines.push(Line::from(format!("    {}", g.join(", "))));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

fn connections(f: &mut Frame, app: &App, area: Rect) {
    let rows_v = app.visible_conns();
    let title = format!(
        " connections {} of {} | sort: {} | filter: {}{} ",
        rows_v.len(),
        app.conns.len(),
        app.sort.name(),
        if app.filter.is_empty() && !app.editing_filter {
            "-"
        } else {
            &app.filter
        },
        if app.editing_filter { "_" } else { "" }
    );
    let header = Row::new([
        "STATE", "LOCAL", "REMOTE", "OWNER", "IN STATE", "RTX", "RST",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = rows_v.iter().map(|c| {
        let rtx: u32 = c.retransmits.values().sum();
        let style = match c.state.as_deref() {
            Some("CLOSE_WAIT") => Style::new().fg(Color::Yellow),
            _ if rtx > 0 || !c.errors.is_empty() => Style::new().fg(Color::Red),
            _ => Style::new(),
        };
        Row::new(vec![
            c.state.as_deref().unwrap_or("?").to_string(),
            c.local.clone(),
            c.remote.clone(),
            c.owner
                .as_ref()
                .map_or("?".into(), |o| format!("{}/{}", o.pid, o.comm)),
            human_ns(c.state_for_ns),
            rtx.to_string(),
            (c.resets_sent + c.resets_received).to_string(),
        ])
        .style(style)
    });
    let widths = [
        // 72 columns plus 6 gaps fit in 80: an unsatisfiable set would leave the solver's
        // choice (and the rendering) to chance.
        Constraint::Length(11),
        Constraint::Min(15),
        Constraint::Min(15),
        Constraint::Length(14),
        Constraint::Length(9),
        Constraint::Length(4),
        Constraint::Length(4),
    ];
    let t = Table::new(rows, widths)
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut st = TableState::default().with_selected((!rows_v.is_empty()).then_some(app.selected));
    f.render_stateful_widget(t, area, &mut st);
}

/// The newest event lines, in the overview's spare rows.
fn latest_events(f: &mut Frame, app: &App, area: Rect) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(" latest events (3: all) ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let n = app.events.len();
    let start = n.saturating_sub(inner.height as usize);
    let lines: Vec<Line> = app
        .events
        .iter()
        .skip(start)
        .map(|l| Line::from(l.as_str()))
        .collect();
    f.render_widget(Paragraph::new(lines), inner);
}

fn events(f: &mut Frame, app: &App, area: Rect) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(format!(" events ({}) ", app.events.len()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let h = inner.height as usize;
    let n = app.events.len();
    // Follow the tail unless the user scrolled up.
    let end = if app.selected == 0 || app.selected + 1 >= n {
        n
    } else {
        app.selected + 1
    };
    let start = end.saturating_sub(h);
    let lines: Vec<Line> = app
        .events
        .iter()
        .skip(start)
        .take(end - start)
        .map(|l| Line::from(l.as_str()))
        .collect();
    f.render_widget(Paragraph::new(lines), inner);
}

fn detail(f: &mut Frame, app: &App, d: &Detail, area: Rect) {
    let mut lines: Vec<Line> = Vec::new();
    let title;
    match d {
        Detail::Socket(cookie) => {
            title = format!(" socket {cookie} ");
            match app.conns.iter().find(|c| c.cookie == *cookie) {
                None => lines.push(Line::from("this socket's timeline is no longer kept")),
                Some(c) => {
                    lines.push(Line::from(format!(
                        "{} -> {}  netns {}  {}",
                        c.local, c.remote, c.netns, c.family
                    )));
                    lines.push(Line::from(format!(
                        "owner {}   state {} for {}   {}",
                        c.owner
                            .as_ref()
                            .map_or("?".into(), |o| format!("{}/{}", o.pid, o.comm)),
                        c.state.as_deref().unwrap_or("?"),
                        human_ns(c.state_for_ns),
                        match c.closed_first {
                            Some(true) => "closed first",
                            Some(false) => "the peer closed first",
                            None => "",
                        }
                    )));
                    lines.push(Line::from(""));
                    lines.push(Line::from(Span::styled(
                        "timeline",
                        Style::new().add_modifier(Modifier::BOLD),
                    )));
                    for t in &c.transitions {
                        let d = t.prev_state_ns.map_or(String::new(), |d| {
                            format!("  ({} in {})", human_ns(d), t.old)
                        });
                        // Wall-clock times where the app has a clock (not in a replay).
                        let when = app.clock.as_ref().map_or(String::new(), |k| {
                            let s = k.hms(t.ts_ns);
                            format!("{} ", &s[..s.len().min(12)])
                        });
                        lines.push(Line::from(format!(
                            "  {when}{:<11} -> {:<11}{d}",
                            t.old, t.new
                        )));
                    }
                    if let Some(tw) = &c.time_wait {
                        lines.push(Line::from(format!(
                            "  timewait socket ({})  {}",
                            tw.substate.as_deref().unwrap_or("?"),
                            tw.exit
                                .as_ref()
                                .map_or("still waiting".into(), |e| format!("ended: {e}"))
                        )));
                    }
                    if !c.retransmits.is_empty() {
                        let r: Vec<String> = c
                            .retransmits
                            .iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect();
                        let iv: Vec<String> = c
                            .retransmit_intervals_ns
                            .iter()
                            .map(|i| human_ns(*i))
                            .collect();
                        lines.push(Line::from(format!(
                            "retransmits: {}   intervals: {}",
                            r.join(", "),
                            iv.join(", ")
                        )));
                    }
                    if c.resets_sent + c.resets_received > 0 {
                        lines.push(Line::from(format!(
                            "resets: sent {}, received {}",
                            c.resets_sent, c.resets_received
                        )));
                    }
                    if !c.errors.is_empty() {
                        lines.push(Line::from(format!("errors: {}", c.errors.join(", "))));
                    }
                }
            }
        }
        Detail::Listener { netns, addr, port } => {
            title = format!(" listener {addr}:{port} ");
            match app
                .snap
                .listeners
                .iter()
                .find(|l| l.netns == *netns && &l.addr == addr && l.port == *port)
            {
                None => lines.push(Line::from("this listener is gone")),
                Some(l) => {
                    lines.push(Line::from(format!(
                        "netns {}   owner {}",
                        l.netns,
                        l.owner
                            .as_ref()
                            .map_or("?".into(), |o| format!("{}/{}", o.pid, o.comm))
                    )));
                    lines.push(Line::from(format!(
                        "accept queue {} {}/{} (peak {}); the kernel holds max + 1",
                        bar(&l.accept_queue),
                        l.accept_queue.now,
                        l.accept_queue.max,
                        l.accept_queue.peak
                    )));
                    lines.push(Line::from(format!(
                        "SYN queue {} (peak {})",
                        l.syn_queue.now, l.syn_queue.peak
                    )));
                    lines.push(Line::from(format!("drops (listener counter): {}", l.drops)));
                    lines.push(Line::from(format!(
                        "overflows: accept {}, SYN {}, syncookies {}, final-ACK drops seen {}",
                        l.overflows.accept,
                        l.overflows.syn,
                        l.overflows.syncookies,
                        l.overflows.final_ack_packets
                    )));
                    lines.push(Line::from(format!(
                        "SYN-ACK retransmits: {}",
                        l.synack_retransmits
                    )));
                    for x in app
                        .snap
                        .findings
                        .iter()
                        .filter(|x| x.examples.iter().any(|e| e == &format!("{addr}:{port}")))
                    {
                        lines.push(Line::from(""));
                        lines.push(Line::from(vec![
                            Span::styled(format!("[{}] ", x.severity), severity_style(x.severity)),
                            Span::raw(x.what.clone()),
                        ]));
                        lines.push(Line::from(format!("  cause: {}", x.cause)));
                    }
                }
            }
        }
    }
    lines.push(Line::from(""));
    lines.push(Line::from("Esc: back"));
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::new().borders(Borders::ALL).title(title)),
        area,
    );
}

fn help(f: &mut Frame, area: Rect) {
    let w = 60.min(area.width);
    let h = 18.min(area.height);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    let text = vec![
        Line::from("1 / 2 / 3, Tab   overview, connections, events"),
        Line::from("j k, arrows       move; PgUp PgDn, g G"),
        Line::from("Enter             detail of a listener or a socket"),
        Line::from("Esc               back; clear the filter"),
        Line::from("/                 filter connections: words, or"),
        Line::from("                  state:close_wait port:80 pid:1 comm:nginx"),
        Line::from("s                 sort connections"),
        Line::from("p                 pause (freeze the display)"),
        Line::from("[ ]  { }          with a daemon: step back/forward 1 / 10 min"),
        Line::from("l                 back to live"),
        Line::from("q, Ctrl-C         quit"),
        Line::from(""),
        Line::from("Counts are the kernel's: an accept queue holds max + 1."),
        Line::from("any key closes this help"),
    ];
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(text).block(Block::new().borders(Borders::ALL).title(" help ")),
        r,
    );
}
