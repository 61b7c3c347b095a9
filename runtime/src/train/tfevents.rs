//! A TensorBoard event-file writer, by hand: no TensorFlow, no protobuf crate.
//!
//! An event file is a sequence of TFRecords:
//!
//! ```text
//! u64 length (LE) | u32 masked CRC32C of those 8 bytes | data | u32 masked CRC32C of data
//! ```
//!
//! with `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`. Each data is a protobuf `Event`:
//! `wall_time` (double, field 1), `step` (int64, field 2), then either `file_version` (string,
//! field 3: "brain.Event:2" in the first record) or `summary` (message, field 5) holding repeated
//! `value` (field 1) messages of `tag` (string, field 1) and `simple_value` (float, field 2).
//! TensorBoard reads any file whose name contains `tfevents`; ours is
//! `events.out.tfevents.{unix_time}.{hostname}.gristmill`.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli) lookup table of the reflected polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = crate::util::crc32_table(0x82F6_3B78);

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crate::util::crc32_with(&CRC32C_TABLE, &[data])
}

/// The TFRecord mask of a CRC: a CRC stored next to the data it covers is masked so that a CRC of
/// data that itself contains CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // ((crc >> 15) | (crc << 17)) in the format's description.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// Protobuf wire format: a key is varint((field << 3) | wire_type); wire types used here are
// 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `Event` header shared by every record: wall_time and step.
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_key(&mut ev, 1, 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut ev, 2, 0);
    // int64 is encoded as the two's-complement u64 (negative steps take 10 bytes), as protobuf does.
    put_varint(&mut ev, step as u64);
    ev
}

fn summary_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut v, 1, tag.as_bytes());
        put_key(&mut v, 2, 5);
        v.extend_from_slice(&value.to_le_bytes());
        put_bytes(&mut summary, 1, &v);
    }
    let mut ev = event_header(wall_time, step);
    put_bytes(&mut ev, 5, &summary);
    ev
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The machine's name for the file name, as TensorFlow puts it there; `localhost` when unknown.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    if clean.is_empty() { "localhost".into() } else { clean }
}

/// Writes scalars to a TensorBoard event file; every record reaches the OS before the call returns.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the file-version record.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let wall = now();
        let base = format!("events.out.tfevents.{}.{}.gristmill", wall as u64, hostname());
        // Two writers started in the same second get distinct files rather than one clobbering
        // the other.
        let mut n = 0;
        let (path, file) = loop {
            let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(Error::io(&path, e)),
            }
        };
        let mut w = EventWriter { path, file };
        let mut ev = event_header(wall, 0);
        put_bytes(&mut ev, 3, b"brain.Event:2");
        w.write_record(&ev)?;
        Ok(w)
    }

    /// The event file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `value` under `tag` (e.g. `train/loss`) at `step`.
    pub fn add_scalar(&mut self, tag: &str, step: usize, value: f64) -> Result<()> {
        self.add_scalars(step, &[(tag, value)])
    }

    /// Logs several scalars at `step` in one record.
    pub fn add_scalars(&mut self, step: usize, scalars: &[(&str, f64)]) -> Result<()> {
        // TensorBoard's simple_value is a float: the values are rounded to f32 here.
        let values: Vec<(&str, f32)> = scalars.iter().map(|&(t, v)| (t, v as f32)).collect();
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.write_record(&summary_event(now(), step, &values))
    }

    fn write_record(&mut self, event: &[u8]) -> Result<()> {
        self.file.write_all(&frame(event)).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the test reader makes of one Event.
    #[derive(Debug, Default, PartialEq)]
    struct Decoded {
        wall_time: f64,
        step: i64,
        file_version: Option<String>,
        values: Vec<(String, f32)>,
    }

    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    /// Iterates (field, wire type, payload) of a protobuf message; a varint's payload is its value.
    fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wt) = (key >> 3, key & 7);
            match wt {
                0 => {
                    let v = varint(b, &mut i);
                    out.push((field, wt, vec![], v));
                }
                1 => {
                    out.push((field, wt, b[i..i + 8].to_vec(), 0));
                    i += 8;
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    out.push((field, wt, b[i..i + n].to_vec(), 0));
                    i += n;
                }
                5 => {
                    out.push((field, wt, b[i..i + 4].to_vec(), 0));
                    i += 4;
                }
                _ => panic!("wire type {wt}"),
            }
        }
        out
    }

    fn decode_event(b: &[u8]) -> Decoded {
        let mut d = Decoded::default();
        for (field, wt, bytes, v) in fields(b) {
            match (field, wt) {
                (1, 1) => d.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
                (2, 0) => d.step = v as i64,
                (3, 2) => d.file_version = Some(String::from_utf8(bytes).unwrap()),
                (5, 2) => {
                    for (f, w, value, _) in fields(&bytes) {
                        assert_eq!((f, w), (1, 2));
                        let mut tag = String::new();
                        let mut x = f32::NAN;
                        for (vf, vw, vb, _) in fields(&value) {
                            match (vf, vw) {
                                (1, 2) => tag = String::from_utf8(vb).unwrap(),
                                (2, 5) => x = f32::from_le_bytes(vb.try_into().unwrap()),
                                other => panic!("unexpected value field {other:?}"),
                            }
                        }
                        d.values.push((tag, x));
                    }
                }
                other => panic!("unexpected event field {other:?}"),
            }
        }
        d
    }

    /// Reads back the records of an event file, checking both CRCs of each.
    fn read_records(path: &Path) -> Vec<Decoded> {
        let b = std::fs::read(path).unwrap();
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let len_bytes = &b[i..i + 8];
            let n = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(len_bytes), "length crc");
            let data = &b[i + 12..i + 12 + n];
            let crc = u32::from_le_bytes(b[i + 12 + n..i + 16 + n].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data), "data crc");
            out.push(decode_event(data));
            i += 16 + n;
        }
        assert_eq!(i, b.len());
        out
    }

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 (iSCSI) B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints() {
        let enc = |v| {
            let mut o = Vec::new();
            put_varint(&mut o, v);
            o
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX).len(), 10);
        assert_eq!(enc(-1i64 as u64), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }

    #[test]
    fn records_decode_back() {
        let dir = std::env::temp_dir().join(format!("gristmill-tfevents-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::new(&dir).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".gristmill"), "{name}");
        w.add_scalar("train/loss", 1, 2.5).unwrap();
        w.add_scalar("train/lr", 300, 1e-4).unwrap();
        w.add_scalars(1000, &[("train/loss", 0.125), ("eval/loss", -3.0)]).unwrap();
        // A second writer in the same second gets its own file.
        let w2 = EventWriter::new(&dir).unwrap();
        assert_ne!(w2.path(), w.path());

        let recs = read_records(w.path());
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(recs[0].step, 0);
        assert!(recs[0].values.is_empty());
        assert!(recs[0].wall_time > 1.6e9, "wall time in seconds since 1970");
        assert_eq!((recs[1].step, recs[1].values.clone()), (1, vec![("train/loss".to_string(), 2.5)]));
        assert_eq!((recs[2].step, recs[2].values.clone()), (300, vec![("train/lr".to_string(), 1e-4f32)]));
        assert_eq!(recs[3].step, 1000);
        assert_eq!(recs[3].values, vec![("train/loss".to_string(), 0.125), ("eval/loss".to_string(), -3.0)]);
        assert!(recs.iter().skip(1).all(|r| r.file_version.is_none() && r.wall_time >= recs[0].wall_time));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
