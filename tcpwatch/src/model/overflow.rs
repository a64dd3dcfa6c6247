//! Listen-queue overflows no event reports: SYN-time drops and syncookies. Between two samples
//! of a namespace, each listener's own drop counter says how many packets it dropped (every
//! listen drop counts there), and the namespace's MIB deltas say why: `ListenOverflows` (accept
//! queue full), `TCPReqQFullDrop` (SYN queue full), `SyncookiesSent` (SYN queue full, cookies
//! sent instead of dropping).
use super::event::{OverflowAction, Queue};

/// A listener as two consecutive samples saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerDelta {
    pub skaddr: u64,
    /// Increase of the listener's drop counter.
    pub drops: u64,
    /// Final-ACK overflows reported one by one (kfree_skb) in the window: each one counted
    /// twice in `drops`.
    pub final_ack_seen: u64,
    pub syn_queue: u32,
    pub accept_max: u32,
}

/// One inferred overflow: `count` packets of `listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inferred {
    pub listener: u64,
    pub queue: Queue,
    pub action: OverflowAction,
    pub count: u64,
}

/// Final-ACK overflows reported one by one, kept by listener until a sample of that listener's
/// drop counter includes them. Each is claimed by the first sample whose socket read began
/// after it: the kernel counts the drop before the packet is freed, so that read saw both
/// counts. One that comes later (the reader drains the rings in batches) waits for the next.
#[derive(Debug, Default)]
pub struct FinalAckLedger {
    by_listener: rustc_hash::FxHashMap<u64, Vec<(u64, u64)>>,
}

/// An overflow no sample has claimed this long belongs to a listener the samples no longer
/// list (it closed before a read): it is forgotten. Samples come every 250 ms.
pub const LEDGER_TTL_NS: u64 = 5_000_000_000;

/// At most this many listeners are held; beyond, the one whose oldest overflow is oldest
/// goes first (a flood of closing listeners between two prunes).
const LEDGER_LISTENERS: usize = 4096;

impl FinalAckLedger {
    pub fn record(&mut self, listener: u64, ts_ns: u64, count: u64) {
        if self.by_listener.len() >= LEDGER_LISTENERS
            && !self.by_listener.contains_key(&listener)
            && let Some(oldest) = self
                .by_listener
                .iter()
                .min_by_key(|(_, v)| v.first().map_or(0, |e| e.0))
                .map(|(k, _)| *k)
        {
            self.by_listener.remove(&oldest);
        }
        self.by_listener
            .entry(listener)
            .or_default()
            .push((ts_ns, count));
    }

    /// Forgets overflows older than [`LEDGER_TTL_NS`] at `now`: no sample will claim them.
    pub fn prune(&mut self, now: u64) {
        let cut = now.saturating_sub(LEDGER_TTL_NS);
        self.by_listener.retain(|_, v| {
            v.retain(|&(ts, _)| ts >= cut);
            !v.is_empty()
        });
    }

    /// Listeners with unclaimed overflows.
    pub fn len(&self) -> usize {
        self.by_listener.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_listener.is_empty()
    }

    /// The overflows of `listener` before `read_at`, taken out of the ledger.
    pub fn claim(&mut self, listener: u64, read_at: u64) -> u64 {
        let Some(v) = self.by_listener.get_mut(&listener) else {
            return 0;
        };
        let mut n = 0;
        v.retain(|&(ts, c)| {
            let before = ts < read_at;
            if before {
                n += c;
            }
            !before
        });
        if v.is_empty() {
            self.by_listener.remove(&listener);
        }
        n
    }
}

/// The namespace counters that explain listener drops, as deltas over the sample window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Causes {
    pub listen_overflows: u64,
    pub reqq_full_drop: u64,
    pub syncookies_sent: u64,
}

/// Trims the listeners' drop deltas to the namespace's `ListenDrops` (plus what the previous
/// window left unexplained) and returns how much of that budget they use. A listener's own
/// counter counts more than listen drops: every final-ACK overflow twice (the kernel's
/// `tcp_listendrop` and again when the ACK is discarded), and backlog or filter drops once.
/// `ListenDrops` counts each listen drop once, so the per-listener deltas only apportion it:
/// first the second counts of the final-ACK overflows seen one by one come off, then the rest
/// in proportion, largest remainders first (exact when one listener drops in a window).
pub fn cap_to_listen_drops(listeners: &mut [ListenerDelta], budget: u64) -> u64 {
    let mut sum: u64 = listeners.iter().map(|l| l.drops).sum();
    for l in listeners.iter_mut() {
        let t = l
            .final_ack_seen
            .min(l.drops)
            .min(sum.saturating_sub(budget));
        l.drops -= t;
        sum -= t;
    }
    if sum <= budget {
        return sum;
    }
    let mut shares: Vec<(usize, u64, u64)> = listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.drops > 0)
        .map(|(i, l)| {
            let num = l.drops as u128 * budget as u128;
            (i, (num / sum as u128) as u64, (num % sum as u128) as u64)
        })
        .collect();
    let mut left = budget - shares.iter().map(|s| s.1).sum::<u64>();
    shares.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    for s in shares.iter_mut() {
        if left == 0 {
            break;
        }
        s.1 += 1;
        left -= 1;
    }
    for (i, share, _) in shares {
        listeners[i].drops = share;
    }
    budget
}

