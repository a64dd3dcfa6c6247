//! Command-line interface (clap): what the user can type, nothing more.
use clap::{Args, Parser, Subcommand};

const EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch trace                      every TCP state transition on the host, all namespaces
    tcpwatch trace --port 443 --json    JSON lines for connections with port 443 on either side
    tcpwatch trace --pid 1234           only sockets owned by process 1234
    tcpwatch trace --netns myns -6      IPv6 sockets in the namespace `ip netns` calls myns
    tcpwatch doctor                     which kernel hook serves each signal on this machine";

#[derive(Parser, Debug)]
#[command(name = "tcpwatch", version, about = "Live TCP connection-state observer (eBPF)", after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream TCP events (state transitions) as they happen.
    #[command(after_help = EXAMPLES)]
    Trace(TraceArgs),
    /// The interactive view: listeners and their queues, states over time, TIME_WAIT,
    /// findings, connections with their timelines, the event log. Falls back to `snapshot`
    /// when stdout is not a terminal.
    #[command(after_help = TOP_EXAMPLES)]
    Top(TopArgs),
    /// One-shot report: states, listeners and their queues, TIME_WAIT, kernel counters,
    /// sysctls and findings; with --duration also what happened in that window.
    #[command(after_help = SNAPSHOT_EXAMPLES)]
    Snapshot(SnapshotArgs),
    /// Run a command under observation (CI smoke tests): report what its sockets did and
    /// exit non-zero when an assertion fails.
    #[command(after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
    /// The always-on daemon: one set of probes for the host, a flight recorder of what
    /// happened, a local API that `top`, `snapshot`, `trace` and `check` use without
    /// privileges, and Prometheus metrics.
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(DaemonArgs),
    /// Serve metrics in the Prometheus text format over HTTP (/metrics), for fleets: the
    /// daemon without its API socket and record.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
    /// Check privileges and which hook serves each signal, then exit.
    Doctor(DoctorArgs),
}

const DAEMON_EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch daemon                              API on /run/tcpwatch/tcpwatch.sock, record in
                                                 /var/lib/tcpwatch, metrics on 127.0.0.1:9924
    tcpwatch daemon --history-mib 1024           a longer memory
    tcpwatch daemon --metrics off --socket /run/tcpwatch/alt.sock --state-dir /srv/tcpwatch

CLIENTS:
    tcpwatch top | snapshot | trace | check use a reachable daemon (--daemon PATH, then
    $TCPWATCH_SOCKET, then /run/tcpwatch/tcpwatch.sock); --standalone loads their own probes.
    Root and members of group tcpwatch may use it; no capability is needed.";

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The API's unix socket, or `off`.
    #[arg(
        long,
        value_name = "PATH|off",
        default_value = "/run/tcpwatch/tcpwatch.sock"
    )]
    pub socket: String,
    /// Address to serve /metrics and /healthz on, or `off`. Binding beyond loopback is your choice.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9924")]
    pub metrics: String,
    /// Where the flight recorder keeps its record (a SQLite database), or `off`.
    #[arg(long, value_name = "DIR|off", default_value = "/var/lib/tcpwatch")]
    pub state_dir: String,
    /// The record's bound on disk, MiB: older events, then older timelines and frames, go to
    /// stay inside it (what was pruned is counted).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub history_mib: u64,
    /// Listening addresses exposed one by one in the metrics (the most troubled first).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10000))]
    pub max_listeners: u16,
    /// The group (a name, or a gid where names do not resolve: a container) whose members
    /// may use the API; default `tcpwatch` when it exists, else root only.
    #[arg(long, value_name = "NAME|GID")]
    pub socket_group: Option<String>,
    /// A CLOSE_WAIT socket idle this long counts as a leak finding.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub close_wait_secs: u64,
    /// How long closed sockets and listeners stay in the live model before they go to the
    /// record.
    #[arg(long, value_name = "SECS", default_value_t = 60, hide = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub retention_secs: u64,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Where a client's data comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// The daemon's socket (default: $TCPWATCH_SOCKET, then /run/tcpwatch/tcpwatch.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "standalone")]
    pub daemon: Option<std::path::PathBuf>,
    /// Load this command's own probes even when a daemon is running (needs privileges).
    #[arg(long)]
    pub standalone: bool,
}

