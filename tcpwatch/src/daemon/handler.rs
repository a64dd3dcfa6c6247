//! The API's requests answered: snapshots of windows (replayed from the record on a worker
//! thread, two at a time), the live model and timelines (from the model thread), frames,
//! readings, and subscriptions (the record from the asked time, then live events, without a
//! gap or a duplicate at the seam).
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::messages::{Chunk, Queued, SUB_QUEUE, Up};
use super::shared::Shared;
use super::{access, window};
use crate::model::api::{
    API_VERSION, Body, Hello, NsReading, Op, Reply, Request, Response, StreamNote,
};
use crate::model::snapshot::{LossView, SocketView};
use crate::output::trace::TraceWriter;
use crate::recorder::{Table, query, store};
use crate::server::api::{Answer, Handler, Peer, Pending, failure};
use crate::settings::Filters;

pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    pub fn new(shared: Arc<Shared>) -> Api {
        Api { shared }
    }
}

fn line(body: Body) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Response::Ok(Reply { ok: true, body })).unwrap_or_default();
    v.push(b'\n');
    v
}

fn answer(r: anyhow::Result<Body>) -> Answer {
    Answer::Line(match r {
        Ok(b) => line(b),
        Err(e) => failure(format!("{e:#}")),
    })
}

/// How long a request waits for the model thread.
const MODEL_WAIT: Duration = Duration::from_secs(10);

async fn ask_model<T>(shared: &Shared, up: Up, rx: oneshot::Receiver<T>) -> anyhow::Result<T> {
    shared
        .up
        .try_send(up)
        .map_err(|_| anyhow::anyhow!("the daemon is busy; try again"))?;
    shared.waker.wake();
    match tokio::time::timeout(MODEL_WAIT, rx).await {
        Ok(Ok(v)) => Ok(v),
        _ => anyhow::bail!("the daemon did not answer in time"),
    }
}

impl Handler for Api {
    fn allowed(&self, peer: &Peer) -> Result<(), String> {
        access::check(peer, self.shared.group)
    }

    fn hello(&self) -> Vec<u8> {
        let s = &self.shared;
        let h = Hello {
            service: "tcpwatch".into(),
            api: API_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            host: s.ctx.host.clone(),
            kernel: s.ctx.kernel.clone(),
            pid: std::process::id(),
            started_wall_ns: s.started_wall_ns,
            clock_offset_ns: s.clock.offset_ns as i64,
            reasons: s.ctx.reasons.entries(),
            record: s.recorder.as_ref().map(|r| r.span()),
        };
        let mut v = serde_json::to_vec(&h).unwrap_or_default();
        v.push(b'\n');
        v
    }

    fn handle(&self, _peer: Peer, req: Request) -> Pending {
        let shared = self.shared.clone();
        Box::pin(async move {
            match req.op {
                Op::Snapshot {
                    from_wall_ns,
                    to_wall_ns,
                    filters,
                    close_wait_secs,
                } => {
                    let Ok(_permit) = shared.heavy.acquire().await else {
                        return Answer::Line(failure("the daemon is stopping"));
                    };
                    let sh = shared.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        window::snapshot(
                            &sh,
                            &window::Ask {
                                from_wall_ns,
                                to_wall_ns,
                                filters,
                                close_wait_secs,
                            },
                        )
                    })
                    .await;
                    answer(match r {
                        Ok(Ok((snapshot, history))) => Ok(Body::Snapshot {
                            snapshot: Box::new(snapshot),
                            history,
                        }),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(anyhow::anyhow!("the snapshot failed: {e}")),
                    })
                }
                Op::Live {
                    filters,
                    close_wait_secs,
                    connections,
                } => {
                    let (tx, rx) = oneshot::channel();
                    let up = Up::Live {
                        filters,
                        close_wait_secs,
                        connections: connections.min(20_000),
                        reply: tx,
                    };
                    answer(ask_model(&shared, up, rx).await.and_then(|r| r).map(
                        |(snapshot, connections, events_seen)| Body::Live {
                            snapshot: Box::new(snapshot),
                            connections,
                            events_seen,
                        },
                    ))
                }
                Op::Timeline {
                    cookie,
                    local,
                    remote,
                    netns,
                } => answer(timelines(&shared, cookie, local, remote, netns).await),
                Op::Frames {
                    from_wall_ns,
                    to_wall_ns,
                } => {
                    let sh = shared.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        window::frames(&sh, from_wall_ns, to_wall_ns)
                    })
                    .await;
                    answer(match r {
                        Ok(r) => r.map(|frames| Body::Frames { frames }),
                        Err(e) => Err(anyhow::anyhow!("{e}")),
                    })
                }
                Op::Readings => {
                    let sh = shared.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        let inv = sh.status(|s| s.inventory.clone());
                        let (_, nss) = match inv {
                            Some(i) => i.read_with(false),
                            None => (Vec::new(), Vec::new()),
                        };
                        let (loss, hooks, events) =
                            sh.status(|s| (s.loss, s.hooks.clone(), s.events_seen));
                        let mut lv = LossView::of(&loss);
                        if let Some(r) = &sh.recorder {
                            lv.recorder_dropped = r.span().dropped;
                        }
                        Body::Readings {
                            namespaces: nss.iter().map(NsReading::of).collect(),
                            hooks,
                            loss: lv,
                            events_seen: events,
                        }
                    })
                    .await;
                    answer(r.map_err(|e| anyhow::anyhow!("{e}")))
                }
                Op::Subscribe {
                    from_wall_ns,
                    filters,
                } => subscribe(shared, from_wall_ns, filters).await,
            }
        })
    }
}

