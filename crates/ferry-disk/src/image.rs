//! Disk image facts and operations through `qemu-img` (`--output=json`).
//!
//! Reads pass `-U` (force-share) so they work while a running QEMU holds the image's lock;
//! a running guest may of course still be writing, which is the caller's concern.
//!
//! Paths are made absolute before they reach `qemu-img`: QEMU reads `name:rest` as a
//! protocol prefix unless a `/` comes before the colon, and an absolute path also makes the
//! backing file names qemu-img reports absolute.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DiskError;

/// The `qemu-img` program, found on `PATH`.
pub const QEMU_IMG: &str = "qemu-img";

/// Backing chains longer than this are refused (QEMU itself stops far earlier in practice).
const MAX_CHAIN: usize = 64;

/// The image formats ferry migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// A plain byte-for-byte image.
    Raw,
}

impl ImageFormat {
    /// The name qemu-img uses (`-f` / `-F`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            other => Err(format!("unsupported image format {other:?}")),
        }
    }
}

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingInfo {
    /// The name as written in the image (may be relative to the image's directory).
    pub filename: String,
    /// The backing file resolved as QEMU resolves it, then canonicalized.
    pub path: PathBuf,
    /// The backing format recorded in the image; `None` if the image does not record one
    /// (QEMU would probe it).
    pub format: Option<ImageFormat>,
}

/// What `qemu-img info` says about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The image file, absolute (canonical for the layers below the top).
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host (what copying the file costs on disk, roughly).
    pub actual_size: u64,
    /// The backing file, if the image has one.
    pub backing: Option<BackingInfo>,
}

/// The fields of `qemu-img info --output=json` we use.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    format: String,
    virtual_size: u64,
    #[serde(default)]
    actual_size: Option<u64>,
    #[serde(default)]
    backing_filename: Option<String>,
    #[serde(default)]
    full_backing_filename: Option<String>,
    #[serde(default)]
    backing_filename_format: Option<String>,
    #[serde(default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: Option<FormatSpecificData>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FormatSpecificData {
    #[serde(default)]
    data_file: Option<String>,
}

/// Inspect one image, letting qemu-img probe its format.
///
/// Fails with [`DiskError::MissingBacking`] if the image names a backing file that does not
/// exist. Probing is only safe for images the guest cannot have rewritten: a guest owning a
/// raw disk can make it look like qcow2 with any backing file. When the format is known
/// (from the VM's definition), use [`inspect_as`].
pub fn inspect(path: &Path) -> Result<ImageInfo, DiskError> {
    inspect_impl(path, None)
}

/// Inspect one image whose format is known (`-f`), without probing.
pub fn inspect_as(path: &Path, format: ImageFormat) -> Result<ImageInfo, DiskError> {
    inspect_impl(path, Some(format))
}

fn inspect_impl(path: &Path, format: Option<ImageFormat>) -> Result<ImageInfo, DiskError> {
    let path = absolute(path)?;
    // qemu-img's own "Could not open" for a missing image is fine; checking here gives the
    // same error shape as everywhere else in this crate.
    fs::metadata(&path).map_err(|e| DiskError::io("inspect", &path, e))?;
    let mut args: Vec<String> = vec!["info".into(), "--output=json".into(), "-U".into()];
    if let Some(f) = format {
        args.extend(["-f".into(), f.as_str().into()]);
    }
    let (command, stdout) = run_qemu_img(&args, &[&path])?;
    let raw: RawInfo = serde_json::from_slice(&stdout)
        .map_err(|source| DiskError::QemuImgOutput { command, source })?;
    convert(&path, raw)
}

/// The backing chain of an image, top first, each layer checked as by [`inspect`].
///
/// Runs `qemu-img info --backing-chain`; the existence of every backing file is checked
/// layer by layer first, because qemu-img's message for a missing one does not say which
/// image names it.
pub fn backing_chain(path: &Path) -> Result<Vec<ImageInfo>, DiskError> {
    backing_chain_impl(path, None)
}

