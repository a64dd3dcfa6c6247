//! The terminal side of `top`: entering and leaving the alternate screen, drawing the app,
//! reading keys until the next refresh, and the event log's lines.
use std::time::Instant;

use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind};

use super::App;
use crate::model::event::{Event, RstReasons};
use crate::model::time::Clock;
use crate::output::trace::TraceWriter;

/// The terminal in raw mode on the alternate screen, restored when dropped (also on error).
pub struct Screen {
    term: ratatui::DefaultTerminal,
}

impl Screen {
    pub fn new() -> anyhow::Result<Screen> {
        Ok(Screen {
            term: ratatui::try_init()
                .map_err(|e| anyhow::anyhow!("starting the terminal UI: {e}"))?,
        })
    }

    pub fn draw(&mut self, app: &App) -> anyhow::Result<()> {
        self.term.draw(|f| super::draw::draw(f, app))?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Reads keys until `deadline`; returns false when the user quits.
pub fn wait_keys(app: &mut App, deadline: Instant) -> anyhow::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !event::poll(left)? {
            return Ok(!app.quit);
        }
        if let TermEvent::Key(k) = event::read()?
            && k.kind != KeyEventKind::Release
        {
            app.key(k);
            if app.quit {
                return Ok(false);
            }
            // Redraw right away after a key.
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(true);
        }
    }
}

/// Formats the events screen's lines: the trace's text lines.
pub struct LogLines {
    clock: Clock,
    home_netns: u32,
    reasons: RstReasons,
}

impl LogLines {
    pub fn new(clock: Clock, home_netns: u32, reasons: RstReasons) -> LogLines {
        LogLines {
            clock,
            home_netns,
            reasons,
        }
    }

    pub fn line(&self, e: &Event) -> String {
        let mut w = TraceWriter::new(Vec::new(), false, self.clock, self.home_netns)
            .with_reasons(self.reasons.clone());
        let _ = w.event(e);
        String::from_utf8_lossy(&w.into_inner())
            .trim_end()
            .to_string()
    }
}
