//! Output files: checked before any work, written to a temporary file beside the
//! destination and renamed into place, so that a failed run never leaves a partial file.

use std::path::Path;

use crate::error::Result;

use super::io_error;

/// The directory `path` will be created in (`.` for a bare file name).
pub fn output_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks that `path` can be created: its directory exists and it is not itself a directory.
/// Call it before computing, so that a typo in the output path fails fast.
pub fn check_output_path(path: &Path) -> Result<()> {
    let dir = output_dir(path);
    if !dir.is_dir() {
        return Err(io_error(
            dir,
            format!("output directory does not exist (cannot write {})", path.display()),
        ));
    }
    if path.is_dir() {
        return Err(io_error(path, "is a directory, not an output file"));
    }
    Ok(())
}

/// A temporary file in `dir` (same file system as the destination, so that the final
/// `persist` is an atomic rename) for an output that will be renamed into place. Temporary
/// files are private (0600) by default; outputs get the usual 0666 less the umask, as any
/// file a program creates.
pub fn output_temp_file(dir: &Path, suffix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".fisher-").suffix(suffix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(dir)
}
