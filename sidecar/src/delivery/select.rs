//! Choosing members: zone policy first (which members may receive at all), then balancing
//! (which of them gets this message). Pure functions over a slice of members, so the rules
//! are unit-tested without a network.

use ferry_api::crd::{Balancing, ZonePolicy};

/// A member as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pod: String,
    /// `ip:port` of its sidecar's peer endpoint.
    pub address: String,
    pub zone: String,
    /// This sidecar itself (delivered in process).
    pub local: bool,
    /// Whether its sidecar can be reached now (no recent connection failure).
    pub live: bool,
    /// Deliveries sent to it and not yet settled.
    pub in_flight: u32,
}

/// Indices of the members a unicast message may go to under `policy`: live members of the
/// producer's zone; for `PreferSameZone`, every live member when the zone has none
/// (spillover, as Kubernetes topology-aware routing falls back); for `SameZoneOnly`, never
/// another zone; for `Any`, every live member.
pub fn eligible(members: &[Member], policy: ZonePolicy, zone: &str) -> Vec<usize> {
    let live = || members.iter().enumerate().filter(|(_, m)| m.live);
    let same: Vec<usize> = live()
        .filter(|(_, m)| m.zone == zone)
        .map(|(i, _)| i)
        .collect();
    match policy {
        ZonePolicy::SameZoneOnly => same,
        ZonePolicy::PreferSameZone if !same.is_empty() => same,
        ZonePolicy::PreferSameZone | ZonePolicy::Any => live().map(|(i, _)| i).collect(),
    }
}

/// Members a broadcast message goes to (live or not: a member that is down gets its copy
/// when it is back, or when it leaves the table the copy is dropped). `SameZoneOnly` keeps
/// it in the zone; the other policies reach every member.
pub fn broadcast_targets(members: &[Member], policy: ZonePolicy, zone: &str) -> Vec<usize> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| policy != ZonePolicy::SameZoneOnly || m.zone == zone)
        .map(|(i, _)| i)
        .collect()
}

/// 64-bit FNV-1a with a finalizer: stable across processes and versions, unlike `DefaultHasher`, so every
/// producer maps a key to the same member.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone spreads similar inputs poorly in the high bits that the comparison looks
    // at; a 64-bit finalizer (MurmurHash3 fmix64) fixes that.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The member for `key` among `candidates` by rendezvous hashing: adding or removing a
/// member moves only the keys that hash to it.
pub fn by_key(members: &[Member], candidates: &[usize], key: &str) -> Option<usize> {
    candidates
        .iter()
        .copied()
        .max_by_key(|&i| fnv1a(&[key.as_bytes(), members[i].pod.as_bytes()]))
}

/// Picks one member among `candidates` with room under `max_in_flight`.
pub fn pick(
    members: &[Member],
    candidates: &[usize],
    balancing: Balancing,
    max_in_flight: u32,
    rr: &mut usize,
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = *rr % n;
    let with_room = (0..n)
        .map(|k| (k, candidates[(start + k) % n]))
        .filter(|(_, i)| members[*i].in_flight < max_in_flight);
    let chosen = match balancing {
        Balancing::RoundRobin => with_room.into_iter().next(),
        Balancing::LeastInFlight => with_room.min_by_key(|(_, i)| members[*i].in_flight),
    };
    let (k, i) = chosen?;
    *rr = start + k + 1;
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pod: &str, zone: &str, live: bool, in_flight: u32) -> Member {
        Member {
            pod: pod.into(),
            address: format!("{pod}:7710"),
            zone: zone.into(),
            local: false,
            live,
            in_flight,
        }
    }

    #[test]
    fn prefer_same_zone_spills_over_only_when_zone_has_no_live_member() {
        let ms = vec![
            m("a1", "a", true, 0),
            m("b1", "b", true, 0),
            m("a2", "a", false, 0),
        ];
        assert_eq!(eligible(&ms, ZonePolicy::PreferSameZone, "a"), vec![0]);
        let down = vec![m("a1", "a", false, 0), m("b1", "b", true, 0)];
        assert_eq!(eligible(&down, ZonePolicy::PreferSameZone, "a"), vec![1]);
        assert_eq!(
            eligible(&down, ZonePolicy::SameZoneOnly, "a"),
            Vec::<usize>::new()
        );
        assert_eq!(eligible(&ms, ZonePolicy::Any, "a"), vec![0, 1]);
    }

    #[test]
    fn round_robin_rotates_and_skips_full_members() {
        let ms = vec![
            m("a", "z", true, 0),
            m("b", "z", true, 5),
            m("c", "z", true, 0),
        ];
        let c = vec![0, 1, 2];
        let mut rr = 0;
        assert_eq!(pick(&ms, &c, Balancing::RoundRobin, 5, &mut rr), Some(0));
        assert_eq!(pick(&ms, &c, Balancing::RoundRobin, 5, &mut rr), Some(2));
        assert_eq!(pick(&ms, &c, Balancing::RoundRobin, 5, &mut rr), Some(0));
        let full = vec![m("a", "z", true, 5)];
        assert_eq!(pick(&full, &[0], Balancing::RoundRobin, 5, &mut rr), None);
    }

    #[test]
    fn least_in_flight_prefers_the_idlest() {
        let ms = vec![
            m("a", "z", true, 3),
            m("b", "z", true, 1),
            m("c", "z", true, 2),
        ];
        let mut rr = 0;
        assert_eq!(
            pick(&ms, &[0, 1, 2], Balancing::LeastInFlight, 10, &mut rr),
            Some(1)
        );
    }

    #[test]
    fn key_hashing_is_stable_and_moves_few_keys() {
        let ms: Vec<Member> = (0..5).map(|i| m(&format!("p{i}"), "z", true, 0)).collect();
        let all: Vec<usize> = (0..5).collect();
        let fewer: Vec<usize> = (0..4).collect();
        let mut moved = 0;
        for k in 0..1000 {
            let key = format!("key-{k}");
            let a = by_key(&ms, &all, &key).unwrap();
            assert_eq!(by_key(&ms, &all, &key), Some(a));
            let b = by_key(&ms, &fewer, &key).unwrap();
            if a != b {
                moved += 1;
                assert_eq!(a, 4, "only keys of the removed member move");
            }
        }
        assert!(moved > 100 && moved < 300, "moved {moved}");
    }

    #[test]
    fn broadcast_same_zone_only() {
        let ms = vec![m("a1", "a", true, 0), m("b1", "b", false, 0)];
        assert_eq!(
            broadcast_targets(&ms, ZonePolicy::SameZoneOnly, "a"),
            vec![0]
        );
        assert_eq!(
            broadcast_targets(&ms, ZonePolicy::PreferSameZone, "a"),
            vec![0, 1]
        );
    }
}
