//! The routing table's keys and values: pod records.

use super::*;

fn record(zone: &str) -> PodEntry {
    PodEntry {
        schema_version: SCHEMA_VERSION,
        namespace: "shop".into(),
        pod: "web-1".into(),
        uid: "1234".into(),
        node: "node-a".into(),
        zone: zone.into(),
        pod_ip: "10.0.0.1".into(),
        service_account: "web".into(),
    }
}

#[test]
fn pod_records_round_trip_through_their_keys() {
    let mut table = RoutingTable::default();
    table
        .pods
        .insert(object_ref("shop", "web-1"), record("zone-a"));
    let kv = table.to_kv();
    let key = pod_key("shop", "web-1");
    assert_eq!(key, "/ferry/v1/pods/shop/web-1");
    let value = kv.get(&key).expect("the record's key");
    let json: serde_json::Value = serde_json::from_str(value).expect("JSON");
    assert_eq!(json["podIP"], "10.0.0.1");
    assert_eq!(json["serviceAccount"], "web");
    assert_eq!(json["schemaVersion"], 1);

    let mut read = RoutingTable::default();
    read.apply_kv(&key, Some(value.as_bytes()))
        .expect("applies");
    assert_eq!(read.pods, table.pods);
    read.apply_kv(&key, None).expect("a delete applies");
    assert!(read.pods.is_empty());
}

#[test]
fn a_pod_record_of_another_schema_version_is_refused() {
    let mut other = record("zone-a");
    other.schema_version = 2;
    let value = serde_json::to_vec(&other).expect("JSON");
    let mut table = RoutingTable::default();
    let error = table
        .apply_kv(&pod_key("shop", "web-1"), Some(&value))
        .expect_err("refused");
    assert!(matches!(error, TableError::SchemaVersion { found: 2, .. }));
}

#[test]
fn a_table_without_pod_records_reads_as_before() {
    let json = r#"{"revision":3,"topics":{},"groups":{},"subscriptions":{},"members":{}}"#;
    let table: RoutingTable = serde_json::from_str(json).expect("decodes");
    assert!(table.pods.is_empty());
    assert!(
        !serde_json::to_string(&table)
            .expect("JSON")
            .contains("pods")
    );
}