/// [`backing_chain`] with the top image's format known (`-f`); the lower layers' formats
/// are those recorded in the layer above, as QEMU uses them.
pub fn backing_chain_as(path: &Path, format: ImageFormat) -> Result<Vec<ImageInfo>, DiskError> {
    backing_chain_impl(path, Some(format))
}

fn backing_chain_impl(
    path: &Path,
    format: Option<ImageFormat>,
) -> Result<Vec<ImageInfo>, DiskError> {
    let path = absolute(path)?;
    // Walk the chain with single-image `info` calls (which do not open backing files) so a
    // missing layer is reported as MissingBacking naming the image that wants it.
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut next = Some((path.clone(), format));
    while let Some((layer, fmt)) = next.take() {
        if seen.contains(&layer) || seen.len() >= MAX_CHAIN {
            return Err(DiskError::UnsupportedImage {
                path: path.clone(),
                reason: format!(
                    "backing chain loops or is longer than {MAX_CHAIN} images (at {})",
                    layer.display()
                ),
            });
        }
        let info = inspect_impl(&layer, fmt)?;
        seen.push(layer);
        next = info.backing.map(|b| (b.path, b.format));
    }

    let mut args: Vec<String> = vec![
        "info".into(),
        "--backing-chain".into(),
        "--output=json".into(),
        "-U".into(),
    ];
    if let Some(f) = format {
        args.extend(["-f".into(), f.as_str().into()]);
    }
    let (command, stdout) = run_qemu_img(&args, &[&path])?;
    let raws: Vec<RawInfo> = serde_json::from_slice(&stdout)
        .map_err(|source| DiskError::QemuImgOutput { command, source })?;
    let mut chain = Vec::with_capacity(raws.len());
    let mut layer = path;
    for raw in raws {
        let info = convert(&layer, raw)?;
        if let Some(b) = &info.backing {
            layer = b.path.clone();
        }
        chain.push(info);
    }
    Ok(chain)
}

/// Create an image with `qemu-img create`.
///
/// `backing` is written into the image as given (a relative name is relative to the new
/// image's directory, as QEMU resolves it) and must exist. Refuses to overwrite an existing
/// file, which `qemu-img create` would do silently.
pub fn create(
    path: &Path,
    format: ImageFormat,
    virtual_size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<(), DiskError> {
    let path = absolute(path)?;
    if fs::symlink_metadata(&path).is_ok() {
        return Err(DiskError::AlreadyExists { path });
    }
    let mut args: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        format.to_string(),
    ];
    if let Some((b, bfmt)) = backing {
        let resolved = resolve_backing(&path, b);
        if !resolved.exists() {
            return Err(DiskError::MissingBacking {
                image: path,
                backing: resolved,
            });
        }
        let name = b.to_str().ok_or_else(|| DiskError::InvalidPath {
            path: b.to_path_buf(),
            reason: "backing file name is not UTF-8",
        })?;
        args.extend(["-b".into(), name.into(), "-F".into(), bfmt.to_string()]);
    }
    args.push(path_arg(&path)?);
    args.push(virtual_size.to_string());
    run_qemu_img(&args, &[])?;
    Ok(())
}

/// The backing reference an image's header holds, read with its format pinned (never
/// probed) and without opening the backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingReference {
    /// The name as written (relative names are relative to the image's directory).
    pub name: String,
    /// The backing format recorded, if any.
    pub format: Option<ImageFormat>,
}

