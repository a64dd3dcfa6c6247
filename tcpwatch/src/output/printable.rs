//! Text that reaches a terminal carries no control characters: a process can name itself
//! `\x1b]0;...\x07` or `\x1b[31m`, and a capture can hold anything. Every text output (trace,
//! snapshot, check, the TUI's cells) writes them escaped (`\x1b`); JSON escapes its own.
use std::borrow::Cow;
use std::io::{self, Write};

/// `s` with every control character but a newline (and a tab) written as `\xNN` / `\u{...}`.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            if (c as u32) < 0x100 {
                out.push_str(&format!("\\x{:02x}", c as u32));
            } else {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        // Bidirectional overrides reorder what a terminal shows.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Bytes as text to show: invalid UTF-8 as `\xNN`, then [`escape`].
pub fn escape_bytes(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => escape(s),
        Err(_) => {
            let mut out = String::with_capacity(b.len() + 8);
            for chunk in b.utf8_chunks() {
                out.push_str(&escape(chunk.valid()));
                for x in chunk.invalid() {
                    out.push_str(&format!("\\x{x:02x}"));
                }
            }
            Cow::Owned(out)
        }
    }
}

/// A writer that escapes what passes through it, line by line (a line is held until its
/// newline, or until 64 KiB of it has come).
pub struct Escaped<W: Write> {
    inner: W,
    line: Vec<u8>,
}

impl<W: Write> Escaped<W> {
    pub fn new(inner: W) -> Self {
        Escaped {
            inner,
            line: Vec::new(),
        }
    }

    fn pass(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            let text = escape_bytes(&self.line);
            self.inner.write_all(text.as_bytes())?;
            self.line.clear();
        }
        Ok(())
    }
}

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for part in buf.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(part);
            if part.ends_with(b"\n") || self.line.len() >= 64 << 10 {
                self.pass()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.pass()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for Escaped<W> {
    fn drop(&mut self) {
        let _ = self.pass();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape("nginx"), "nginx");
        assert_eq!(escape("\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07");
        assert_eq!(escape("a\x1b[31mred"), "a\\x1b[31mred");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\x9b31m");
        assert_eq!(escape("rtl\u{202e}txt"), "rtl\\u{202e}txt");
        assert_eq!(escape("two\nlines\tok"), "two\nlines\tok");
        assert_eq!(escape_bytes(b"bad\xffutf8\x1b"), "bad\\xffutf8\\x1b");
    }

    #[test]
    fn the_writer_escapes_across_writes() {
        let mut out = Vec::new();
        {
            let mut w = Escaped::new(&mut out);
            write!(w, "owner \x1b[2J").unwrap();
            writeln!(w, "cleared").unwrap();
            write!(w, "tail\x07").unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "owner \\x1b[2Jcleared\ntail\\x07"
        );
    }
}
