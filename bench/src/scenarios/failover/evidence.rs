//! Where a crash's detection time goes, measured from outside the servers: per client
//! connection, the RTT estimate and when it last heard from its node (a QUIC connection gives
//! up after `max(idle timeout, 3 PTO)` of silence, and the PTO grows with the measured RTT and
//! its variance); per process, CPU time and time spent runnable but waiting for a CPU; and UDP
//! datagrams the kernel dropped (`/proc/net/snmp`, `/proc/net/udp`).
//!
//! Nothing here changes what the clients do: the sampler only reads quinn's statistics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::session::Record;
use crate::util::{cpu_us, now_ns, runq_wait_us};

/// A process whose CPU and run-queue wait are read.
pub struct Proc {
    pub name: String,
    pub pid: u32,
}

/// CPU time (ticks), run-queue wait and CPU time (ns-exact, schedstat) of each process at one
/// moment, µs.
#[derive(Clone)]
pub struct Times {
    at_ns: u64,
    of: Vec<(f64, f64, f64)>,
}

pub fn times(procs: &[Proc]) -> Times {
    Times {
        at_ns: now_ns(),
        of: procs
            .iter()
            .map(|p| {
                (
                    cpu_us(p.pid).unwrap_or(f64::NAN),
                    runq_wait_us(p.pid),
                    run_us(p.pid),
                )
            })
            .collect(),
    }
}

/// Time a process's threads ran on a CPU, µs (`/proc/PID/task/*/schedstat`, first field, ns;
/// exact, where `/proc/PID/stat` counts 10 ms ticks).
fn run_us(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e3
}

/// CPU ms the process named `name` ran between two moments (None if it is not in `procs`).
pub fn run_ms(procs: &[Proc], a: &Times, b: &Times, name: &str) -> Option<f64> {
    let i = procs.iter().position(|p| p.name == name)?;
    let v = (b.of.get(i)?.2 - a.of.get(i)?.2) / 1e3;
    v.is_finite().then_some(v)
}

/// Ownership changes the control plane applied (`gatesvr_cp_session_claims_total` of the
/// first control-plane node that answers, from its admin listener's `/metrics`; every member
/// counts what it applies, so one answers for all): the claims a reconnect burst cost.
pub async fn cp_claims(admins: &[SocketAddr]) -> Option<u64> {
    for a in admins {
        let Some(text) = http_get(*a, "/metrics").await else {
            continue;
        };
        let v = text.lines().find_map(|l| {
            l.strip_prefix("gatesvr_cp_session_claims_total ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(v) = v {
            return Some(v as u64);
        }
    }
    None
}

/// Each data plane's TLS counters (`gatesvr_tls_handshakes_total` by kind,
/// `gatesvr_tls_tickets_total` by outcome) from its `/metrics`; None where the node does not
/// answer or does not export them (an older build).
pub async fn tls_counts(
    metrics: &[Option<std::net::SocketAddr>],
) -> Vec<Option<HashMap<&'static str, u64>>> {
    let mut out = Vec::new();
    for addr in metrics {
        let text = match addr {
            Some(a) => http_get(*a, "/metrics").await,
            None => None,
        };
        out.push(text.and_then(|t| parse_tls_counts(&t)));
    }
    out
}

fn parse_tls_counts(text: &str) -> Option<HashMap<&'static str, u64>> {
    let mut out = HashMap::new();
    for (key, series) in [
        ("full", "gatesvr_tls_handshakes_total{kind=\"full\"} "),
        ("resumed", "gatesvr_tls_handshakes_total{kind=\"resumed\"} "),
        ("issued", "gatesvr_tls_tickets_total{outcome=\"issued\"} "),
        ("refused", "gatesvr_tls_tickets_total{outcome=\"refused\"} "),
    ] {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = v {
            out.insert(key, v as u64);
        }
    }
    out.contains_key("full").then_some(out)
}