/// Reads `path`'s backing reference as [`BackingReference`]; `None` without one. Refuses
/// what ferry never follows: `json:` or protocol (`nbd://`, ...) backing names and qcow2
/// external data files.
pub fn backing_reference(
    path: &Path,
    format: ImageFormat,
) -> Result<Option<BackingReference>, DiskError> {
    let path = absolute(path)?;
    let args: Vec<String> = vec![
        "info".into(),
        "--output=json".into(),
        "-U".into(),
        "-f".into(),
        format.as_str().into(),
    ];
    let (command, stdout) = run_qemu_img(&args, &[&path])?;
    let raw: RawInfo = serde_json::from_slice(&stdout)
        .map_err(|source| DiskError::QemuImgOutput { command, source })?;
    if let Some(df) = raw
        .format_specific
        .and_then(|s| s.data)
        .and_then(|d| d.data_file)
    {
        return Err(DiskError::UnsupportedImage {
            path,
            reason: format!("external data file {df:?} is not supported"),
        });
    }
    let Some(name) = raw.backing_filename else {
        return Ok(None);
    };
    if name.starts_with("json:") || name.contains("://") {
        return Err(DiskError::UnsupportedImage {
            path,
            reason: format!("backing file {name:?} is not a plain file"),
        });
    }
    let format = match raw.backing_filename_format {
        None => None,
        Some(f) => Some(f.parse().map_err(|_| DiskError::UnsupportedFormat {
            path: path.clone(),
            format: f,
        })?),
    };
    Ok(Some(BackingReference { name, format }))
}

/// Where a backing reference of `image` leads, as QEMU resolves it (not canonicalized).
pub fn resolve_reference(image: &Path, name: &str) -> PathBuf {
    resolve_backing(image, Path::new(name))
}

/// Points the backing reference of `path` at `backing` unless it already resolves there
/// with that format: `qemu-img rebase -u`, which rewrites the header only (no guest data is
/// read or written), as after moving a chain to another directory. The new reference is
/// the bare file name when `backing` sits beside `path` (the chain can move again as a
/// whole), else `backing`'s absolute path. Returns whether the image was changed.
///
/// Unlike [`inspect`] this works while the current reference points at a file that does
/// not exist here (the source host's path).
pub fn point_backing_at(
    path: &Path,
    format: ImageFormat,
    backing: &Path,
    backing_format: ImageFormat,
) -> Result<bool, DiskError> {
    let path = absolute(path)?;
    let want =
        fs::canonicalize(backing).map_err(|e| DiskError::io("resolve backing file", backing, e))?;
    if let Some(r) = backing_reference(&path, format)? {
        let current = fs::canonicalize(resolve_backing(&path, Path::new(&r.name))).ok();
        if current.as_deref() == Some(want.as_path()) && r.format == Some(backing_format) {
            return Ok(false);
        }
    }
    let dir = path.parent().and_then(|d| fs::canonicalize(d).ok());
    let name = match (dir, want.parent(), want.file_name()) {
        (Some(d), Some(bd), Some(f)) if d == bd => PathBuf::from(f),
        _ => want.clone(),
    };
    let name = path_arg(&name)?;
    let args: Vec<String> = vec![
        "rebase".into(),
        "-u".into(),
        "-f".into(),
        format.as_str().into(),
        "-b".into(),
        name,
        "-F".into(),
        backing_format.as_str().into(),
    ];
    run_qemu_img(&args, &[&path])?;
    Ok(true)
}

/// Compare the guest-visible content of two images (`qemu-img compare -U`).
///
/// `Ok(true)` if identical, `Ok(false)` if they differ. Unallocated areas read as zeros,
/// so a qcow2 and a raw image with the same content compare equal.
pub fn compare(a: &Path, b: &Path) -> Result<bool, DiskError> {
    let a = absolute(a)?;
    let b = absolute(b)?;
    let args = vec![
        "compare".to_owned(),
        "-U".to_owned(),
        path_arg(&a)?,
        path_arg(&b)?,
    ];
    let command = command_line(&args);
    let out = spawn(&args, &a)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(command, &out)),
    }
}