const SERVE_EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch serve                          http://127.0.0.1:9924/metrics, every namespace
    tcpwatch serve --listen 0.0.0.0:9924    reachable from other hosts (an explicit choice)
    tcpwatch serve --max-listeners 20       fewer per-listener series";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to serve /metrics and /healthz on. Binding beyond loopback is your choice.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9924")]
    pub listen: std::net::SocketAddr,
    /// Listening addresses exposed one by one (the most troubled first); the queue gauges of the rest are summed into addr="other".
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10000))]
    pub max_listeners: u16,
    /// A CLOSE_WAIT socket idle this long counts as a leak finding.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub close_wait_secs: u64,
    /// How long closed sockets and listeners stay in the model (hidden: the short soak).
    #[arg(long, value_name = "SECS", default_value_t = 60, hide = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub retention_secs: u64,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

const CHECK_EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch check --no-listen-overflow --max-retransmits syn=0 -- ./run-integration-tests
    tcpwatch check --close-wait-leak 5 --junit tcp.xml -- make test
    tcpwatch check --any-process --port 8080 --max-resets 0 -- ./load-test.sh

EXIT STATUS:
    0  every assertion held, no event was lost, the command succeeded
    1  an assertion failed (lost events cannot undo a failure)
    2  usage or runtime error (tcpwatch could not observe)
    3  the assertions held but the command failed (non-zero exit or a signal)
    4  inconclusive: events were lost and --allow-loss was not given";

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// At most N retransmits in all, or of one kind with KIND=N (syn, synack, data, fin). Repeatable.
    #[arg(long = "max-retransmits", value_name = "[KIND=]N", value_parser = parse_retransmit_limit)]
    pub max_retransmits: Vec<(Option<crate::model::event::RetransmitKind>, u64)>,
    /// No listener may overflow its SYN or accept queue.
    #[arg(long)]
    pub no_listen_overflow: bool,
    /// At most N resets, sent and received together.
    #[arg(long, value_name = "N")]
    pub max_resets: Option<u64>,
    /// At most N of the command's sockets in TIME_WAIT at the same time.
    #[arg(long, value_name = "N")]
    pub max_time_wait: Option<u64>,
    /// Fail when a socket stays in CLOSE_WAIT this long (the application did not close it).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub close_wait_leak: Option<f64>,
    /// Fail when a connect stays in SYN_SENT longer than this.
    #[arg(long, value_name = "MS")]
    pub max_syn_sent_ms: Option<u64>,
    /// Keep observing this long after the command exits (late resets, TIME_WAIT, overflows).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_secs)]
    pub grace: f64,
    /// Judge every process's sockets (still narrowed by the filters), not only the command's
    /// process tree: for a service started outside the command.
    #[arg(long)]
    pub any_process: bool,
    /// Lost events do not make the run inconclusive.
    #[arg(long)]
    pub allow_loss: bool,
    /// Also write the report as JSON to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Also write the report as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

fn parse_retransmit_limit(
    s: &str,
) -> Result<(Option<crate::model::event::RetransmitKind>, u64), String> {
    use crate::model::event::RetransmitKind as K;
    let (kind, n) = match s.split_once('=') {
        Some((k, n)) => {
            let kind = match k {
                "syn" => K::Syn,
                "synack" => K::SynAck,
                "data" => K::Data,
                "fin" => K::Fin,
                _ => {
                    return Err(format!(
                        "`{k}` is not a retransmit kind (syn, synack, data, fin)"
                    ));
                }
            };
            (Some(kind), n)
        }
        None => (None, s),
    };
    let n = n.parse().map_err(|_| format!("`{n}` is not a count"))?;
    Ok((kind, n))
}

const TOP_EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch top                          everything on this host, all namespaces
    tcpwatch top --port 443               only connections with port 443 on either side
    tcpwatch top --record cap.jsonl       also save the events (replayable, same as trace --json)
    tcpwatch top --replay cap.jsonl       inspect a capture elsewhere, no root needed";

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Replay a capture (`trace --json` or `--record` output) instead of watching this host.
    #[arg(long, value_name = "FILE", conflicts_with = "record")]
    pub replay: Option<std::path::PathBuf>,
    /// Replay speed: 0 shows the end at once, 1 replays in real time, 10 ten times faster.
    #[arg(long, default_value_t = 0.0, requires = "replay", value_parser = parse_speed)]
    pub speed: f64,
    /// Also write every event as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub record: Option<std::path::PathBuf>,
    /// Screen refreshes per second.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub refresh: u32,
    /// A CLOSE_WAIT socket idle this long is reported as a leak.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub close_wait_secs: u64,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

