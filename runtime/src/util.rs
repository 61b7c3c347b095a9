//! Small helpers several modules share: atomic file writes, reflected CRC-32 variants, edit
//! distance for "did you mean" suggestions.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `.name.tmp` beside `path`: where an atomic write puts the bytes before the rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then renamed:
/// `path` holds either the old or the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        // A full disk fails here: `path` keeps its old content, and the partial file goes.
        drop(f);
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The lookup table of the reflected CRC-32 with polynomial `poly` (0xEDB88320 for IEEE/PNG,
/// 0x82F63B78 for Castagnoli/TFRecord), built at compile time.
pub const fn crc32_table(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// The CRC of the concatenation of `parts` with a table from [`crc32_table`].
pub fn crc32_with(table: &[u32; 256], parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

/// Levenshtein distance over chars (two-row dynamic programming).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// A temporary directory for tests, removed when dropped; the name is unique per process and call.
#[cfg(test)]
pub(crate) struct TempDir(pub PathBuf);

#[cfg(test)]
impl TempDir {
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gristmill-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// Writes a text file and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }

    /// Writes `value` as pretty JSON and returns the path.
    pub fn write(&self, name: &str, value: &serde_json::Value) -> PathBuf {
        self.file(name, &serde_json::to_string_pretty(value).unwrap_or_default())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_distances() {
        const IEEE: [u32; 256] = crc32_table(0xEDB8_8320);
        const CASTAGNOLI: [u32; 256] = crc32_table(0x82F6_3B78);
        assert_eq!(crc32_with(&IEEE, &[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32_with(&IEEE, &[b"1234", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32_with(&CASTAGNOLI, &[b"123456789"]), 0xE306_9283);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = std::env::temp_dir().join(format!("gristmill-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!tmp_path(&p).exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
