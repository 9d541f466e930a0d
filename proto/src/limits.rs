//! Message-size limits of every GateSvr gRPC service, and the chunking of
//! anything that grows with sessions or queues.
//!
//! tonic decodes at most 4 MiB per message unless told otherwise, and the
//! receiver finds out only after the sender did its work. So every client
//! and server GateSvr builds sets [`MAX_MESSAGE_BYTES`] (raft:
//! [`RAFT_MAX_MESSAGE_BYTES`]) deliberately, and nothing whose size grows with
//! the number of sessions or the length of a queue travels as one message:
//! watch snapshots, handover state and replica fetches are streamed in
//! chunks of about [`CHUNK_BYTES`] ([`chunk_by_size`]). A chunk holds at
//! least one item, so one item (a push, at most the data plane's
//! `session.max_frame_size`) must stay below [`MAX_MESSAGE_BYTES`].

/// Largest message a GateSvr gRPC client or server (control plane, data-plane
/// `Peer` and `GatewayService`, watch, upstream channels) encodes or decodes.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest raft message (AppendEntries batches, a restore entry, 3 MiB
/// snapshot chunks plus overhead) between control-plane nodes.
pub const RAFT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Target encoded size of one chunk of a streamed snapshot, session state or
/// replica.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Splits `items` into runs whose encoded size stays near `budget` bytes (a
/// run holds at least one item, so an item larger than `budget` travels
/// alone). Order is kept. Always returns at least one (possibly empty) run,
/// so a stream built from it is never empty.
pub fn chunk_by_size<T: prost::Message>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut out = vec![Vec::new()];
    let mut size = 0;
    for item in items {
        // The field tag and length prefix of a repeated message: at most 1 + 10 bytes.
        let n = item.encoded_len() + 11;
        let full = size + n > budget;
        if full && out.last().is_some_and(|run| !run.is_empty()) {
            out.push(Vec::new());
            size = 0;
        }
        size += n;
        if let Some(run) = out.last_mut() {
            run.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ServerPush;
    use prost::Message;

    fn push(bytes: usize) -> ServerPush {
        ServerPush {
            data: vec![7; bytes].into(),
            ..Default::default()
        }
    }

    #[test]
    fn runs_stay_within_the_budget_and_keep_order() {
        let items: Vec<ServerPush> = (0..100)
            .map(|i| ServerPush {
                seq_id: i,
                ..push(4096)
            })
            .collect();
        let runs = chunk_by_size(items, 64 << 10);
        assert!(runs.len() > 1);
        for run in &runs {
            let bytes: usize = run.iter().map(|p| p.encoded_len() + 11).sum();
            assert!(bytes <= 64 << 10, "{bytes}");
        }
        let seqs: Vec<u64> = runs.into_iter().flatten().map(|p| p.seq_id).collect();
        assert_eq!(seqs, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn an_oversized_item_travels_alone_and_empty_input_gives_one_run() {
        let runs = chunk_by_size(vec![push(10), push(5000), push(10)], 1000);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
        let empty: Vec<Vec<ServerPush>> = chunk_by_size(Vec::new(), 1000);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].is_empty());
    }
}