/// The namespace's `ListenDrops` that no listener counter showed yet. The counters are read
/// just after the sockets, so a drop in between is in this window's `ListenDrops` and the
/// next window's listener deltas: one window's leftover is carried, no more.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenDropBudget {
    unseen: u64,
}

impl ListenDropBudget {
    /// Trims one window's listener deltas to its `ListenDrops` delta (see
    /// [`cap_to_listen_drops`]).
    pub fn trim(&mut self, listeners: &mut [ListenerDelta], listen_drops: u64) {
        let budget = listen_drops + self.unseen;
        let used = cap_to_listen_drops(listeners, budget);
        self.unseen = (budget - used).min(listen_drops);
    }

    /// A window whose sockets could not be listed: its drops show in the next window's
    /// listener deltas, so its `ListenDrops` go with them.
    pub fn skip(&mut self, listen_drops: u64) {
        self.unseen += listen_drops;
    }
}

/// Splits each listener's drops into accept- and SYN-queue overflows (accept first, as the
/// kernel checks the accept queue first), and gives syncookies to the listeners whose SYN queue
/// is full (the only ones that send them), or to the fullest one.
pub fn infer(listeners: &[ListenerDelta], causes: Causes) -> Vec<Inferred> {
    let mut out = Vec::new();
    let (mut acc_left, mut syn_left) = (causes.listen_overflows, causes.reqq_full_drop);
    for l in listeners.iter().filter(|l| l.drops > 0) {
        let acc = l.drops.min(acc_left);
        acc_left -= acc;
        let mut rest = l.drops - acc;
        let syn = rest.min(syn_left);
        syn_left -= syn;
        rest -= syn;
        // Drops the counters do not explain (out of memory, a counter read in between): still
        // listen drops; report them with the queue that overflowed most often.
        let (acc, syn) = if acc >= syn {
            (acc + rest, syn)
        } else {
            (acc, syn + rest)
        };
        if acc > 0 {
            out.push(Inferred {
                listener: l.skaddr,
                queue: Queue::Accept,
                action: OverflowAction::Dropped,
                count: acc,
            });
        }
        if syn > 0 {
            out.push(Inferred {
                listener: l.skaddr,
                queue: Queue::Syn,
                action: OverflowAction::Dropped,
                count: syn,
            });
        }
    }
    if causes.syncookies_sent > 0 {
        let full: Vec<&ListenerDelta> = listeners
            .iter()
            .filter(|l| l.accept_max > 0 && l.syn_queue >= l.accept_max)
            .collect();
        let target = if full.len() == 1 {
            Some(full[0])
        } else {
            listeners
                .iter()
                .max_by_key(|l| (l.syn_queue as u64 * 1000) / l.accept_max.max(1) as u64)
        };
        if let Some(t) = target {
            out.push(Inferred {
                listener: t.skaddr,
                queue: Queue::Syn,
                action: OverflowAction::Cookies,
                count: causes.syncookies_sent,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(skaddr: u64, drops: u64, syn_queue: u32, max: u32) -> ListenerDelta {
        ListenerDelta {
            skaddr,
            drops,
            final_ack_seen: 0,
            syn_queue,
            accept_max: max,
        }
    }

    #[test]
    fn final_acks_are_claimed_by_the_first_read_after_them() {
        let mut led = FinalAckLedger::default();
        led.record(7, 100, 1);
        led.record(7, 200, 1);
        led.record(8, 150, 2);
        // A read that began at 150 saw the first overflow only.
        assert_eq!(led.claim(7, 150), 1);
        assert_eq!(led.claim(7, 150), 0);
        assert_eq!(led.claim(7, 201), 1);
        assert_eq!(led.claim(8, 151), 2);
        assert_eq!(led.claim(9, 1000), 0);
        assert!(led.by_listener.is_empty());
    }

    #[test]
    fn unclaimed_overflows_expire_and_the_ledger_stays_bounded() {
        let mut led = FinalAckLedger::default();
        // Listeners that closed before any sample claimed their overflows.
        for l in 0..10_000u64 {
            led.record(l, l * 1_000_000, 1);
        }
        assert!(led.len() <= LEDGER_LISTENERS);
        // The newest are kept (the oldest went first), and a live one still claims its own.
        led.record(99_999, 10_000_000_000, 3);
        assert_eq!(led.claim(99_999, 10_000_000_001), 3);
        assert_eq!(led.claim(9_999, 20_000_000_000), 1);
        led.prune(10_000_000_000 + LEDGER_TTL_NS);
        assert!(led.is_empty(), "{} left", led.len());
    }

    #[test]
    fn listener_deltas_within_listen_drops_are_kept() {
        let mut v = [l(1, 3, 0, 4), l(2, 0, 0, 4)];
        assert_eq!(cap_to_listen_drops(&mut v, 5), 3);
        assert_eq!((v[0].drops, v[1].drops), (3, 0));
    }

    #[test]
    fn final_ack_double_counts_are_trimmed_to_listen_drops() {
        // Two final-ACK overflows: the listener counted 4, ListenDrops 2.
        let mut v = [l(1, 4, 0, 2)];
        assert_eq!(cap_to_listen_drops(&mut v, 2), 2);
        assert_eq!(v[0].drops, 2);
        // Shared in proportion, the remainder to the largest fraction; the total is exact.
        let mut v = [l(1, 3, 0, 4), l(2, 4, 0, 4), l(3, 0, 0, 4)];
        assert_eq!(cap_to_listen_drops(&mut v, 5), 5);
        assert_eq!((v[0].drops, v[1].drops, v[2].drops), (2, 3, 0));
        let mut v = [l(1, 2, 0, 4)];
        assert_eq!(cap_to_listen_drops(&mut v, 0), 0);
        assert_eq!(v[0].drops, 0);
    }

    #[test]
    fn final_ack_overflows_seen_say_whose_counts_are_double() {
        // Listener 1: two final-ACK overflows (counted 4); listener 2: two SYN-time drops.
        let mut v = [l(1, 4, 0, 2), l(2, 2, 0, 2)];
        v[0].final_ack_seen = 2;
        assert_eq!(cap_to_listen_drops(&mut v, 4), 4);
        assert_eq!((v[0].drops, v[1].drops), (2, 2));
        // Events seen early (their drops are in the next window) trim nothing beyond the budget.
        let mut v = [l(1, 3, 0, 2)];
        v[0].final_ack_seen = 2;
        assert_eq!(cap_to_listen_drops(&mut v, 3), 3);
        assert_eq!(v[0].drops, 3);
    }

    #[test]
    fn a_drop_between_the_two_reads_is_carried_one_window() {
        let mut b = ListenDropBudget::default();
        // The drop is in ListenDrops, not yet in the listener counter read just before.
        let mut v = [l(1, 0, 0, 4)];
        b.trim(&mut v, 1);
        let mut v = [l(1, 1, 0, 4)];
        b.trim(&mut v, 0);
        assert_eq!(v[0].drops, 1, "counted in the next window");
        // A leftover no listener claims in the next window is not carried further.
        let mut v = [l(1, 0, 0, 4)];
        b.trim(&mut v, 3);
        b.trim(&mut v, 0);
        let mut v = [l(1, 2, 0, 4)];
        b.trim(&mut v, 0);
        assert_eq!(v[0].drops, 0);
        // A window without a socket listing: its drops are in the next deltas.
        b.skip(2);
        let mut v = [l(1, 3, 0, 4)];
        b.trim(&mut v, 1);
        assert_eq!(v[0].drops, 3);
    }

    #[test]
    fn accept_queue_overflow_at_syn_time() {
        let got = infer(
            &[l(1, 0, 0, 4), l(2, 24, 0, 1)],
            Causes {
                listen_overflows: 24,
                ..Default::default()
            },
        );
        assert_eq!(
            got,
            vec![Inferred {
                listener: 2,
                queue: Queue::Accept,
                action: OverflowAction::Dropped,
                count: 24
            }]
        );
    }

    #[test]
    fn syn_queue_full_without_cookies() {
        let got = infer(
            &[l(1, 14, 5, 4)],
            Causes {
                reqq_full_drop: 14,
                ..Default::default()
            },
        );
        assert_eq!(
            got,
            vec![Inferred {
                listener: 1,
                queue: Queue::Syn,
                action: OverflowAction::Dropped,
                count: 14
            }]
        );
    }

    #[test]
    fn mixed_causes_and_two_listeners() {
        let got = infer(
            &[l(1, 3, 0, 8), l(2, 5, 9, 8)],
            Causes {
                listen_overflows: 4,
                reqq_full_drop: 4,
                syncookies_sent: 0,
            },
        );
        assert_eq!(
            got,
            vec![
                Inferred {
                    listener: 1,
                    queue: Queue::Accept,
                    action: OverflowAction::Dropped,
                    count: 3
                },
                Inferred {
                    listener: 2,
                    queue: Queue::Accept,
                    action: OverflowAction::Dropped,
                    count: 1
                },
                Inferred {
                    listener: 2,
                    queue: Queue::Syn,
                    action: OverflowAction::Dropped,
                    count: 4
                },
            ]
        );
    }

    #[test]
    fn cookies_go_to_the_listener_with_a_full_syn_queue() {
        let got = infer(
            &[l(1, 0, 0, 128), l(2, 0, 5, 4)],
            Causes {
                syncookies_sent: 7,
                ..Default::default()
            },
        );
        assert_eq!(
            got,
            vec![Inferred {
                listener: 2,
                queue: Queue::Syn,
                action: OverflowAction::Cookies,
                count: 7
            }]
        );
    }

    #[test]
    fn unexplained_drops_are_kept() {
        let got = infer(&[l(1, 2, 0, 4)], Causes::default());
        assert_eq!(
            got,
            vec![Inferred {
                listener: 1,
                queue: Queue::Accept,
                action: OverflowAction::Dropped,
                count: 2
            }]
        );
    }
}
