//! A sidecar's credentials on disk: `tls.crt` (its chain, leaf first), `tls.key` and
//! `ca.crt` (the trust bundle) in one folder, the layout of a `kubernetes.io/tls` Secret
//! mounted as a volume, as cert-manager writes it.
//!
//! Files are replaced by rename, so that a reader sees a whole old file or a whole new one;
//! a reader that finds a pair that does not match (a rotation half done) keeps what it had
//! and tries again at the next poll.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::IdentityError;
use super::tls::{Credentials, PeerTls, TrustBundle, provider};

/// The certificate chain, leaf first.
pub const CERT_FILE: &str = "tls.crt";
/// The private key.
pub const KEY_FILE: &str = "tls.key";
/// The trust bundle.
pub const BUNDLE_FILE: &str = "ca.crt";

/// The three PEM texts of a sidecar's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pems {
    pub chain: String,
    pub key: String,
    pub bundle: String,
}

/// A credentials folder.
#[derive(Debug, Clone)]
pub struct CredentialDir {
    dir: PathBuf,
}

type Stamp = [Option<SystemTime>; 3];

impl CredentialDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_file(&self, name: &str) -> Result<String, IdentityError> {
        let path = self.file(name);
        fs::read_to_string(&path).map_err(|source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads the three files.
    pub fn read(&self) -> Result<Pems, IdentityError> {
        Ok(Pems {
            chain: self.read_file(CERT_FILE)?,
            key: self.read_file(KEY_FILE)?,
            bundle: self.read_file(BUNDLE_FILE)?,
        })
    }

    /// Writes the three files, each by rename; the key is readable by its owner only.
    pub fn write(&self, pems: &Pems) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        for (name, text) in [
            (BUNDLE_FILE, &pems.bundle),
            (KEY_FILE, &pems.key),
            (CERT_FILE, &pems.chain),
        ] {
            let path = self.file(name);
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io(&path))?;
            tmp.write_all(text.as_bytes()).map_err(io(&path))?;
            tmp.as_file().sync_all().map_err(io(&path))?;
            tmp.persist(&path).map_err(|e| IdentityError::Io {
                path: path.display().to_string(),
                source: e.error,
            })?;
        }
        Ok(())
    }

    fn stamp(&self) -> Stamp {
        [CERT_FILE, KEY_FILE, BUNDLE_FILE].map(|name| {
            fs::metadata(self.file(name))
                .and_then(|m| m.modified())
                .ok()
        })
    }

    /// Loads the folder into live TLS material, and a watcher that reloads it.
    pub fn load(&self) -> Result<(PeerTls, Reloader), IdentityError> {
        let stamp = self.stamp();
        let pems = self.read()?;
        let provider = provider();
        let tls = PeerTls {
            credentials: std::sync::Arc::new(Credentials::from_pem(
                &pems.chain,
                &pems.key,
                provider.clone(),
            )?),
            bundle: std::sync::Arc::new(TrustBundle::from_pem(&pems.bundle, provider)?),
        };
        Ok((
            tls,
            Reloader {
                dir: self.clone(),
                stamp,
                loaded: pems,
            },
        ))
    }
}

/// Reloads a credentials folder into live TLS material when its files change.
#[derive(Debug)]
pub struct Reloader {
    dir: CredentialDir,
    stamp: Stamp,
    loaded: Pems,
}

impl Reloader {
    /// Applies changed files to `tls`; returns whether anything changed. On an error
    /// nothing changes and the next call tries again.
    pub fn poll(&mut self, tls: &PeerTls) -> Result<bool, IdentityError> {
        let stamp = self.dir.stamp();
        if stamp == self.stamp {
            return Ok(false);
        }
        let pems = self.dir.read()?;
        if pems == self.loaded {
            self.stamp = stamp;
            return Ok(false);
        }
        // The bundle first: a new leaf may already be signed by the new CA.
        tls.bundle.replace(&pems.bundle)?;
        if pems.chain != self.loaded.chain || pems.key != self.loaded.key {
            tls.credentials.replace(&pems.chain, &pems.key)?;
        }
        self.stamp = stamp;
        self.loaded = pems;
        Ok(true)
    }
}