/// Timelines the live model holds, then those in the record (their times moved onto this
/// boot's monotonic clock, as the live ones are).
async fn timelines(
    shared: &Arc<Shared>,
    cookie: Option<u64>,
    local: Option<String>,
    remote: Option<String>,
    netns: Option<u32>,
) -> anyhow::Result<Body> {
    if cookie.is_none() && (local.is_none() || remote.is_none()) {
        anyhow::bail!("a timeline is asked for by cookie, or by local and remote endpoints");
    }
    let (tx, rx) = oneshot::channel();
    let up = Up::Timeline {
        cookie,
        local: local.clone(),
        remote: remote.clone(),
        netns,
        reply: tx,
    };
    let mut found: Vec<SocketView> = ask_model(shared, up, rx).await?;
    let mut recorded = vec![false; found.len()];
    if let Some(rec) = &shared.recorder {
        let dir = rec.dir().to_path_buf();
        let now_offset = shared.clock.offset_ns as i64;
        let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let c = store::open_reader(&dir)?;
            let which = match cookie {
                Some(c) => query::Which::Cookie(c),
                None => query::Which::Endpoints {
                    local: local.as_deref().unwrap_or(""),
                    remote: remote.as_deref().unwrap_or(""),
                    netns,
                },
            };
            Ok(query::timelines(&c, &which, 100)?)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))??;
        for (mut v, offset) in rows {
            // A timeline still in the live model was also recorded when it left: once.
            if found.iter().any(|f| f.cookie == v.cookie && v.cookie != 0) {
                continue;
            }
            v.shift(offset - now_offset);
            found.push(v);
            recorded.push(true);
        }
    }
    Ok(Body::Timelines {
        timelines: found,
        recorded,
        clock_offset_ns: shared.clock.offset_ns as i64,
    })
}

/// The record from `from` (when asked), then live events. Registered first, so nothing
/// published while the record is read is missed; the live part then skips what the record
/// already gave.
async fn subscribe(
    shared: Arc<Shared>,
    from: Option<i64>,
    filters: crate::model::api::Filters,
) -> Answer {
    let f = match Filters::from_api(&filters) {
        Ok(f) => f,
        Err(e) => return Answer::Line(failure(format!("{e:#}"))),
    };
    if from.is_some() && shared.recorder.is_none() {
        return Answer::Line(failure("this daemon keeps no record (--state-dir off)"));
    }
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Chunk>(SUB_QUEUE);
    let queued: Queued = Default::default();
    let (tx, rx) = oneshot::channel();
    let up = Up::Subscribe {
        filters: f.clone(),
        tx: chunk_tx,
        queued: queued.clone(),
        reply: tx,
    };
    match ask_model(&shared, up, rx).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Answer::Line(failure(e)),
        Err(e) => return Answer::Line(failure(format!("{e:#}"))),
    }
    let starts = match (from, &shared.recorder) {
        (Some(from), Some(r)) => Some(r.span().events_from_wall_ns.map_or(from, |e| e.max(from))),
        _ => None,
    };
    let first = line(Body::Subscribed {
        from_wall_ns: starts,
    });
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        let mut last_wall = i64::MIN;
        if let (Some(from), Some(rec)) = (from, shared.recorder.clone()) {
            let out = out_tx.clone();
            let sh = shared.clone();
            let r = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
                rec.syncer().sync(Duration::from_secs(5));
                let c = store::open_reader(rec.dir())?;
                let mut last = i64::MIN;
                // The recorded events written as the live ones are: `trace --json` lines.
                let mut w =
                    TraceWriter::new(Vec::new(), true, sh.clock, crate::settings::own_netns())
                        .with_reasons(sh.ctx.reasons.clone());
                let mut gone = false;
                query::events(&c, Table::Events, from, None, |wall, mut e| {
                    if !f.accepts_event(&e) {
                        return true;
                    }
                    e.ts_ns = sh.mono(wall);
                    let _ = w.event(&e);
                    last = last.max(wall);
                    if w.pending_len() >= 60 << 10 {
                        gone = out.blocking_send(w.take_lines()).is_err();
                    }
                    !gone
                })?;
                let buf = w.take_lines();
                if !buf.is_empty() && !gone {
                    let _ = out.blocking_send(buf);
                }
                Ok(last)
            })
            .await;
            match r {
                Ok(Ok(l)) => last_wall = l,
                Ok(Err(e)) => {
                    let _ = out_tx
                        .send(failure(format!("reading the record: {e:#}")))
                        .await;
                    return;
                }
                Err(_) => return,
            }
        }
        let mut note = serde_json::to_vec(&StreamNote::Live).unwrap_or_default();
        note.push(b'\n');
        if out_tx.send(note).await.is_err() {
            return;
        }
        while let Some(c) = chunk_rx.recv().await {
            queued.fetch_sub(c.bytes(), std::sync::atomic::Ordering::Relaxed);
            let mut out = c.notes;
            if c.walls.first().is_some_and(|w| *w <= last_wall) {
                // The seam: lines the record already gave are skipped.
                let mut start = 0;
                for (i, w) in c.walls.iter().enumerate() {
                    let end = start
                        + c.lines[start..]
                            .iter()
                            .position(|b| *b == b'\n')
                            .map_or(c.lines.len() - start, |p| p + 1);
                    if *w > last_wall {
                        out.extend_from_slice(&c.lines[start..end]);
                    }
                    start = end;
                    let _ = i;
                }
            } else {
                out.extend_from_slice(&c.lines);
            }
            if !out.is_empty() && out_tx.send(out).await.is_err() {
                return;
            }
        }
    });
    Answer::Stream { first, rx: out_rx }
}