/// Convert qemu-img's view of `path` into an [`ImageInfo`], checking the backing file.
fn convert(path: &Path, raw: RawInfo) -> Result<ImageInfo, DiskError> {
    let format: ImageFormat = raw
        .format
        .parse()
        .map_err(|_| DiskError::UnsupportedFormat {
            path: path.to_path_buf(),
            format: raw.format.clone(),
        })?;
    if let Some(df) = raw
        .format_specific
        .and_then(|s| s.data)
        .and_then(|d| d.data_file)
    {
        // The guest data lives in another file; copying the qcow2 alone would lose it.
        return Err(DiskError::UnsupportedImage {
            path: path.to_path_buf(),
            reason: format!("external data file {df:?} is not supported"),
        });
    }
    let backing = match raw.backing_filename {
        None => None,
        Some(filename) => {
            if filename.starts_with("json:") || filename.contains("://") {
                return Err(DiskError::UnsupportedImage {
                    path: path.to_path_buf(),
                    reason: format!("backing file {filename:?} is not a plain file"),
                });
            }
            let full = raw
                .full_backing_filename
                .map(PathBuf::from)
                .unwrap_or_else(|| resolve_backing(path, Path::new(&filename)));
            let full = resolve_backing(path, &full);
            let canon = match fs::canonicalize(&full) {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(DiskError::MissingBacking {
                        image: path.to_path_buf(),
                        backing: full,
                    })
                }
                Err(e) => return Err(DiskError::io("resolve backing file", &full, e)),
            };
            let format = match raw.backing_filename_format {
                None => None,
                Some(f) => Some(f.parse().map_err(|_| DiskError::UnsupportedFormat {
                    path: canon.clone(),
                    format: f,
                })?),
            };
            Some(BackingInfo {
                filename,
                path: canon,
                format,
            })
        }
    };
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size.unwrap_or(0),
        backing,
    })
}

/// A backing name as QEMU resolves it: relative names are relative to the image's directory.
fn resolve_backing(image: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(backing),
        None => backing.to_path_buf(),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, DiskError> {
    std::path::absolute(path).map_err(|e| DiskError::io("make absolute", path, e))
}

/// A path as a qemu-img argument. Refuses non-UTF-8 paths rather than mangling them, since
/// qemu-img echoes names back in JSON, which is UTF-8 only.
fn path_arg(path: &Path) -> Result<String, DiskError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DiskError::InvalidPath {
            path: path.to_path_buf(),
            reason: "path is not UTF-8",
        })
}

/// Run qemu-img with `args` then `paths`; return the command line and stdout on success.
fn run_qemu_img(args: &[String], paths: &[&Path]) -> Result<(String, Vec<u8>), DiskError> {
    let mut all = args.to_vec();
    for p in paths {
        all.push(path_arg(p)?);
    }
    let for_errors = paths.first().map(|p| p.to_path_buf()).unwrap_or_default();
    let command = command_line(&all);
    let out = spawn(&all, &for_errors)?;
    if !out.status.success() {
        return Err(failed(command, &out));
    }
    Ok((command, out.stdout))
}

fn spawn(args: &[String], path: &Path) -> Result<Output, DiskError> {
    Command::new(QEMU_IMG)
        .args(args)
        // Messages are parsed by nobody, but keep them in one language in the logs.
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| DiskError::io("run qemu-img for", path, e))
}

