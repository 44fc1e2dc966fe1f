//! The secrets file inside the instance (docs/specs/secrets/delivery.md).
//!
//! 1. The file lives on a tmpfs at [`SECRETS_DIR`] (the runtime mounts it; if it did not, init
//!    mounts one; if neither works, init refuses to write secrets to disk and the app does not
//!    start). `/.kiln/secrets.json` is a symlink to `secrets/secrets.json` in it.
//! 2. Each version is written to a temporary file created with mode 0400 and owned by the app's
//!    uid/gid, synced, then renamed over the previous one: an app never reads half a file.
//! 3. The directory is owned by the app's user, mode 0500: nobody else can list or open it.
//!
//! Nothing here prints a value: errors name paths and versions only.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use kiln_types::secrets::{SecretsFile, MAX_FILE_LEN, SECRETS_DIR, SECRETS_PATH};

const FILE_NAME: &str = "secrets.json";
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn is_tmpfs(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == TMPFS_MAGIC
}

fn ensure_tmpfs(uid: u32, gid: u32) -> Result<(), String> {
    std::fs::create_dir_all(SECRETS_DIR)
        .map_err(|e| format!("cannot create {SECRETS_DIR}: {e}"))?;
    if !is_tmpfs(SECRETS_DIR) {
        let target = std::ffi::CString::new(SECRETS_DIR).unwrap_or_default();
        let opts = std::ffi::CString::new(format!("mode=0500,size=1m,uid={uid},gid={gid}"))
            .unwrap_or_default();
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 || !is_tmpfs(SECRETS_DIR) {
            return Err(format!(
                "{SECRETS_DIR} is not a tmpfs and one cannot be mounted there ({}); refusing to write secrets to disk",
                std::io::Error::last_os_error()
            ));
        }
    }
    std::os::unix::fs::chown(SECRETS_DIR, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {SECRETS_DIR}: {e}"))?;
    std::fs::set_permissions(SECRETS_DIR, std::fs::Permissions::from_mode(0o500))
        .map_err(|e| format!("cannot chmod {SECRETS_DIR}: {e}"))?;
    Ok(())
}

/// Checks the bytes are a secrets file and returns it (for `export_env`).
pub(crate) fn parse(bytes: &[u8]) -> Result<SecretsFile, String> {
    if bytes.len() > MAX_FILE_LEN * 2 {
        return Err(format!(
            "the secrets file is {} bytes, over the limit",
            bytes.len()
        ));
    }
    // serde's message may quote the input: report only the position.
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "the secrets file is not valid (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// Writes the file atomically, mode 0400, owned by the app.
pub(crate) fn install(bytes: &[u8], uid: u32, gid: u32) -> Result<SecretsFile, String> {
    let file = parse(bytes)?;
    ensure_tmpfs(uid, gid)?;
    let dir = Path::new(SECRETS_DIR);
    let tmp = dir.join(".secrets.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    drop(f);
    let dest = dir.join(FILE_NAME);
    std::fs::rename(&tmp, &dest)
        .map_err(|e| format!("cannot rename to {}: {e}", dest.display()))?;
    // The fixed path apps read: a symlink into the tmpfs (replacing the file never touches it).
    let link = Path::new(SECRETS_PATH);
    let target = format!("secrets/{FILE_NAME}");
    if std::fs::read_link(link)
        .map(|t| t != Path::new(&target))
        .unwrap_or(true)
    {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&target, link)
            .map_err(|e| format!("cannot link {SECRETS_PATH}: {e}"))?;
    }
    Ok(file)
}
