//! Label-selector matching, as the API server applies a `LabelSelector` to a pod's labels.
//!
//! In a cluster the operator asks the API server for the pods a selector matches; in local
//! mode there is no API server, so the same rules are applied here to the local pods file.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// Why a selector cannot be applied. The API server rejects these at admission time; local
/// mode reports them instead, because its YAML never went through an API server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}]: operator {operator:?} is not one of In, NotIn, Exists, DoesNotExist"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    MissingValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
    #[error("selector is empty: it would match every pod")]
    Empty,
}

/// Checks a selector once, so that [`matches`] never has to fail.
pub fn validate(selector: &LabelSelector) -> Result<(), SelectorError> {
    let labels = selector.match_labels.as_ref().map_or(0, BTreeMap::len);
    let expressions = selector.match_expressions.as_deref().unwrap_or_default();
    if labels == 0 && expressions.is_empty() {
        return Err(SelectorError::Empty);
    }
    for (index, req) in expressions.iter().enumerate() {
        let has_values = req.values.as_ref().is_some_and(|v| !v.is_empty());
        let operator = req.operator.clone();
        match req.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(SelectorError::MissingValues { index, operator });
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(SelectorError::UnexpectedValues { index, operator });
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => return Err(SelectorError::UnknownOperator { index, operator }),
        }
    }
    Ok(())
}

/// Whether `labels` satisfy every `matchLabels` pair and every `matchExpressions`
/// requirement (they are ANDed, as in Kubernetes). An invalid requirement matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|req| requirement_matches(req, labels))
}

fn requirement_matches(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let value = labels.get(&req.key);
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        // As in Kubernetes, NotIn also matches pods that lack the key.
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Labels that satisfy a selector, for a pod made up by local mode: every `matchLabels`
/// pair, the first value of each `In`, a value for each `Exists`, and for `NotIn` a value
/// that is not listed. `DoesNotExist` needs nothing. Callers check the result with
/// [`matches`], since contradictory selectors have no such labels.
pub fn satisfying_labels(selector: &LabelSelector) -> BTreeMap<String, String> {
    let mut labels = selector.match_labels.clone().unwrap_or_default();
    for req in selector.match_expressions.iter().flatten() {
        if labels.contains_key(&req.key) {
            continue;
        }
        let values = req.values.as_deref().unwrap_or_default();
        let value = match req.operator.as_str() {
            "In" => values.first().cloned(),
            "Exists" => Some("true".to_owned()),
            "NotIn" => Some(not_listed(values)),
            _ => None,
        };
        if let Some(value) = value {
            labels.insert(req.key.clone(), value);
        }
    }
    labels
}

/// A label value that is not in `values`.
fn not_listed(values: &[String]) -> String {
    (0..)
        .map(|n| {
            if n == 0 {
                "local".to_owned()
            } else {
                format!("local-{n}")
            }
        })
        .find(|candidate| !values.contains(candidate))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn req(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = selector(&[("app", "billing"), ("tier", "be")], vec![]);
        assert!(matches(
            &s,
            &labels(&[("app", "billing"), ("tier", "be"), ("x", "y")])
        ));
        assert!(!matches(&s, &labels(&[("app", "billing")])));
        assert!(!matches(&s, &labels(&[("app", "billing"), ("tier", "fe")])));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let pod = labels(&[("app", "a"), ("env", "prod")]);
        assert!(matches(
            &selector(&[], vec![req("app", "In", &["a", "b"])]),
            &pod
        ));
        assert!(!matches(
            &selector(&[], vec![req("app", "In", &["b"])]),
            &pod
        ));
        assert!(matches(
            &selector(&[], vec![req("app", "NotIn", &["b"])]),
            &pod
        ));
        assert!(!matches(
            &selector(&[], vec![req("app", "NotIn", &["a"])]),
            &pod
        ));
        assert!(matches(
            &selector(&[], vec![req("missing", "NotIn", &["a"])]),
            &pod
        ));
        assert!(matches(
            &selector(&[], vec![req("env", "Exists", &[])]),
            &pod
        ));
        assert!(!matches(
            &selector(&[], vec![req("missing", "Exists", &[])]),
            &pod
        ));
        assert!(matches(
            &selector(&[], vec![req("missing", "DoesNotExist", &[])]),
            &pod
        ));
        assert!(!matches(
            &selector(&[], vec![req("env", "DoesNotExist", &[])]),
            &pod
        ));
        assert!(!matches(
            &selector(&[], vec![req("env", "Bogus", &["prod"])]),
            &pod
        ));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = selector(&[("app", "a")], vec![req("env", "In", &["prod"])]);
        assert!(matches(&s, &labels(&[("app", "a"), ("env", "prod")])));
        assert!(!matches(&s, &labels(&[("app", "a"), ("env", "dev")])));
    }

    #[test]
    fn validate_rejects_what_the_api_server_would() {
        assert_eq!(
            validate(&LabelSelector::default()),
            Err(SelectorError::Empty)
        );
        assert!(matches!(
            validate(&selector(&[], vec![req("a", "In", &[])])),
            Err(SelectorError::MissingValues { index: 0, .. })
        ));
        assert!(matches!(
            validate(&selector(&[], vec![req("a", "Exists", &["x"])])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            validate(&selector(&[], vec![req("a", "Gt", &["1"])])),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert_eq!(validate(&selector(&[("a", "b")], vec![])), Ok(()));
    }

    #[test]
    fn satisfying_labels_satisfy() {
        let s = selector(
            &[("app", "a")],
            vec![
                req("env", "In", &["prod", "stage"]),
                req("tier", "NotIn", &["local", "x"]),
                req("canary", "Exists", &[]),
                req("legacy", "DoesNotExist", &[]),
            ],
        );
        let made = satisfying_labels(&s);
        assert!(matches(&s, &made), "{made:?}");
        assert_eq!(made.get("tier").map(String::as_str), Some("local-1"));
    }
}
