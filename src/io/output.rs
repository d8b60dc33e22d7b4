//! Output files: one policy for every file a command writes (results, models, data, plots,
//! run directories), so that nothing the user has is ever lost.
//!
//! # The policy
//!
//! * **Checked before any work.** [`Target::check`] resolves the path and refuses, with one
//!   line naming the path, what cannot end well: a directory, a missing or unwritable output
//!   directory, an existing regular file without `force`, and any path that *is* one of the
//!   command's inputs — compared by file identity (device and inode), so another spelling,
//!   a hard link or a symbolic link to an input is caught too.
//! * **Regular files are replaced atomically.** The bytes go to a temporary file beside the
//!   destination (same file system), which is renamed over it only when complete: a failed or
//!   interrupted run leaves the old file (or no file) in place, never a partial one. A
//!   replaced file keeps its permission bits.
//! * **Symbolic links are followed**: the link's target is what gets written (atomically,
//!   as above); the link itself stays a link.
//! * **Character devices, FIFOs and sockets are written through** (`--out /dev/null` discards
//!   the result, a FIFO feeds a reader), never replaced by a regular file.
//! * **Interrupted runs leave no debris.** Every temporary file or directory made here is
//!   registered until it is renamed into place or dropped; [`install_signal_cleanup`]
//!   (called once by the binary) removes whatever is registered on SIGINT, SIGTERM or SIGHUP
//!   and then lets the signal end the process as it would have.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{FisherError, Result};

use super::io_error;

/// The directory `path` will be created in (`.` for a bare file name).
pub fn output_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks that `path` can be created: its directory exists and it is not itself a directory.
/// Call it before computing, so that a typo in the output path fails fast. (The whole
/// policy, with inputs and `--force`, is [`Target::check`].)
pub fn check_output_path(path: &Path) -> Result<()> {
    let dir = output_dir(path);
    if !dir.is_dir() {
        return Err(io_error(dir, format!("output directory does not exist (cannot write {})", path.display())));
    }
    if path.is_dir() {
        return Err(io_error(path, "is a directory, not an output file"));
    }
    Ok(())
}

/// The most symbolic links followed when resolving an output path (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;

/// A named input of a command, for the output-is-an-input check: the flag that named it and
/// its path.
pub type Input<'a> = (&'a str, &'a Path);

/// Where an output goes, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file (new, or existing and replaced under `force`), at `path` with every
    /// symbolic link resolved; written to a temporary file and renamed into place.
    File {
        /// The resolved destination.
        path: PathBuf,
        /// The permission bits of the file it replaces (kept), if one exists.
        #[cfg(unix)]
        mode: Option<u32>,
    },
    /// A character device, FIFO or socket: opened for writing and written through.
    Stream {
        /// The resolved path.
        path: PathBuf,
    },
}

#[cfg(unix)]
fn identity(meta: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn identity(_meta: &Metadata) -> (u64, u64) {
    (0, 0)
}

/// `path` with every symbolic link in its last component followed (a dangling link resolves
/// to the path it points at, which is then created). Links in the directories above are
/// left to the operating system, which follows them when the file is opened.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINK_HOPS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&current).map_err(|e| io_error(&current, format!("cannot read the link: {e}")))?;
                current = if target.is_absolute() { target } else { output_dir(&current).join(target) };
            }
            _ => return Ok(current),
        }
    }
    Err(io_error(path, format!("more than {MAX_LINK_HOPS} symbolic links to follow")))
}

