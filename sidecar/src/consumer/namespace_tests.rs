//! The consuming sidecar's side of `allowedSubscriberNamespaces`: a table that routes a
//! topic to a subscription of a namespace the topic does not allow (which the operator
//! never writes) gets no session and no delivery through this sidecar.

use std::sync::Arc;

use ferry_api::routing::RoutingTable;
use tokio::sync::watch;

use super::Consumer;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::routing::tests::{group, member, subscription, topic};

/// A table where `billing/invoices` subscribes to `shop/orders`; `allowed` lists the
/// namespaces the topic allows.
fn table(allowed: &[&str]) -> RoutingTable {
    let mut t = RoutingTable::default();
    let mut orders = topic("shop", "orders");
    orders.allowed_subscriber_namespaces = allowed.iter().map(|n| n.to_string()).collect();
    t.topics.insert("shop/orders".into(), orders);
    t.groups.insert("billing/g".into(), group("billing", "g"));
    let mut s = subscription("billing", "invoices", "orders", "g");
    s.topic = "shop/orders".into();
    t.subscriptions.insert("billing/invoices".into(), s);
    t.members.insert(
        "billing/g".into(),
        [(
            "p".to_string(),
            member("billing", "g", "p", "z", "10.0.0.1:7710"),
        )]
        .into(),
    );
    t
}

fn consumer(table: RoutingTable) -> Arc<Consumer> {
    let (_tx, rx) = watch::channel(Arc::new(table));
    Consumer::new("p".into(), rx, Arc::new(Metrics::new()), None, 1 << 10)
}

#[test]
fn a_namespace_the_topic_does_not_allow_gets_no_session() {
    let denied = consumer(table(&[]));
    match denied.open_session("billing/invoices", 10, true) {
        Err(Error::PermissionDenied(message)) => {
            assert!(message.contains("allowedSubscriberNamespaces"), "{message}");
        }
        other => panic!("expected PermissionDenied, got {:?}", other.map(|_| ())),
    }
    let allowed = consumer(table(&["billing"]));
    assert!(allowed.open_session("billing/invoices", 10, true).is_ok());
}