fn command_line(args: &[String]) -> String {
    let mut s = QEMU_IMG.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn failed(command: String, out: &Output) -> DiskError {
    DiskError::QemuImg {
        command,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn inspect_qcow2_and_raw() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        create(&q, ImageFormat::Qcow2, 64 * MIB, None).unwrap();
        let info = inspect(&q).unwrap();
        assert_eq!(info.format, ImageFormat::Qcow2);
        assert_eq!(info.virtual_size, 64 * MIB);
        assert!(info.actual_size > 0 && info.actual_size < MIB, "{info:?}");
        assert!(info.backing.is_none());
        assert_eq!(info.path, q);
        assert_eq!(inspect_as(&q, ImageFormat::Qcow2).unwrap(), info);

        let r = dir.path().join("b.raw");
        create(&r, ImageFormat::Raw, 32 * MIB, None).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&r).unwrap();
        f.write_all_at(&[7u8; 4096], 0).unwrap();
        drop(f);
        let info = inspect(&r).unwrap();
        assert_eq!(info.format, ImageFormat::Raw);
        assert_eq!(info.virtual_size, 32 * MIB);
        assert!(
            info.actual_size >= 4096 && info.actual_size < MIB,
            "{info:?}"
        );

        // Pinning the wrong format: a qcow2 read as raw is a raw image of the file's size.
        let as_raw = inspect_as(&q, ImageFormat::Raw).unwrap();
        assert_eq!(as_raw.format, ImageFormat::Raw);
        assert_ne!(as_raw.virtual_size, 64 * MIB);
    }

    #[test]
    fn backing_reference_follows_a_moved_chain() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let base = one.path().join("base.qcow2");
        let top = one.path().join("top.qcow2");
        create(&base, ImageFormat::Qcow2, 16 * MIB, None).unwrap();
        // An absolute reference: it still names the old place once the files move.
        create(
            &top,
            ImageFormat::Qcow2,
            16 * MIB,
            Some((&base, ImageFormat::Qcow2)),
        )
        .unwrap();
        let (base2, top2) = (two.path().join("base.qcow2"), two.path().join("top.qcow2"));
        fs::copy(&base, &base2).unwrap();
        fs::copy(&top, &top2).unwrap();
        fs::remove_file(&base).unwrap();
        assert!(matches!(
            inspect(&top2),
            Err(DiskError::MissingBacking { .. })
        ));

        assert!(point_backing_at(&top2, ImageFormat::Qcow2, &base2, ImageFormat::Qcow2).unwrap());
        let info = inspect_as(&top2, ImageFormat::Qcow2).unwrap();
        let b = info.backing.expect("a backing file");
        assert_eq!(b.path, fs::canonicalize(&base2).unwrap());
        assert_eq!(b.filename, "base.qcow2", "beside it: a relative name");
        assert_eq!(b.format, Some(ImageFormat::Qcow2));
        // Already right: left alone.
        assert!(!point_backing_at(&top2, ImageFormat::Qcow2, &base2, ImageFormat::Qcow2).unwrap());
        // A backing elsewhere is named by its absolute path.
        let elsewhere = one.path().join("other-base.qcow2");
        create(&elsewhere, ImageFormat::Qcow2, 16 * MIB, None).unwrap();
        assert!(
            point_backing_at(&top2, ImageFormat::Qcow2, &elsewhere, ImageFormat::Qcow2).unwrap()
        );
        let b = inspect(&top2).unwrap().backing.unwrap();
        assert_eq!(
            PathBuf::from(&b.filename),
            fs::canonicalize(&elsewhere).unwrap()
        );
    }

    #[test]
    fn format_serde_is_lowercase() {
        assert_eq!(
            serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
            "\"qcow2\""
        );
        assert_eq!(
            serde_json::from_str::<ImageFormat>("\"raw\"").unwrap(),
            ImageFormat::Raw
        );
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }

    #[test]
    fn inspect_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = inspect(&dir.path().join("nope.qcow2")).unwrap_err();
        assert!(matches!(err, DiskError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope.qcow2"), "{err}");
    }

    #[test]
    fn unsupported_format() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("a.vmdk");
        let st = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "vmdk"])
            .arg(&v)
            .arg("1M")
            .status()
            .unwrap();
        assert!(st.success());
        let err = inspect(&v).unwrap_err();
        assert!(
            matches!(err, DiskError::UnsupportedFormat { ref format, .. } if format == "vmdk"),
            "{err}"
        );
    }

    #[test]
    fn backing_chain_of_overlays() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create(&base, ImageFormat::Raw, 16 * MIB, None).unwrap();
        // Relative name, as images usually record it.
        create(
            &mid,
            ImageFormat::Qcow2,
            16 * MIB,
            Some((Path::new("base.raw"), ImageFormat::Raw)),
        )
        .unwrap();
        create(
            &top,
            ImageFormat::Qcow2,
            16 * MIB,
            Some((&mid, ImageFormat::Qcow2)),
        )
        .unwrap();

        let info = inspect(&top).unwrap();
        let b = info.backing.unwrap();
        assert_eq!(b.path, fs::canonicalize(&mid).unwrap());
        assert_eq!(b.format, Some(ImageFormat::Qcow2));

        let chain = backing_chain(&top).unwrap();
        assert_eq!(chain.len(), 3, "{chain:#?}");
        assert_eq!(chain[0].path, top);
        assert_eq!(chain[0].format, ImageFormat::Qcow2);
        assert_eq!(chain[1].path, fs::canonicalize(&mid).unwrap());
        let mb = chain[1].backing.as_ref().unwrap();
        assert_eq!(mb.filename, "base.raw");
        assert_eq!(mb.path, fs::canonicalize(&base).unwrap());
        assert_eq!(mb.format, Some(ImageFormat::Raw));
        assert_eq!(chain[2].path, fs::canonicalize(&base).unwrap());
        assert_eq!(chain[2].format, ImageFormat::Raw);
        assert!(chain[2].backing.is_none());
        assert_eq!(backing_chain_as(&top, ImageFormat::Qcow2).unwrap(), chain);

        // A plain image is a chain of one.
        assert_eq!(backing_chain(&base).unwrap().len(), 1);
    }

    #[test]
    fn missing_backing() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create(&base, ImageFormat::Qcow2, 8 * MIB, None).unwrap();
        create(
            &mid,
            ImageFormat::Qcow2,
            8 * MIB,
            Some((Path::new("base.qcow2"), ImageFormat::Qcow2)),
        )
        .unwrap();
        create(
            &top,
            ImageFormat::Qcow2,
            8 * MIB,
            Some((Path::new("mid.qcow2"), ImageFormat::Qcow2)),
        )
        .unwrap();
        fs::remove_file(&base).unwrap();

        let err = backing_chain(&top).unwrap_err();
        match &err {
            DiskError::MissingBacking { image, backing } => {
                assert_eq!(image, &fs::canonicalize(&mid).unwrap());
                assert_eq!(backing, &base);
            }
            other => panic!("expected MissingBacking, got {other}"),
        }
        assert!(err.to_string().contains("base.qcow2"), "{err}");
        assert!(matches!(
            inspect(&mid),
            Err(DiskError::MissingBacking { .. })
        ));
        // The top itself is fine: its backing exists.
        assert!(inspect(&top).is_ok());

        // create checks too.
        assert!(matches!(
            create(
                &dir.path().join("new.qcow2"),
                ImageFormat::Qcow2,
                MIB,
                Some((&base, ImageFormat::Qcow2))
            ),
            Err(DiskError::MissingBacking { .. })
        ));
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        fs::write(&p, b"precious").unwrap();
        assert!(matches!(
            create(&p, ImageFormat::Raw, MIB, None),
            Err(DiskError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn compare_images() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.raw");
        create(&a, ImageFormat::Qcow2, 4 * MIB, None).unwrap();
        create(&b, ImageFormat::Raw, 4 * MIB, None).unwrap();
        assert!(compare(&a, &b).unwrap());
        let f = fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(b"different", MIB).unwrap();
        drop(f);
        assert!(!compare(&a, &b).unwrap());
        let err = compare(&a, &dir.path().join("missing.raw")).unwrap_err();
        assert!(matches!(err, DiskError::QemuImg { .. }), "{err}");
    }
}
