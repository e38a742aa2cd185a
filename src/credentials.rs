//! Local credentials: the token secret and API key that `wsgw serve` generates when none are configured and
//! it listens on a loopback address, so the CLI on the same machine works without flags.
//!
//! The file is `credentials.json` in `$WSGW_STATE_DIR`, else `$XDG_STATE_HOME/wsgw`, else
//! `$HOME/.local/state/wsgw`, created with mode 0600. It is for local use only: production nodes configure
//! `auth.token_secret` and `auth.api_keys`.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Credentials written by a local `wsgw serve`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalCredentials {
    pub token_secret: String,
    pub api_key: String,
    /// HTTP base URL of the `wsgw serve` that last wrote the file.
    pub server: String,
}

/// The folder of the credentials file, or None when no home folder is known.
pub fn state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WSGW_STATE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Some(PathBuf::from(dir).join("wsgw"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state/wsgw"))
}

/// Path of the credentials file.
pub fn credentials_path() -> Option<PathBuf> {
    state_dir().map(|dir| dir.join("credentials.json"))
}

/// Reads the credentials file; None when it does not exist or cannot be parsed.
pub fn load() -> Option<LocalCredentials> {
    let path = credentials_path()?;
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Loads the credentials, generating new secrets if there are none, and records `server` in the file.
pub fn load_or_create(server: &str) -> std::io::Result<(LocalCredentials, PathBuf)> {
    let path = credentials_path().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no folder for local credentials: set WSGW_STATE_DIR or HOME",
        )
    })?;
    let mut credentials = load().unwrap_or_else(|| LocalCredentials {
        token_secret: random_secret(),
        api_key: random_secret(),
        server: String::new(),
    });
    credentials.server = server.to_owned();
    write(&path, &credentials)?;
    Ok((credentials, path))
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

fn write(path: &Path, credentials: &LocalCredentials) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(credentials).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary)?;
    file.write_all(json.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Forgets `server` as the local gateway when the credentials still name it, so that after this `wsgw serve`
/// stops the CLI falls back to its default URL instead of a gateway that is gone.
pub fn release_server(server: &str) {
    let (Some(path), Some(mut credentials)) = (credentials_path(), load()) else {
        return;
    };
    if credentials.server == server {
        credentials.server = String::new();
        let _ = write(&path, &credentials);
    }
}