const SNAPSHOT_EXAMPLES: &str = "\
EXAMPLES:
    tcpwatch snapshot                       sockets, listeners and findings right now
    tcpwatch snapshot --duration 10         also watch events for 10 s (retransmits, overflows, ...)
    tcpwatch snapshot --json --netns myns   one JSON document for namespace myns";

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// One JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also watch events for this many seconds before reporting (Ctrl-C ends early).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = parse_secs, conflicts_with = "since")]
    pub duration: f64,
    /// Report the past window up to now from the daemon's record (90s, 15m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = parse_since, conflicts_with = "standalone")]
    pub since: Option<u64>,
    /// A CLOSE_WAIT socket idle this long is reported as a leak.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub close_wait_secs: u64,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `90s`, `15m`, `2h`, `1d` (or plain seconds) as nanoseconds.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (90s, 15m, 2h)"))?;
    let mult = match unit {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("`{s}`: the unit is s, m, h or d (90s, 15m, 2h)")),
    };
    let secs = v * mult;
    if !secs.is_finite() || secs <= 0.0 || secs > 366.0 * 86_400.0 {
        return Err(format!("`{s}` is not a duration between 1s and a year"));
    }
    Ok((secs * 1e9) as u64)
}

fn parse_speed(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() || !(0.0..=1e6).contains(&v) {
        return Err(format!("{s} is not a speed between 0 and 1000000"));
    }
    Ok(v)
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("{v} is not between 0 and 86400 seconds"));
    }
    Ok(v)
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Start with the daemon's recorded events from this long ago (90s, 15m, 2h), then
    /// follow live.
    #[arg(long, value_name = "DURATION", value_parser = parse_since, conflicts_with = "standalone")]
    pub since: Option<u64>,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only sockets with this port on either side.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only sockets with this local port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub lport: Option<u16>,
    /// Only sockets with this remote port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub rport: Option<u16>,
    /// Only sockets owned by this process id.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// Only sockets whose owner's command name is exactly this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only this network namespace: a name from `ip netns`, a path such as /proc/PID/ns/net, or an inode number.
    /// Started in a namespace other than the host's (`ip netns exec`, a container), the default is that namespace.
    #[arg(long)]
    pub netns: Option<String>,
    /// Every network namespace, also when started in one that is not the host's.
    #[arg(long, conflicts_with = "netns")]
    pub all_netns: bool,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

impl FilterArgs {
    /// Whether the filters select some sockets of a namespace rather than whole namespaces:
    /// the kernel's counters then count more than what is shown.
    pub fn narrows_sockets(&self) -> bool {
        self.port.is_some()
            || self.lport.is_some()
            || self.rport.is_some()
            || self.pid.is_some()
            || self.comm.is_some()
            || self.ipv4
            || self.ipv6
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct ProbeArgs {
    /// Also show the kernel programs' debug diagnostics on stderr (their warnings, such as a
    /// full socket map, are always shown).
    #[arg(long)]
    pub log_ebpf: bool,
    /// Ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 16, value_parser = parse_ring_mib)]
    pub ring_mib: u32,
    /// Do not use this kind of hook even where the kernel has it; for testing fallbacks.
    #[arg(
        long = "disable-hook",
        value_name = "KIND",
        hide = true,
        value_parser = ["tp_btf", "fentry", "task_file", "iter_tcp", "sock_diag", "tcpdiag_getsock", "listener_map"]
    )]
    pub disable_hook: Vec<String>,
    /// Resize a map of the eBPF object (NAME=N); for testing what happens at its limit.
    #[arg(long = "map-entries", value_name = "NAME=N", hide = true, value_parser = parse_map_entries)]
    pub map_entries: Vec<(String, u32)>,
}

/// `NAME=N`: a map of the eBPF object and its size (hidden: tests shrink maps to reach their
/// limits).
fn parse_map_entries(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=N"))?;
    let n: u32 = n.parse().map_err(|_| format!("`{n}` is not a number"))?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
        || n == 0
    {
        return Err(format!("`{s}` is not a map NAME=N with N > 0"));
    }
    Ok((name.to_string(), n))
}

fn parse_ring_mib(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(1..=1024).contains(&v) || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two between 1 and 1024"));
    }
    Ok(v)
}
