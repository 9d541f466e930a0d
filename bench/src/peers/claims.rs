//! Ownership claims: the 3-node control plane (openraft + raft-log, every append fdatasync'ed)
//! against etcd with 3 members (WAL fsync on, its default), both on the server CPU, the same
//! number of concurrent clients, both durable. GateSvr's clients are Starts on one data plane's
//! control-plane client, which batches a burst into one call (`gs_claims_per_call`); etcd's are
//! one Put per call, with the node's lease and without it (plain puts, etcd at its cheapest).
//!
//! GateSvr's claims name the data-plane node whose lease owns them (the node registers once with
//! a lease); the etcd equivalent is one lease granted for the node and one put per session key
//! attached to it (`owner/<openid>` = node, `lease` = the node's lease). etcd is called over
//! gRPC (as its own clients do), on the leader, through one HTTP/2 connection shared by every
//! client task, as the control plane's load is. Both legs are plaintext on loopback (the bench
//! control plane runs with `tls.insecure`).
//!
//! The etcd members are started by `scenarios::claims::start_etcd` (the `claims` scenario's own
//! baseline), not duplicated here.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::report::{Check, Cmp, Report, Round};
use crate::scenarios::Opts;
use crate::scenarios::claims::{claim_load, start_etcd};
use crate::util::{Lat, progress};

/// The few etcd v3 messages used here, written by hand (field numbers from etcd's
/// `api/etcdserverpb/rpc.proto`), so that no protoc or second codegen is needed.
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub lease: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantRequest {
        #[prost(int64, tag = "1")]
        pub ttl: i64,
        #[prost(int64, tag = "2")]
        pub id: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(int64, tag = "2")]
        pub id: i64,
        #[prost(int64, tag = "3")]
        pub ttl: i64,
        #[prost(string, tag = "4")]
        pub error: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(int64, tag = "3")]
        pub db_size: i64,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }
}

/// A unary etcd call over `channel`.
pub(crate) async fn call<Req, Resp>(channel: &Channel, path: &'static str, req: Req) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.context("etcd channel")?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let resp = grpc
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(path),
            codec,
        )
        .await
        .with_context(|| format!("etcd {path}"))?;
    Ok(resp.into_inner())
}

pub(crate) fn channel(addr: SocketAddr) -> Result<Channel> {
    crate::servers::upstream_channel(&addr.to_string())
}

/// The member that is the leader, and etcd's version.
pub(crate) async fn leader(addrs: &[SocketAddr]) -> Result<(SocketAddr, String)> {
    for &a in addrs {
        let s: pb::StatusResponse = call(
            &channel(a)?,
            "/etcdserverpb.Maintenance/Status",
            pb::StatusRequest {},
        )
        .await?;
        if s.header.as_ref().map(|h| h.member_id) == Some(s.leader) {
            return Ok((a, s.version));
        }
    }
    anyhow::bail!("no etcd member says it is the leader")
}

/// `clients` tasks, each a closed loop of puts attached to `lease` (0: a plain put), one
/// HTTP/2 connection.
pub(crate) async fn etcd_load(
    o: &Opts,
    ch: &Channel,
    lease: i64,
    clients: usize,
    round: usize,
) -> Result<(f64, Lat, u64)> {
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.window;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut n, mut errors, mut i) = (Lat::default(), 0u64, 0u64, 0u64);
            while Instant::now() < end {
                let req = pb::PutRequest {
                    key: format!("owner/u-{round}-{c}-{i}").into_bytes(),
                    value: crate::scenarios::claims::DP_NODE.as_bytes().to_vec(),
                    lease,
                };
                i += 1;
                let t0 = Instant::now();
                let r: Result<pb::PutResponse> = call(&ch, "/etcdserverpb.KV/Put", req).await;
                let t1 = Instant::now();
                match r {
                    Ok(_) if t0 >= measure_from && t1 < end => {
                        n += 1;
                        lat.0.push((t1 - t0).as_nanos() as u64);
                    }
                    Ok(_) => {}
                    Err(_) => errors += 1,
                }
            }
            (lat, n, errors)
        }));
    }
    let (mut lat, mut n, mut errors) = (Lat::default(), 0, 0);
    for t in tasks {
        let (l, a, e) = t.await?;
        lat.merge(l);
        n += a;
        errors += e;
    }
    Ok((n as f64 / o.window.as_secs_f64(), lat, errors))
}