/// Each data plane's takeover evidence from its `/metrics`: the series of
/// `gatesvr_sessions_recovered_total{outcome}` and the sum and count of
/// `gatesvr_start_phase_seconds{phase}` (keys `recovered_<outcome>`,
/// `<phase>_sum`, `<phase>_count`), and of what became of Starts during a
/// control-plane election: `gatesvr_provisional_sessions_total{outcome}`,
/// `gatesvr_connections_rejected_total{reason}` and
/// `gatesvr_start_claim_retries_total` (keys `provisional_<outcome>`,
/// `rejected_<reason>`, `claim_retries`). A series a build does not export is
/// absent.
pub async fn takeover_counts(metrics: &[Option<SocketAddr>]) -> Vec<HashMap<String, f64>> {
    let mut out = Vec::new();
    for addr in metrics {
        let text = match addr {
            Some(a) => http_get(*a, "/metrics").await,
            None => None,
        };
        out.push(text.map(|t| parse_takeover_counts(&t)).unwrap_or_default());
    }
    out
}

fn parse_takeover_counts(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let key = if let Some(rest) =
            series.strip_prefix("gatesvr_sessions_recovered_total{outcome=\"")
        {
            rest.strip_suffix("\"}").map(|o| format!("recovered_{o}"))
        } else if let Some(rest) = series.strip_prefix("gatesvr_start_phase_seconds_sum{phase=\"") {
            rest.strip_suffix("\"}").map(|p| format!("{p}_sum"))
        } else if let Some(rest) = series.strip_prefix("gatesvr_start_phase_seconds_count{phase=\"")
        {
            rest.strip_suffix("\"}").map(|p| format!("{p}_count"))
        } else if let Some(rest) =
            series.strip_prefix("gatesvr_provisional_sessions_total{outcome=\"")
        {
            rest.strip_suffix("\"}").map(|o| format!("provisional_{o}"))
        } else if let Some(rest) =
            series.strip_prefix("gatesvr_connections_rejected_total{reason=\"")
        {
            rest.strip_suffix("\"}").map(|r| format!("rejected_{r}"))
        } else if series == "gatesvr_start_claim_retries_total" {
            Some("claim_retries".to_string())
        } else {
            None
        };
        if let Some(key) = key {
            out.insert(key, value);
        }
    }
    out
}

/// `key`'s growth between two readings, summed over the data planes that
/// answered both; None if none did.
pub fn grown(a: &[HashMap<String, f64>], b: &[HashMap<String, f64>], key: &str) -> Option<f64> {
    let mut sum = None;
    for (x, y) in a.iter().zip(b) {
        if let Some(v) = y.get(key) {
            *sum.get_or_insert(0.0) += v - x.get(key).copied().unwrap_or(0.0);
        }
    }
    sum
}

/// A plain HTTP/1.0 GET; the body, or None (500 ms at most).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_string())
    };
    tokio::time::timeout(Duration::from_millis(500), fut)
        .await
        .ok()
        .flatten()
}

/// Per process between two moments: (name, CPU %, ms waited for a CPU per s).
pub fn window(procs: &[Proc], a: &Times, b: &Times) -> Vec<(String, f64, f64)> {
    let secs = (b.at_ns.saturating_sub(a.at_ns) as f64 / 1e9).max(1e-3);
    procs
        .iter()
        .zip(a.of.iter().zip(&b.of))
        .map(|(p, (x, y))| {
            (
                p.name.clone(),
                (y.0 - x.0) / 1e4 / secs,
                (y.1 - x.1) / 1e3 / secs,
            )
        })
        .collect()
}

/// `RcvbufErrors` of the `Udp:` lines of /proc/net/snmp (datagrams dropped because a socket's
/// receive buffer was full, all sockets of the machine).
pub fn udp_rcvbuf_errors() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (udp.next(), udp.next()) else {
        return 0;
    };
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The `drops` column of /proc/net/udp and /proc/net/udp6, by local port.
pub fn udp_drops() -> HashMap<u16, u64> {
    let mut out = HashMap::new();
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = cols
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let drops = cols.last().and_then(|d| d.parse::<u64>().ok());
            if let (Some(port), Some(drops)) = (port, drops) {
                *out.entry(port).or_default() += drops;
            }
        }
    }
    out
}

/// One connection's counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snap {
    /// `quinn::Connection::stable_id`.
    pub id: usize,
    pub rtt_ns: u64,
    pub pings: u64,
    pub tx: u64,
    pub rx: u64,
}

/// Every session's current connection (None if it has none, or it is closed).
pub fn snaps(recs: &[Arc<Mutex<Record>>]) -> Vec<Option<Snap>> {
    recs.iter()
        .map(|r| {
            let conn = r.lock().conn.clone()?;
            if conn.close_reason().is_some() {
                return None;
            }
            let s = conn.stats();
            Some(Snap {
                id: conn.stable_id(),
                rtt_ns: s.path.rtt.as_nanos() as u64,
                pings: s.frame_tx.ping,
                tx: s.udp_tx.datagrams,
                rx: s.udp_rx.datagrams,
            })
        })
        .collect()
}

