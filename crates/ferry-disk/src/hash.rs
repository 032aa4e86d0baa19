//! BLAKE3 of a file's whole logical content, the end-to-end check of a disk transfer.
//!
//! BLAKE3 here (XXH3 for RAM, see ARCHITECTURE.md): a disk check runs outside any downtime,
//! and a disk image outlives the migration, so the stronger hash is worth its cost.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sparse::DataExtents;
use crate::DiskError;

/// Read and hash in 1 MiB steps.
const BUF: usize = 1 << 20;

/// Fed to the hasher for holes, so they are never read from disk.
static ZEROS: [u8; BUF] = [0; BUF];

/// A BLAKE3 digest. Displays, parses and serializes as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blake3Digest(pub [u8; 32]);

impl Blake3Digest {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// The digest of an in-memory buffer.
    pub fn of_bytes(data: &[u8]) -> Self {
        Blake3Digest(*blake3::hash(data).as_bytes())
    }
}

impl From<blake3::Hash> for Blake3Digest {
    fn from(h: blake3::Hash) -> Self {
        Blake3Digest(*h.as_bytes())
    }
}

impl fmt::Display for Blake3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Blake3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blake3Digest({})", self.to_hex())
    }
}

impl FromStr for Blake3Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(format!(
                "BLAKE3 digest must be 64 hex digits, got {}",
                s.len()
            ));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]);
            let lo = hex_val(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => return Err(format!("BLAKE3 digest {s:?} is not hex")),
            }
        }
        Ok(Blake3Digest(out))
    }
}

impl Serialize for Blake3Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Blake3Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// BLAKE3 of the file at `path`, holes hashed as zeros without reading them.
///
/// Single-threaded: the agent runs it on a blocking thread, and on small hosts a second
/// hashing thread would compete with the guest and the transfer.
pub fn file_blake3(path: &Path) -> Result<Blake3Digest, DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io("open", path, e))?;
    file_blake3_of(&file, path)
}

/// [`file_blake3`] of an open file; `path` names it in errors.
pub fn file_blake3_of(file: &File, path: &Path) -> Result<Blake3Digest, DiskError> {
    // DataExtents owns a File; the duplicate shares the file offset, which only its lseek
    // moves and the positioned reads here ignore.
    let dup = file
        .try_clone()
        .map_err(|e| DiskError::io("duplicate descriptor of", path, e))?;
    let extents = DataExtents::from_file(dup, path)?;
    let len = extents.file_len();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    for ext in extents {
        let ext = ext?;
        hash_zeros(&mut hasher, ext.offset - pos);
        let mut off = ext.offset;
        while off < ext.end() {
            let n = (ext.end() - off).min(BUF as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)
                .map_err(|e| DiskError::io("read", path, e))?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        pos = ext.end();
    }
    hash_zeros(&mut hasher, len - pos);
    Ok(hasher.finalize().into())
}

fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let step = n.min(BUF as u64) as usize;
        hasher.update(&ZEROS[..step]);
        n -= step as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Blake3Digest::of_bytes(b"ferry");
        let hex = d.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, blake3::hash(b"ferry").to_hex().as_str());
        assert_eq!(hex.parse::<Blake3Digest>().unwrap(), d);
        assert_eq!(hex.to_uppercase().parse::<Blake3Digest>().unwrap(), d);
        assert!("abc".parse::<Blake3Digest>().is_err());
        assert!("g".repeat(64).parse::<Blake3Digest>().is_err());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<Blake3Digest>(&json).unwrap(), d);
    }

    #[test]
    fn sparse_file_hashes_as_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let len = 5 * BUF as u64 + 777;
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(b"hello", 3).unwrap();
        f.write_all_at(&[7u8; 70_000], 2 * BUF as u64 - 100)
            .unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        drop(f);
        let content = std::fs::read(&p).unwrap();
        assert_eq!(content.len() as u64, len);
        assert_eq!(file_blake3(&p).unwrap(), Blake3Digest::of_bytes(&content));

        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        assert_eq!(file_blake3(&empty).unwrap(), Blake3Digest::of_bytes(&[]));
        let holes = dir.path().join("holes");
        File::create(&holes)
            .unwrap()
            .set_len(3 * BUF as u64 + 1)
            .unwrap();
        assert_eq!(
            file_blake3(&holes).unwrap(),
            Blake3Digest::of_bytes(&vec![0u8; 3 * BUF + 1])
        );
    }
}
