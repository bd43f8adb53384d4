//! Secrets come from files (never argv or inline config), and a secret file must be
//! readable by its owner only.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} has mode {mode:o}: it must be readable by its owner only \
         (run `chmod 600 {path}`)"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

/// Reads a secret file after checking that neither group nor others may access it.
pub fn read_owner_only(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let read_err = |source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(read_err)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    std::fs::read(path).map(Zeroizing::new).map_err(read_err)
}

/// Writes a new secret file with mode 0600 from the start (never briefly readable by
/// others), failing if it already exists, and syncs it.
pub fn create_owner_only(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_readable_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        create_owner_only(&path, b"secret").unwrap();
        assert_eq!(read_owner_only(&path).unwrap().as_slice(), b"secret");

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_owner_only(&path).unwrap_err().to_string();
        assert!(err.contains("640") && err.contains("chmod 600"), "{err}");
        assert!(!err.contains("secret\""), "{err}");
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        create_owner_only(&path, b"one").unwrap();
        assert!(create_owner_only(&path, b"two").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }
}