/// What the sampler saw of one connection.
#[derive(Debug, Clone, Default)]
pub struct Track {
    /// `quinn::Connection::stable_id`.
    pub id: usize,
    /// When the number of datagrams received last changed (observed at a sample, so up to one
    /// sampling period after the datagram arrived).
    pub last_rx_ns: u64,
    pub rx: u64,
    /// Smoothed RTT, highest sampled while the connection was open.
    pub max_rtt_ns: u64,
    pub closed: bool,
}

/// Samples every session's current connection every `every` until stopped.
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Vec<Track>>>,
}

impl Sampler {
    pub fn spawn(recs: Vec<Arc<Mutex<Record>>>, every: Duration) -> Sampler {
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tracks: Vec<Vec<Track>> = vec![Vec::new(); recs.len()];
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let now = now_ns();
                for (rec, tracks) in recs.iter().zip(tracks.iter_mut()) {
                    let Some(conn) = rec.lock().conn.clone() else {
                        continue;
                    };
                    sample(&conn, now, tracks);
                }
            }
            tracks
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Vec<Vec<Track>> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

fn sample(conn: &quinn::Connection, now: u64, tracks: &mut Vec<Track>) {
    let id = conn.stable_id();
    let s = conn.stats();
    let rtt = s.path.rtt.as_nanos() as u64;
    let closed = conn.close_reason().is_some();
    match tracks.last_mut() {
        Some(t) if t.id == id => {
            if s.udp_rx.datagrams != t.rx {
                t.rx = s.udp_rx.datagrams;
                t.last_rx_ns = now;
            }
            if !t.closed {
                t.max_rtt_ns = t.max_rtt_ns.max(rtt);
            }
            t.closed |= closed;
        }
        _ => tracks.push(Track {
            id,
            last_rx_ns: now,
            rx: s.udp_rx.datagrams,
            max_rtt_ns: rtt,
            closed,
        }),
    }
}

/// How late this process's runtime wakes a 10 ms timer (the load generator's own scheduling
/// lag: when it is large, the clients notice losses and answers late, and their RTT samples
/// include it).
pub struct Lag {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(u64, u64)>>,
}

impl Lag {
    pub fn spawn() -> Lag {
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            let period = Duration::from_millis(10);
            loop {
                let t0 = now_ns();
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    _ = stop_rx.changed() => break,
                }
                let t1 = now_ns();
                out.push((t1, (t1 - t0).saturating_sub(period.as_nanos() as u64)));
            }
            out
        });
        Lag { stop, task }
    }

    /// (wake ns, lateness ns) of every wake-up.
    pub async fn finish(self) -> Vec<(u64, u64)> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_counts_are_read_from_the_prometheus_text_and_their_growth_summed() {
        let before = parse_takeover_counts(
            "gatesvr_sessions_recovered_total{outcome=\"retried\"} 2\n\
             gatesvr_start_phase_seconds_sum{phase=\"claim\"} 0.5\n\
             gatesvr_start_phase_seconds_count{phase=\"claim\"} 10\n\
             gatesvr_start_phase_seconds_bucket{phase=\"claim\",le=\"0.1\"} 9\n",
        );
        assert_eq!(before.get("recovered_retried"), Some(&2.0));
        assert_eq!(before.get("claim_sum"), Some(&0.5));
        assert_eq!(before.get("claim_count"), Some(&10.0));
        assert_eq!(before.len(), 3, "buckets are not read: {before:?}");
        let after = parse_takeover_counts(
            "gatesvr_sessions_recovered_total{outcome=\"retried\"} 5\n\
             gatesvr_start_phase_seconds_sum{phase=\"claim\"} 2.5\n\
             gatesvr_start_phase_seconds_count{phase=\"claim\"} 30\n",
        );
        // Two data planes: one answered both times, one (an older build) exports nothing.
        let (a, b) = (vec![before, HashMap::new()], vec![after, HashMap::new()]);
        assert_eq!(grown(&a, &b, "recovered_retried"), Some(3.0));
        assert_eq!(grown(&a, &b, "claim_count"), Some(20.0));
        assert_eq!(grown(&a, &b, "view_wait_count"), None);
    }
}
