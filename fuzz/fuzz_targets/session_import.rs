//! Fuzzes session-state import from peers: the `SessionState` a `Peer.Stage`
//! or `Peer.Handover` answer carries, decoded and imported as the data plane
//! does (`Session::import`).
//!
//! The bytes are whatever reached the Peer service, so nothing may panic or
//! overflow (overflow checks are on in the fuzzed build). Invariants checked:
//! - decoding and import never panic; import refuses what it cannot use;
//! - an imported session exports a state that imports again to the same
//!   export (round trip);
//! - an imported session keeps working: a push gets the next seq (no
//!   overflow), and the export counts it.
#![no_main]

use gatesvr_dataplane::session::{PushMessage, Session, SessionConfig};
use gatesvr_proto::session::SessionState;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = SessionState::decode(data) else {
        return;
    };
    let now = std::time::Instant::now();
    let cfg = SessionConfig::default();
    let Ok(mut session) = Session::import(state, now, cfg.clone()) else {
        return;
    };
    let exported = session.export();
    let again = Session::import(exported.clone(), now, cfg)
        .expect("an imported session's export imports again");
    assert_eq!(again.export(), exported, "import/export round trip");

    let next = exported.next_seq_id;
    if let Ok(seq) = session.push(
        now,
        PushMessage {
            msg_type: "t".into(),
            content: "c".into(),
            data: bytes::Bytes::new(),
            created_at_ms: 0,
        },
    ) {
        assert_eq!(seq, next, "a push after import gets next_seq_id");
        assert_eq!(session.export().next_seq_id, next + 1);
    }
});
