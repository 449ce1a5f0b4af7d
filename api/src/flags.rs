//! The convention every Ferry binary's flags follow, checked by each binary's tests: every
//! flag has a help text (it is what `--help` documents) and an environment variable named
//! after it with the `FERRY_` prefix (`--etcd-endpoints` is `FERRY_ETCD_ENDPOINTS`), so that a
//! Helm chart or a Deployment can set any of them.

use crate::consts::ENV_PREFIX;

/// The environment variable a flag named `long` should have.
pub fn env_name(long: &str) -> String {
    format!("{ENV_PREFIX}{}", long.replace('-', "_").to_uppercase())
}

/// What `cmd`'s flags miss of the convention, one line per problem (empty when none).
pub fn convention_breaches(cmd: &clap::Command) -> Vec<String> {
    let mut problems = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let name = arg.get_long().unwrap_or(id);
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            problems.push(format!("--{name} has no help text"));
        }
        let want = env_name(name);
        match arg.get_env() {
            Some(env) if env.to_str() == Some(want.as_str()) => {}
            Some(env) => problems.push(format!(
                "--{name} reads {}, expected {want}",
                env.to_string_lossy()
            )),
            None => problems.push(format!("--{name} has no environment variable ({want})")),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Good {
        /// Where etcd is.
        #[arg(long, env = "FERRY_ETCD_ENDPOINTS")]
        etcd_endpoints: Option<String>,
    }

    #[derive(clap::Parser)]
    struct Bad {
        #[arg(long, env = "FERRY_ETCD")]
        etcd_endpoints: Option<String>,
        /// Documented but without an environment variable.
        #[arg(long)]
        data_dir: Option<String>,
    }

    #[test]
    fn breaches_are_named_per_flag() {
        use clap::CommandFactory;
        assert!(convention_breaches(&Good::command()).is_empty());
        let bad = convention_breaches(&Bad::command());
        assert_eq!(
            bad,
            [
                "--etcd-endpoints has no help text",
                "--etcd-endpoints reads FERRY_ETCD, expected FERRY_ETCD_ENDPOINTS",
                "--data-dir has no environment variable (FERRY_DATA_DIR)",
            ]
        );
    }
}
