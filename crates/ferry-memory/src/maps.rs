//! Locating the guest RAM mapping in `/proc/PID/maps`.

use std::path::{Path, PathBuf};

use crate::{TrackerError, PAGE_SIZE};

/// Where a file is mapped in a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Start address in the target process.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of `start` in the file, in bytes.
    pub file_offset: u64,
}

impl Mapping {
    /// File offset in pages.
    pub fn file_offset_pages(&self) -> u64 {
        self.file_offset / PAGE_SIZE as u64
    }
}

#[derive(Debug)]
struct Line<'a> {
    start: u64,
    end: u64,
    offset: u64,
    dev_ino: (&'a str, &'a str),
    path: &'a str,
}

fn parse_line(line: &str) -> Option<Line<'_>> {
    // "start-end perms offset dev inode      path": the path is everything after the fifth
    // field (it may contain spaces), with the column padding trimmed.
    let mut rest = line;
    let mut fields = [""; 5];
    for f in fields.iter_mut() {
        rest = rest.trim_start_matches(' ');
        let cut = rest.find(' ').unwrap_or(rest.len());
        *f = &rest[..cut];
        rest = &rest[cut..];
    }
    let (s, e) = fields[0].split_once('-')?;
    Some(Line {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        offset: u64::from_str_radix(fields[2], 16).ok()?,
        dev_ino: (fields[3], fields[4]),
        path: rest.trim_start_matches(' '),
    })
}

/// Find the mapping of `ram_path` with length `ram_len` in `/proc/PID/maps`.
///
/// Adjacent lines for the same file with contiguous addresses and offsets are merged first:
/// the kernel splits one `mmap` into several VMAs when parts get different flags (QEMU's
/// `madvise` calls, or a userfaultfd registration). Exactly one merged run must have the
/// requested length; several would mean the RAM is mapped twice and tracking one copy would
/// miss writes through the other, so that is an error.
pub fn find_mapping(pid: i32, ram_path: &Path, ram_len: u64) -> Result<Mapping, TrackerError> {
    let maps_path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&maps_path)
        .map_err(|e| TrackerError::io(format!("read {maps_path}"), e))?;
    // The kernel prints the resolved absolute path; compare against the canonical form.
    let want: PathBuf = std::fs::canonicalize(ram_path).unwrap_or_else(|_| ram_path.to_path_buf());
    find_in_maps(&text, &want, ram_len).map_err(|detail| TrackerError::MappingNotFound {
        pid,
        path: ram_path.to_path_buf(),
        len: ram_len,
        detail,
    })
}

pub(crate) fn find_in_maps(text: &str, want: &Path, ram_len: u64) -> Result<Mapping, String> {
    let mut runs: Vec<Mapping> = Vec::new();
    let mut last: Option<(u64, u64, (&str, &str))> = None; // (end, end offset, dev/ino)
    for line in text.lines().filter_map(parse_line) {
        if Path::new(line.path) != want {
            last = None;
            continue;
        }
        let len = line.end.saturating_sub(line.start);
        match (last, runs.last_mut()) {
            (Some((end, off_end, di)), Some(run))
                if end == line.start && off_end == line.offset && di == line.dev_ino =>
            {
                run.len += len;
            }
            _ => runs.push(Mapping {
                start: line.start,
                len,
                file_offset: line.offset,
            }),
        }
        last = Some((line.end, line.offset + len, line.dev_ino));
    }
    let matching: Vec<&Mapping> = runs.iter().filter(|m| m.len == ram_len).collect();
    match matching.as_slice() {
        [m] if m.file_offset % PAGE_SIZE as u64 == 0 => Ok(**m),
        [m] => Err(format!(
            "mapping at {:#x} has unaligned file offset {:#x}",
            m.start, m.file_offset
        )),
        [] if runs.is_empty() => Err("file not mapped".into()),
        [] => Err(format!(
            "mapped, but with other lengths: {}",
            describe(&runs)
        )),
        many => Err(format!(
            "mapped {} times with that length (ambiguous): {}",
            many.len(),
            describe(&runs)
        )),
    }
}

fn describe(runs: &[Mapping]) -> String {
    runs.iter()
        .map(|m| format!("{:#x}+{:#x}@{:#x}", m.start, m.len, m.file_offset))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses an empty or not page-aligned range to track.
pub(crate) fn check_page_range(start: u64, len: u64) -> Result<(), TrackerError> {
    let page = crate::PAGE_SIZE as u64;
    if start % page != 0 || len % page != 0 || len == 0 {
        return Err(TrackerError::Unsupported(format!(
            "range {start:#x}+{len:#x} is not a non-empty page-aligned range"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123 /usr/bin/qemu
7f0000000000-7f0000200000 rw-s 00000000 00:19 42                         /dev/shm/ram one
7f0000200000-7f0000400000 rw-s 00200000 00:19 42                         /dev/shm/ram one
7f1000000000-7f1000100000 rw-s 00100000 00:19 43                         /dev/shm/other
7f2000000000-7f2000001000 rw-p 00000000 00:00 0 
";

    #[test]
    fn merges_split_vmas_and_keeps_offset() {
        let m = find_in_maps(MAPS, Path::new("/dev/shm/ram one"), 0x400000).unwrap();
        assert_eq!(
            m,
            Mapping {
                start: 0x7f0000000000,
                len: 0x400000,
                file_offset: 0
            }
        );
        let o = find_in_maps(MAPS, Path::new("/dev/shm/other"), 0x100000).unwrap();
        assert_eq!(o.file_offset_pages(), 0x100);
    }

    #[test]
    fn wrong_length_missing_and_ambiguous() {
        let e = find_in_maps(MAPS, Path::new("/dev/shm/ram one"), 0x200000).unwrap_err();
        assert!(e.contains("other lengths"), "{e}");
        assert!(find_in_maps(MAPS, Path::new("/dev/shm/nope"), 4096)
            .unwrap_err()
            .contains("not mapped"));
        let twice =
            format!("{MAPS}7f3000000000-7f3000100000 rw-s 00100000 00:19 43 /dev/shm/other\n");
        let e = find_in_maps(&twice, Path::new("/dev/shm/other"), 0x100000).unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
    }
}
