//! A daemon's client: where its socket is (`--daemon`, then `$TCPWATCH_SOCKET`, then the
//! default path), who answers there (a tcpwatch daemon speaking this API version, or a clear
//! error), and requests and streams read with bounds: what answers is another process.
use std::io::{self, BufRead, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::api::{API_VERSION, Body, Failure, Hello, Op, Request, Response};

pub const DEFAULT_SOCKET: &str = "/run/tcpwatch/tcpwatch.sock";
pub const ENV_SOCKET: &str = "TCPWATCH_SOCKET";

/// A response line is at most this long (a snapshot of a very large host).
const MAX_LINE: u64 = 512 << 20;

/// Where to look, and whether the user named it (then its absence is an error).
pub fn locate(flag: Option<&Path>) -> (PathBuf, bool) {
    if let Some(p) = flag {
        return (p.to_path_buf(), true);
    }
    match std::env::var_os(ENV_SOCKET) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_SOCKET), false),
    }
}

/// Why no daemon could be used.
#[derive(Debug)]
pub enum Unreachable {
    /// Nothing listens there.
    Absent(String),
    /// Something answered and said no, or the socket's mode keeps this user out.
    Refused(String),
    /// Something answered that is not a daemon of this API version.
    Wrong(String),
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::Absent(m) | Unreachable::Refused(m) | Unreachable::Wrong(m) => {
                f.write_str(m)
            }
        }
    }
}

pub struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    pub hello: Hello,
    pub path: PathBuf,
}

/// One bounded line; `Ok(None)` at the end of the stream.
fn read_line(rd: &mut BufReader<UnixStream>, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    buf.clear();
    let n = rd.by_ref().take(MAX_LINE).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            return Err(io::Error::other("the daemon sent a line too long to take"));
        }
        return Ok(None);
    }
    Ok(Some(()))
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, Unreachable> {
        let shown = path.display();
        let s = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTDIR) => {
                        Unreachable::Absent(format!("no daemon at {shown}"))
                    }
                    // A directory this user may not enter hides whether a daemon is
                    // there at all: as good as none.
                    Some(libc::EACCES | libc::EPERM)
                        if std::fs::symlink_metadata(path).is_err() =>
                    {
                        Unreachable::Absent(format!("{shown}: {e}"))
                    }
                    Some(libc::EACCES | libc::EPERM) => Unreachable::Refused(format!(
                        "the daemon at {shown} is for root and members of group tcpwatch ({e}); ask to be added (usermod -aG tcpwatch USER), or use --standalone with privileges"
                    )),
                    _ => Unreachable::Wrong(format!("{shown}: {e}")),
                });
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let wr = s
            .try_clone()
            .map_err(|e| Unreachable::Wrong(format!("{shown}: {e}")))?;
        let mut rd = BufReader::new(s);
        let mut buf = Vec::new();
        match read_line(&mut rd, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => {
                return Err(Unreachable::Wrong(format!(
                    "{shown}: closed without a word"
                )));
            }
            Err(e) => return Err(Unreachable::Wrong(format!("{shown}: {e}"))),
        }
        if let Ok(f) = serde_json::from_slice::<Failure>(&buf) {
            return Err(Unreachable::Refused(format!(
                "the daemon at {shown} refused: {}",
                crate::source::daemon::printable(&f.error)
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&buf)
            .map_err(|_| Unreachable::Wrong(format!("{shown}: not a tcpwatch daemon")))?;
        if v["service"] != "tcpwatch" {
            return Err(Unreachable::Wrong(format!(
                "{shown}: not a tcpwatch daemon"
            )));
        }
        if v["api"].as_u64() != Some(API_VERSION as u64) {
            return Err(Unreachable::Wrong(format!(
                "the daemon at {shown} speaks API version {} and this tcpwatch {API_VERSION}: use the daemon's version of tcpwatch, or --standalone",
                v["api"]
            )));
        }
        let hello: Hello = serde_json::from_value(v)
            .map_err(|e| Unreachable::Wrong(format!("{shown}: a malformed greeting: {e}")))?;
        Ok(Client {
            rd,
            wr,
            hello,
            path: path.to_path_buf(),
        })
    }

    /// Sends a request, returns the response's body (a failure as an error).
    pub fn request(&mut self, op: Op, timeout: Duration) -> anyhow::Result<Body> {
        self.send(op)?;
        let _ = self.rd.get_ref().set_read_timeout(Some(timeout));
        let mut buf = Vec::new();
        match read_line(&mut self.rd, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => anyhow::bail!("the daemon at {} hung up", self.path.display()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::bail!(
                    "the daemon at {} did not answer within {} s",
                    self.path.display(),
                    timeout.as_secs()
                )
            }
            Err(e) => anyhow::bail!("reading from the daemon: {e}"),
        }
        match serde_json::from_slice::<Response>(&buf) {
            Ok(Response::Ok(r)) => Ok(r.body),
            Ok(Response::Err(f)) => anyhow::bail!("the daemon says: {}", printable(&f.error)),
            Err(e) => anyhow::bail!("the daemon's answer did not read: {e}"),
        }
    }

    pub fn send(&mut self, op: Op) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(&Request {
            api: API_VERSION,
            op,
        })?;
        line.push(b'\n');
        self.wr
            .write_all(&line)
            .map_err(|e| anyhow::anyhow!("writing to the daemon: {e}"))
    }

    /// The next line of a stream (`None` when the daemon hung up), waiting at most `timeout`
    /// (`Err` of kind WouldBlock/TimedOut then).
    pub fn next_line(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> io::Result<Option<()>> {
        let _ = self.rd.get_ref().set_read_timeout(timeout);
        read_line(&mut self.rd, buf)
    }
}

/// Text from the daemon, shown: control characters made visible.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
