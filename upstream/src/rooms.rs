//! Chat rooms: who joined which room, in memory.
//!
//! Membership is per upstream instance. Requests are routed by the caller's
//! zone, so a room here only holds members of this instance's zone (and, with
//! several instances per zone, only those whose `join` this instance served).
//! A real service keeps rooms in a shared store; the push path is the same.

use std::collections::{BTreeMap, BTreeSet};

/// Room name -> member openids.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: BTreeMap<String, BTreeSet<String>>,
}

impl Rooms {
    /// Adds `openid` to `room`; returns the member count.
    pub fn join(&mut self, room: &str, openid: &str) -> usize {
        let members = self.rooms.entry(room.to_owned()).or_default();
        members.insert(openid.to_owned());
        members.len()
    }

    /// Removes `openid` from `room`; returns the member count left. Empty rooms
    /// are dropped.
    pub fn leave(&mut self, room: &str, openid: &str) -> usize {
        let Some(members) = self.rooms.get_mut(room) else {
            return 0;
        };
        members.remove(openid);
        let left = members.len();
        if left == 0 {
            self.rooms.remove(room);
        }
        left
    }

    /// The members of `room` if `openid` is one of them.
    pub fn members_if_member(&self, room: &str, openid: &str) -> Option<Vec<String>> {
        let members = self.rooms.get(room)?;
        members
            .contains(openid)
            .then(|| members.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_and_membership() {
        let mut rooms = Rooms::default();
        assert_eq!(rooms.join("lobby", "alice"), 1);
        assert_eq!(rooms.join("lobby", "bob"), 2);
        assert_eq!(rooms.join("lobby", "bob"), 2, "joining twice is harmless");
        assert_eq!(
            rooms.members_if_member("lobby", "bob").unwrap(),
            ["alice", "bob"]
        );
        assert_eq!(rooms.members_if_member("lobby", "carol"), None);
        assert_eq!(rooms.leave("lobby", "alice"), 1);
        assert_eq!(rooms.leave("lobby", "bob"), 0);
        assert_eq!(rooms.members_if_member("lobby", "bob"), None);
    }
}
