//! The placement rules: which source wins, learning and re-learning from the table, and
//! what `/readyz` says.

use super::*;
use ferry_api::routing::{PodEntry, SCHEMA_VERSION};

fn config(zone: &str, etcd: bool) -> Config {
    let dir = std::env::temp_dir();
    let mut c = Config::local("web-1", "shop", zone, dir);
    if zone.is_empty() {
        c.node = String::new();
    }
    if etcd {
        c.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
    }
    c
}

fn table(revision: i64, zone: Option<&str>) -> RoutingTable {
    let mut t = RoutingTable {
        revision,
        ..RoutingTable::default()
    };
    if let Some(zone) = zone {
        t.pods.insert(
            object_ref("shop", "web-1"),
            PodEntry {
                schema_version: SCHEMA_VERSION,
                namespace: "shop".into(),
                pod: "web-1".into(),
                uid: "u".into(),
                node: format!("node-{zone}"),
                zone: zone.into(),
                pod_ip: String::new(),
                service_account: "default".into(),
            },
        );
    }
    t
}

fn gauge_lines(gauge: &Family<ZoneLabels, Gauge>) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("ferry_sidecar");
    registry.register("zone", "zone", gauge.clone());
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out.lines()
        .filter(|l| l.starts_with("ferry_sidecar_zone{"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_cluster_sidecar_ignores_the_zone_setting() {
    assert_eq!(Origin::of(&config("zone-a", false)), Origin::Setting);
    assert_eq!(Origin::of(&config("", false)), Origin::PodRecord);
    assert_eq!(Origin::of(&config("zone-a", true)), Origin::PodRecord);
    let p = Placements::new(&config("zone-a", true), Family::default());
    assert_eq!(&*p.zone(), "", "not the environment's zone-a");
}

#[test]
fn a_setting_is_fixed_whatever_the_table_says() {
    let gauge = Family::default();
    let p = Placements::new(&config("zone-a", false), gauge.clone());
    assert!(!p.follow(&table(5, Some("zone-b"))));
    assert_eq!(&*p.zone(), "zone-a");
    assert_eq!(
        gauge_lines(&gauge),
        r#"ferry_sidecar_zone{zone="zone-a",node="node-zone-a"} 1"#
    );
    assert!(p.readiness().0);
}

#[test]
fn the_record_is_learned_followed_and_kept_when_it_goes() {
    let gauge = Family::default();
    let p = Placements::new(&config("", true), gauge.clone());
    assert!(!p.follow(&table(0, None)), "nothing before the first table");
    assert!(!p.follow(&table(3, None)), "no record yet");
    assert_eq!(&*p.zone(), "");
    assert!(p.follow(&table(4, Some("zone-a"))));
    assert_eq!(
        p.current(),
        Placement {
            zone: "zone-a".into(),
            node: "node-zone-a".into()
        }
    );
    assert!(!p.follow(&table(5, Some("zone-a"))), "unchanged");
    assert!(p.follow(&table(6, Some("zone-b"))), "re-learned");
    assert_eq!(
        gauge_lines(&gauge),
        r#"ferry_sidecar_zone{zone="zone-b",node="node-zone-b"} 1"#,
        "one series, the current one"
    );
    assert!(
        !p.follow(&table(7, None)),
        "a removed record changes nothing"
    );
    assert_eq!(&*p.zone(), "zone-b");
    assert!(p.readiness().0);
}

#[test]
fn only_a_cluster_sidecar_waits_for_its_record() {
    assert!(
        !Placements::new(&config("", true), Family::default())
            .readiness()
            .0
    );
    let local = Placements::new(&config("", false), Family::default());
    assert!(local.readiness().0, "{}", local.readiness().1);
}

#[test]
fn readyz_waits_for_the_record_but_not_for_ever() {
    let wait = Duration::from_secs(10);
    let key = "/ferry/v1/pods/shop/web-1";
    let at = |origin, learned, secs| {
        readiness(
            origin,
            learned,
            Duration::from_secs(secs),
            wait,
            "zone: none",
            key,
        )
    };
    assert!(at(Origin::Setting, false, 0).0);
    assert!(at(Origin::PodRecord, true, 0).0);
    let (ready, why) = at(Origin::PodRecord, false, 2);
    assert!(
        !ready && why.contains("waiting") && why.contains(key),
        "{why}"
    );
    let (ready, why) = at(Origin::PodRecord, false, 11);
    assert!(ready && why.contains("no zone preference"), "{why}");
}