impl Target {
    /// Applies the policy to the output `path` given with `flag` (e.g. `--out`): see the
    /// module docs. `inputs` are every file the command reads; `force` allows replacing an
    /// existing regular file. Nothing is created.
    pub fn check(path: &Path, flag: &str, force: bool, inputs: &[Input<'_>]) -> Result<Target> {
        // A device, FIFO or socket reached through links the kernel resolves itself
        // (`/dev/stdout` → `/proc/self/fd/1` → `pipe:[…]`, which names no path) is opened as
        // named; resolving such a link by hand would end at a path that does not exist.
        let through = fs::metadata(path).ok().filter(|m| !m.file_type().is_file() && !m.file_type().is_dir());
        let resolved = if through.is_some() { path.to_path_buf() } else { resolve_links(path)? };
        let existing = through.or_else(|| fs::metadata(&resolved).ok());
        if let Some(meta) = &existing {
            let id = identity(meta);
            for (input_flag, input) in inputs {
                if cfg!(unix) && fs::metadata(input).is_ok_and(|m| identity(&m) == id) {
                    return Err(io_error(
                        path,
                        format!("{flag} is the same file as {input_flag} {}: refusing to overwrite an input", input.display()),
                    ));
                }
            }
            let kind = meta.file_type();
            if kind.is_dir() {
                return Err(io_error(path, format!("{flag} is a directory, not an output file")));
            }
            if !kind.is_file() {
                return Ok(Target::Stream { path: resolved });
            }
            if !force {
                return Err(io_error(path, format!("{flag} exists; pass --force to replace it")));
            }
        }
        let dir = output_dir(&resolved);
        if !dir.is_dir() {
            return Err(io_error(dir, format!("output directory does not exist (cannot write {})", path.display())));
        }
        check_writable(dir, path)?;
        Ok(Target::File {
            path: resolved,
            #[cfg(unix)]
            mode: existing.map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())),
        })
    }

    /// The resolved path written to.
    pub fn path(&self) -> &Path {
        match self {
            Target::File { path, .. } | Target::Stream { path } => path,
        }
    }

    /// Writes the output with `write`: to a registered temporary file renamed into place
    /// (regular files) or straight through (devices, FIFOs, sockets). `suffix` ends the
    /// temporary file's name (e.g. `.png`, for libraries that look at it).
    pub fn write(&self, suffix: &str, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        let fail = |e: std::io::Error| io_error(self.path(), format!("cannot write: {e}"));
        match self {
            Target::Stream { path } => {
                let file = fs::OpenOptions::new().write(true).open(path).map_err(fail)?;
                let mut out = std::io::BufWriter::new(file);
                write(&mut out).map_err(fail)?;
                out.flush().map_err(fail)
            }
            Target::File { path, .. } => {
                let temp = output_temp_file(output_dir(path), suffix).map_err(fail)?;
                let mut out = std::io::BufWriter::new(temp.as_file());
                write(&mut out).map_err(fail)?;
                out.flush().map_err(fail)?;
                drop(out);
                temp.as_file().sync_all().map_err(fail)?;
                #[cfg(unix)]
                if let Target::File { mode: Some(mode), .. } = self {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(temp.path(), fs::Permissions::from_mode(*mode)).map_err(fail)?;
                }
                persist(temp, path).map_err(fail)
            }
        }
    }
}

/// Fails early when `dir` is not writable (read-only mount, permissions): creating and
/// removing a temporary file is the only test that holds for every user, root included.
fn check_writable(dir: &Path, path: &Path) -> Result<()> {
    // Registered like every temporary file, so that a signal right now leaves no probe.
    let probe = register(|| tempfile::Builder::new().prefix(".fisher-probe-").tempfile_in(dir), |t| t.path().to_path_buf())
        .map_err(|e| io_error(dir, format!("cannot write {} there: {e}", path.display())))?;
    let probe_path = probe.path().to_path_buf();
    drop(probe);
    forget(&probe_path);
    Ok(())
}

/// Temporary files and directories alive now: what a signal must remove.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while the lock was held leaves the list itself intact.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `path` (made under the same lock, so that a signal sees it the moment it
/// exists) until [`forget`].
fn register<T>(make: impl FnOnce() -> std::io::Result<T>, path_of: impl Fn(&T) -> PathBuf) -> std::io::Result<T> {
    let mut live = live();
    let made = make()?;
    live.push(path_of(&made));
    Ok(made)
}

/// Removes `path` from the registry (it was renamed into place or removed).
pub fn forget(path: &Path) {
    live().retain(|p| p != path);
}

/// A temporary file in `dir` (same file system as the destination, so that the final
/// `persist` is an atomic rename) for an output that will be renamed into place, registered
/// for removal on SIGINT/SIGTERM/SIGHUP. Temporary files are private (0600) by default;
/// outputs get the usual 0666 less the umask, as any file a program creates.
pub fn output_temp_file(dir: &Path, suffix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".fisher-").suffix(suffix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    register(|| builder.tempfile_in(dir), |t| t.path().to_path_buf())
}

/// Renames a temporary file from [`output_temp_file`] into place at `path` and takes it off
/// the signal registry.
pub fn persist(temp: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
    let temp_path = temp.path().to_path_buf();
    let result = temp.persist(path).map(drop).map_err(|e| e.error);
    forget(&temp_path);
    result
}