pub async fn run(o: &Opts) -> Result<Report> {
    let mut rep = Report::new("peers-claims");
    let bin = super::need_bin("etcd", "etcd-server")?;
    let clients = if o.tiny { 4 } else { 64 };
    rep.param("clients", clients);
    rep.param("nodes", 3);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    let dir = o.rundir()?;
    rep.param("disk_dir", dir.path().display().to_string());
    progress("peers claims: a 3-node control plane and 3 etcd members");
    let cp = o.start_controlplane(&dir)?;
    let cp_leader = cp.addr("grpc")?;
    let etcd = start_etcd(o, &bin, &dir.path()).await?;
    let (etcd_leader, etcd_version) = leader(&etcd.client_addrs).await?;
    rep.param("etcd", format!("etcd {etcd_version} (Debian etcd-server)"));
    let ch = channel(etcd_leader)?;
    let grant: pb::LeaseGrantResponse = call(
        &ch,
        "/etcdserverpb.Lease/LeaseGrant",
        pb::LeaseGrantRequest {
            ttl: 24 * 3600,
            id: 0,
        },
    )
    .await?;
    anyhow::ensure!(grant.error.is_empty(), "etcd lease grant: {}", grant.error);
    let (mut cp_errors, mut etcd_errors) = (0u64, 0u64);
    for r in 0..o.rounds {
        progress(format!("peers claims round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        for side in if r % 2 == 1 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let (rate, mut lat, e, per_call) = claim_load(o, cp_leader, clients, r).await?;
                cp_errors += e;
                round.insert("gs_claims_per_call".into(), per_call);
                round.insert("gs_claims_per_s".into(), rate);
                round.insert("gs_claim_p50_us".into(), lat.pct_us(50.0));
                round.insert("gs_claim_p99_us".into(), lat.pct_us(99.0));
            } else {
                let (rate, mut lat, e) = etcd_load(o, &ch, grant.id, clients, r).await?;
                etcd_errors += e;
                round.insert("etcd_puts_per_s".into(), rate);
                round.insert("etcd_put_p50_us".into(), lat.pct_us(50.0));
                round.insert("etcd_put_p99_us".into(), lat.pct_us(99.0));
                // The same puts without the lease: etcd without the lease's cost.
                let (rate, mut lat, e) = etcd_load(o, &ch, 0, clients, r).await?;
                etcd_errors += e;
                round.insert("etcd_plain_puts_per_s".into(), rate);
                round.insert("etcd_plain_put_p50_us".into(), lat.pct_us(50.0));
                round.insert("etcd_plain_put_p99_us".into(), lat.pct_us(99.0));
            }
        }
        rep.rounds.push(round);
    }
    rep.median_all();
    rep.field("gs_claim_errors", cp_errors as f64);
    rep.field("etcd_put_errors", etcd_errors as f64);
    let f = rep.fields.clone();
    let f = |k: &str| f[k];
    rep.checks.push(super::vs(
        &format!("[etcd] commits/s, {clients} clients"),
        f("gs_claims_per_s"),
        f("etcd_puts_per_s"),
        false,
    ));
    rep.checks.push(super::vs(
        "[etcd] p50 commit latency us",
        f("gs_claim_p50_us"),
        f("etcd_put_p50_us"),
        true,
    ));
    rep.checks.push(super::vs(
        "[etcd] p99 commit latency us",
        f("gs_claim_p99_us"),
        f("etcd_put_p99_us"),
        true,
    ));
    rep.checks.push(super::vs(
        &format!("[etcd plain put] commits/s, {clients} clients"),
        f("gs_claims_per_s"),
        f("etcd_plain_puts_per_s"),
        false,
    ));
    rep.checks.push(super::vs(
        "[etcd plain put] p50 commit latency us",
        f("gs_claim_p50_us"),
        f("etcd_plain_put_p50_us"),
        true,
    ));
    rep.checks.push(super::vs(
        "[etcd plain put] p99 commit latency us",
        f("gs_claim_p99_us"),
        f("etcd_plain_put_p99_us"),
        true,
    ));
    rep.checks.push(Check::absolute(
        "failed claims + failed puts",
        (cp_errors + etcd_errors) as f64,
        Cmp::AtMost,
        0.0,
        "",
    ));
    rep.notes.push(format!("GateSvr: Starts through the data plane's control-plane client, which batches a burst into one ClaimSessions call ({:.1} claims per call), on the raft leader (3 nodes in one process, fdatasync per raft append); etcd: one Put per call on the leader (3 members, WAL fsync per commit), with the node's lease ([etcd]) and without it ([etcd plain put]); all on the server CPU", f("gs_claims_per_call")));
    drop(etcd);
    drop(cp);
    Ok(rep)
}
