//! Which identity a producer's copies on this sidecar belong to.
//!
//! A peer certificate proves a namespace and a service account, not a pod, and a request
//! names its producer (`namespace/pod`) itself. When the routing table lists that pod, its
//! member record says which service account it runs as (`peer/authz.rs` checks that); a
//! producer in no group has no record, so the first identity that places copies for a
//! producer name here is written down (`<replicas>/<namespace>/<pod>/identity`, beside its
//! `address`) and from then on only that identity may add copies, trim them or read them
//! back for that name. Without that, any identity of the namespace allowed to hold the
//! topic could trim another producer's copies and silently remove its `Replicated`
//! durability.
//!
//! Limit: the first placement wins. An identity of the namespace that places copies under
//! the name of a producer in no group before that producer does keeps it from replicating
//! here (its publishes then go to its other candidates or fail `UNAVAILABLE`); it gains no
//! access to the producer's messages.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::Error;

/// The identity file of each producer folder.
const FILE: &str = "identity";

/// Identities of producers, by producer id.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
    known: Mutex<HashMap<String, Option<String>>>,
}

/// What [`Pins::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The producer's copies belong to this identity (now or already).
    Granted,
    /// They belong to another identity, named.
    Taken(String),
}

impl Pins {
    /// Pins under `root` (the replica logs' root).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, producer: &str) -> Result<PathBuf, Error> {
        let (ns, pod) = producer
            .split_once('/')
            .filter(|(a, b)| {
                [a, b]
                    .iter()
                    .all(|p| !p.is_empty() && *p != &"." && *p != &".." && !p.contains('/'))
            })
            .ok_or_else(|| Error::InvalidArgument(format!("{producer:?} is not namespace/name")))?;
        Ok(self.root.join(ns).join(pod).join(FILE))
    }

    fn read(&self, producer: &str) -> Result<Option<String>, Error> {
        let file = self.file(producer)?;
        match std::fs::read_to_string(&file) {
            Ok(s) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                what: format!("reading {}", file.display()),
                source,
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Option<String>>>, Error> {
        self.known
            .lock()
            .map_err(|_| Error::Internal("replica identities poisoned by an earlier panic".into()))
    }

    /// The identity `producer`'s copies belong to, if one placed copies here.
    pub fn get(&self, producer: &str) -> Result<Option<String>, Error> {
        let mut known = self.lock()?;
        if let Some(p) = known.get(producer) {
            return Ok(p.clone());
        }
        let p = self.read(producer)?;
        known.insert(producer.to_owned(), p.clone());
        Ok(p)
    }

    /// Gives `producer`'s copies to `identity` unless another identity has them; durable
    /// before it answers `Granted` for a new claim.
    pub fn claim(&self, producer: &str, identity: &str) -> Result<Claim, Error> {
        let mut known = self.lock()?;
        let current = match known.get(producer) {
            Some(p) => p.clone(),
            None => self.read(producer)?,
        };
        match current {
            Some(p) if p == identity => Ok(Claim::Granted),
            Some(p) => {
                known.insert(producer.to_owned(), Some(p.clone()));
                Ok(Claim::Taken(p))
            }
            None => {
                let file = self.file(producer)?;
                write_durably(&file, identity)?;
                known.insert(producer.to_owned(), Some(identity.to_owned()));
                Ok(Claim::Granted)
            }
        }
    }
}

fn write_durably(file: &std::path::Path, text: &str) -> Result<(), Error> {
    let io = |what: &str, source| Error::Io {
        what: format!("{what} {}", file.display()),
        source,
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| io("writing", e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, file).map_err(|e| io("renaming into", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_identity_keeps_a_producer_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path().to_owned());
        assert_eq!(pins.get("ns/p").unwrap(), None);
        assert_eq!(pins.claim("ns/p", "spiffe://a").unwrap(), Claim::Granted);
        assert_eq!(pins.claim("ns/p", "spiffe://a").unwrap(), Claim::Granted);
        assert_eq!(
            pins.claim("ns/p", "spiffe://b").unwrap(),
            Claim::Taken("spiffe://a".into())
        );
        assert_eq!(pins.claim("ns/q", "spiffe://b").unwrap(), Claim::Granted);
        let again = Pins::new(dir.path().to_owned());
        assert_eq!(again.get("ns/p").unwrap().as_deref(), Some("spiffe://a"));
        assert!(again.claim("../p", "x").is_err());
    }
}