/// A temporary directory in `dir` named `prefix…`, registered like [`output_temp_file`]
/// (for outputs that are directories, staged and renamed into place). Call [`forget`] with
/// its path once it is renamed.
pub fn output_temp_dir(dir: &Path, prefix: &str) -> std::io::Result<tempfile::TempDir> {
    register(|| tempfile::Builder::new().prefix(prefix).tempdir_in(dir), |t| t.path().to_path_buf())
}

/// Removes every registered temporary file or directory (what a signal handler does).
fn remove_live() {
    let live = live();
    for path in live.iter() {
        let _ = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    }
    // The lock is held until the process ends, so that no new temporary file appears after
    // the sweep.
    std::mem::forget(live);
}

/// Installs the handler that removes registered temporary outputs on SIGINT, SIGTERM and
/// SIGHUP, then ends the process as the signal would have (the shell sees 130, 143, 129).
/// Call once, early, from a binary; libraries embedding the engine keep their own handling.
pub fn install_signal_cleanup() -> Result<()> {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| FisherError::InvalidInput(format!("cannot install the signal handler: {e}")))?;
        std::thread::Builder::new()
            .name("fisher-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    remove_live();
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    std::process::exit(128 + signal);
                }
            })
            .map_err(|e| FisherError::InvalidInput(format!("cannot start the signal thread: {e}")))?;
    }
    Ok(())
}

/// `name` with `suffix` appended (for sibling paths such as `RUN.partial`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_text(target: &Target, text: &str) -> Result<()> {
        target.write(".txt", |w| w.write_all(text.as_bytes()))
    }

    #[test]
    fn new_file_is_written_and_existing_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("F.txt");
        let t = Target::check(&out, "--out", false, &[]).unwrap();
        write_text(&t, "one").unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "one");
        let err = Target::check(&out, "--out", false, &[]).unwrap_err().to_string();
        assert!(err.contains("--out exists; pass --force"), "{err}");
        write_text(&Target::check(&out, "--out", true, &[]).unwrap(), "two").unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "two");
        // No temporary or probe file is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("F.txt")]);
    }

    #[cfg(unix)]
    #[test]
    fn replaced_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("F.txt");
        fs::write(&out, "old").unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o600)).unwrap();
        write_text(&Target::check(&out, "--out", true, &[]).unwrap(), "new").unwrap();
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn an_input_by_any_spelling_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("G.npy");
        fs::write(&input, "data").unwrap();
        let hard = dir.path().join("hard.npy");
        fs::hard_link(&input, &hard).unwrap();
        let soft = dir.path().join("soft.npy");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        let dotted = dir.path().join(".").join("G.npy");
        for out in [&input, &hard, &soft, &dotted] {
            let err = Target::check(out, "--out", true, &[("--grads", &input)]).unwrap_err().to_string();
            assert!(err.contains("same file as --grads"), "{err}");
        }
        assert_eq!(fs::read_to_string(&input).unwrap(), "data");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_followed_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.txt");
        fs::write(&target, "old").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        let t = Target::check(&link, "--out", true, &[]).unwrap();
        assert_eq!(t.path(), target.as_path());
        write_text(&t, "new").unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        // A dangling link creates its target.
        let dangling = dir.path().join("dangling.txt");
        std::os::unix::fs::symlink("created.txt", &dangling).unwrap();
        write_text(&Target::check(&dangling, "--out", false, &[]).unwrap(), "x").unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("created.txt")).unwrap(), "x");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read_to_string(fifo).unwrap())
        };
        let t = Target::check(&fifo, "--out", false, &[]).unwrap();
        assert!(matches!(t, Target::Stream { .. }));
        write_text(&t, "through").unwrap();
        assert_eq!(reader.join().unwrap(), "through");
        assert!(!fs::metadata(&fifo).unwrap().is_file());
    }

    #[test]
    fn directories_and_missing_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Target::check(dir.path(), "--out", true, &[]).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let err = Target::check(&dir.path().join("no/such/F.txt"), "--out", true, &[]).unwrap_err().to_string();
        assert!(err.contains("output directory does not exist"), "{err}");
    }

    #[test]
    fn temp_files_are_registered_until_persisted_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let temp = output_temp_file(dir.path(), ".x").unwrap();
        let path = temp.path().to_path_buf();
        assert!(live().contains(&path));
        drop(temp);
        forget(&path);
        assert!(!live().contains(&path));
    }
}
