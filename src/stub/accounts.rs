//! The identity stand-in's accounts as a rig gives them: `--account ID:SECRET[:PERMISSIONS]`
//! on the command line, or an accounts file.

use super::identity::StubAccount;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads `CLIENT_ID:CLIENT_SECRET[:SERVICE=PERMISSION,...]`; a service may repeat for more
/// permissions (`media-service=ADMIN,media-service=READ`). Without permissions the account
/// has `ADMIN` on the media service.
pub fn parse_account(text: &str) -> Result<StubAccount, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(id), Some(secret)) = (parts.next(), parts.next()) else {
        return Err("write the account as CLIENT_ID:CLIENT_SECRET[:SERVICE=PERMISSION,...]".into());
    };
    if id.is_empty() || secret.is_empty() {
        return Err("the client id and the secret must not be empty".into());
    }
    let mut account = StubAccount::new(id, secret);
    if let Some(list) = parts.next() {
        account.permissions = parse_permissions(list)?;
    }
    Ok(account)
}

/// Reads `SERVICE=PERMISSION[,SERVICE=PERMISSION...]`.
pub fn parse_permissions(list: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut permissions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in list.split(',').filter(|p| !p.is_empty()) {
        let (service, permission) = pair
            .split_once('=')
            .filter(|(s, p)| !s.is_empty() && !p.is_empty())
            .ok_or_else(|| format!("{pair:?}: write a permission as SERVICE=PERMISSION"))?;
        permissions
            .entry(service.to_owned())
            .or_default()
            .push(permission.to_owned());
    }
    Ok(permissions)
}

/// One entry of an accounts file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccount {
    client_id: String,
    /// The secret, or (to keep it out of the file) its SHA-256 in hex.
    client_secret: Option<String>,
    client_secret_sha256: Option<String>,
    name: Option<String>,
    #[serde(default)]
    permissions: BTreeMap<String, Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    accounts: Vec<FileAccount>,
}

/// Reads an accounts file:
///
/// ```toml
/// [[accounts]]
/// client_id = "importer"
/// client_secret_sha256 = "9f86d081884c7d65..."   # or client_secret = "..."
/// name = "Importer"
/// permissions = { media-service = ["ADMIN"], video-service = ["VIDEOS_READ"] }
/// ```
pub fn read_accounts_file(path: &Path) -> Result<Vec<StubAccount>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
    let file: AccountsFile = toml::from_str(&text).map_err(|e| e.message().to_owned())?;
    file.accounts
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let mut account = StubAccount::new(&a.client_id, "");
            account.secret_sha256 = match (a.client_secret, a.client_secret_sha256) {
                (Some(secret), None) => StubAccount::new(&a.client_id, &secret).secret_sha256,
                (None, Some(hex)) => parse_sha256(&hex).ok_or_else(|| {
                    format!("accounts[{i}].client_secret_sha256 is not 64 hex digits")
                })?,
                _ => {
                    return Err(format!(
                        "accounts[{i}] needs exactly one of client_secret and client_secret_sha256"
                    ))
                }
            };
            if let Some(name) = a.name {
                account.name = name;
            }
            if !a.permissions.is_empty() {
                account.permissions = a.permissions;
            }
            Ok(account)
        })
        .collect()
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_read_with_their_permissions() {
        let a = parse_account(
            "importer:s3cret:media-service=ADMIN,media-service=READ,video-service=VIDEOS_READ",
        )
        .unwrap();
        assert_eq!(a.client_id, "importer");
        assert_eq!(a.permissions["media-service"], vec!["ADMIN", "READ"]);
        assert_eq!(a.permissions["video-service"], vec!["VIDEOS_READ"]);
        let b = parse_account("id:secret").unwrap();
        assert_eq!(b.permissions["media-service"], vec!["ADMIN"]);
        assert!(parse_account("id").is_err());
        assert!(parse_account("id::x=y").is_err());
        assert!(parse_account("id:s:novalue").is_err());
    }

    #[test]
    fn an_accounts_file_takes_a_secret_or_its_hash() {
        let dir = std::env::temp_dir().join(format!("map-stub-accounts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("accounts.toml");
        let hash = crate::secret::sha256_hex(b"second", 32);
        std::fs::write(
            &file,
            format!("[[accounts]]\nclient_id = \"a\"\nclient_secret = \"first\"\npermissions = {{ media-service = [\"READ\"] }}\n[[accounts]]\nclient_id = \"b\"\nclient_secret_sha256 = \"{hash}\"\n"),
        )
        .unwrap();
        let accounts = read_accounts_file(&file).unwrap();
        assert_eq!(accounts[0].permissions["media-service"], vec!["READ"]);
        assert_eq!(
            accounts[1].secret_sha256,
            StubAccount::new("b", "second").secret_sha256
        );
        std::fs::write(&file, "[[accounts]]\nclient_id = \"a\"\n").unwrap();
        assert!(read_accounts_file(&file)
            .unwrap_err()
            .contains("exactly one"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
