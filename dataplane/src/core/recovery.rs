//! What a node answers to `Peer.FetchReplica`: its replica of the session
//! (if it is a standby of the owner) together with a copy of the session
//! held here but not served ([`Table::copy_for_recovery`](super::Table::copy_for_recovery)).

use gatesvr_proto::peer::FetchReplicaResponse;
use gatesvr_proto::session::SessionState;

/// `replica` (found or not) joined with `copy`: the union of their pushes
/// above the higher ack point, the higher ack point and next seq.
pub fn with_copy(
    replica: FetchReplicaResponse,
    copy: Option<&SessionState>,
) -> FetchReplicaResponse {
    let Some(copy) = copy else {
        return replica;
    };
    let mut out = if replica.found {
        replica
    } else {
        FetchReplicaResponse {
            found: true,
            session_id: copy.session_id.clone(),
            zone: copy.zone.clone(),
            ..Default::default()
        }
    };
    out.epoch = out.epoch.max(copy.epoch);
    out.acked_seq_id = out.acked_seq_id.max(copy.acked_seq_id);
    out.next_seq_id = out.next_seq_id.max(copy.next_seq_id);
    let mut pushes: std::collections::BTreeMap<u64, _> =
        out.pushes.drain(..).map(|p| (p.seq_id, p)).collect();
    for p in &copy.pushes {
        pushes.entry(p.seq_id).or_insert_with(|| p.clone());
    }
    let acked = out.acked_seq_id;
    out.pushes = pushes.into_values().filter(|p| p.seq_id > acked).collect();
    out
}
