//! The spool's store: an append-only log in segment files. One thread writes it, a batch
//! at a time with one `fdatasync` (group commit); readers take a record's bytes with one
//! positioned read; space is won back by compacting the oldest segment.
//!
//! Directory `data_dir/spool-log/`: `format` (the text `wardgate spool log 2`), `lock` (held
//! by the one process that has the spool open), `corrupt/` (bytes found damaged, for an
//! engineer), and segments `{number:016x}.seg`, numbered in the order they were written.
//!
//! A segment is a sequence of frames:
//!
//! ```text
//! frame = magic "WG" (2) ‖ body length (u32 BE) ‖ CRC-32 of body (u32 BE) ‖ body
//! body  = 1 ‖ key (9) ‖ held (1) ‖ sealed value         a record (see `record`)
//!       | 2 ‖ key (9)                                   the record is gone (sent, evicted…)
//!       | 3 ‖ sequence limit (u64 BE)                   sequence numbers reserved
//!       | 4 ‖ number (u64 BE) ‖ key (9) ‖ sealed value  a record refused upstream, kept
//!       | 5 ‖ number (u64 BE)                           that rejected record deleted
//! ```
//!
//! Replaying every segment in order rebuilds the state: a record is live unless a later
//! frame deletes it; a record written twice (a compaction's copy) is where it was last
//! written. Every segment starts with the sequence limit of its time, so the limit survives
//! the compaction of older ones.
//!
//! Compaction takes only the oldest segment: its live records are written again at the head,
//! made durable, and then its file is deleted. Only the oldest, because a delete frame names
//! a record written before it: the oldest segment's deletes name records in itself or in
//! segments already gone, so deleting it can never bring a record back.
//!
//! A frame whose length or CRC does not check is skipped up to the next frame that does
//! (found by its magic); the skipped bytes are copied to `corrupt/` and reported. Damage
//! at the end of the newest segment is a write the crash cut short, never acknowledged
//! (acknowledgements follow the `fdatasync`): it is cut off.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::record::{Key, KEY_LEN};

const MAGIC: [u8; 2] = *b"WG";
const HEADER: usize = 10;
/// Bytes a record's frame adds to its key and sealed value.
pub const RECORD_OVERHEAD: u64 = HEADER as u64 + 2;
pub const FORMAT: &str = "wardgate spool log 2\n";

const RECORD: u8 = 1;
const DELETE: u8 = 2;
const SEQ_LIMIT: u8 = 3;
const REJECTED: u8 = 4;
const UNREJECT: u8 = 5;

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Record {
        key: Key,
        held: bool,
        value: &'a [u8],
    },
    Delete(Key),
    SeqLimit(u64),
    Rejected {
        number: u64,
        key: Key,
        value: &'a [u8],
    },
    Unreject(u64),
}

/// Where a frame lies: its segment, its offset there, its length, and where its value
/// starts within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub value_at: u32,
}

impl Loc {
    /// The value's offset in the segment file and its length.
    pub fn value(&self) -> (u64, usize) {
        (
            self.offset + u64::from(self.value_at),
            (self.len - self.value_at) as usize,
        )
    }
}

/// Appends `frame` to `out`; returns its length and where its value starts.
fn encode(frame: &Frame, out: &mut Vec<u8>) -> (u32, u32) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]);
    let mut value_at = 0;
    match frame {
        Frame::Record { key, held, value } => {
            out.push(RECORD);
            out.extend_from_slice(&key.to_bytes());
            out.push(u8::from(*held));
            value_at = out.len() - start;
            out.extend_from_slice(value);
        }
        Frame::Delete(key) => {
            out.push(DELETE);
            out.extend_from_slice(&key.to_bytes());
        }
        Frame::SeqLimit(limit) => {
            out.push(SEQ_LIMIT);
            out.extend_from_slice(&limit.to_be_bytes());
        }
        Frame::Rejected { number, key, value } => {
            out.push(REJECTED);
            out.extend_from_slice(&number.to_be_bytes());
            out.extend_from_slice(&key.to_bytes());
            value_at = out.len() - start;
            out.extend_from_slice(value);
        }
        Frame::Unreject(number) => {
            out.push(UNREJECT);
            out.extend_from_slice(&number.to_be_bytes());
        }
    }
    let body = &out[start + HEADER..];
    let body_len = u32::try_from(body.len()).expect("a frame under 4 GiB");
    let crc = crc32fast::hash(body);
    out[start + 2..start + 6].copy_from_slice(&body_len.to_be_bytes());
    out[start + 6..start + 10].copy_from_slice(&crc.to_be_bytes());
    let len = u32::try_from(out.len() - start).expect("a frame under 4 GiB");
    (len, u32::try_from(value_at).unwrap_or(0))
}

/// The frame at the start of `buf`, its length and its value's start; `None` if the bytes
/// there are not a whole frame that checks.
fn decode(buf: &[u8]) -> Option<(Frame<'_>, u32, u32)> {
    if buf.len() < HEADER || buf[..2] != MAGIC {
        return None;
    }
    let body_len = u32::from_be_bytes(buf[2..6].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(buf[6..10].try_into().ok()?);
    let body = buf.get(HEADER..HEADER.checked_add(body_len)?)?;
    if body.is_empty() || crc32fast::hash(body) != crc {
        return None;
    }
    let u64_at = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    let (kind, rest) = body.split_first()?;
    let (frame, value_at) = match *kind {
        RECORD if rest.len() > KEY_LEN => {
            let key = Key::from_bytes(&rest[..KEY_LEN])?;
            let held = match rest[KEY_LEN] {
                0 => false,
                1 => true,
                _ => return None,
            };
            let value = &rest[KEY_LEN + 1..];
            (Frame::Record { key, held, value }, HEADER + 2 + KEY_LEN)
        }
        DELETE if rest.len() == KEY_LEN => (Frame::Delete(Key::from_bytes(rest)?), 0),
        SEQ_LIMIT if rest.len() == 8 => (Frame::SeqLimit(u64_at(rest)?), 0),
        REJECTED if rest.len() > 8 + KEY_LEN => {
            let number = u64_at(&rest[..8])?;
            let key = Key::from_bytes(&rest[8..8 + KEY_LEN])?;
            let value = &rest[8 + KEY_LEN..];
            (
                Frame::Rejected { number, key, value },
                HEADER + 1 + 8 + KEY_LEN,
            )
        }
        UNREJECT if rest.len() == 8 => (Frame::Unreject(u64_at(rest)?), 0),
        _ => return None,
    };
    let len = u32::try_from(HEADER + body_len).ok()?;
    Some((frame, len, u32::try_from(value_at).ok()?))
}

/// What reading a segment found besides its frames.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// Byte ranges skipped between good frames.
    pub skipped: Vec<Range<usize>>,
    /// Bytes after the last good frame that are not a frame.
    pub tail: Option<Range<usize>>,
}

/// Calls `each(offset, frame, len, value_at)` for every good frame of `buf` in order, and
/// says what it had to skip.
pub fn scan<'a>(buf: &'a [u8], mut each: impl FnMut(u64, Frame<'a>, u32, u32)) -> Damage {
    let mut damage = Damage::default();
    let mut bad: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        match decode(&buf[pos..]) {
            Some((frame, len, value_at)) => {
                if let Some(start) = bad.take() {
                    damage.skipped.push(start..pos);
                }
                each(pos as u64, frame, len, value_at);
                pos += len as usize;
            }
            None => {
                bad.get_or_insert(pos);
                pos = buf[pos + 1..]
                    .windows(2)
                    .position(|w| w == MAGIC)
                    .map_or(buf.len(), |i| pos + 1 + i);
            }
        }
    }
    damage.tail = bad.map(|start| start..buf.len());
    damage
}

/// The segment files in `dir`, by number.
pub fn segments(dir: &Path) -> io::Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(n) = u64::from_str_radix(stem, 16) {
            out.insert(n, entry.path());
        }
    }
    Ok(out)
}

pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.seg"))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The writing end of the log (the writer thread's).
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    head: u64,
    head_file: Arc<File>,
    /// Bytes of the head on disk; `buf` goes after them.
    head_len: u64,
    /// Frames not yet written to the head.
    buf: Vec<u8>,
    /// Bytes on disk of every segment but the head.
    sealed: BTreeMap<u64, u64>,
    /// Earlier heads written since the last sync.
    unsynced: Vec<Arc<File>>,
    /// Segments made since [`Log::take_new`] was last called.
    new: Vec<(u64, Arc<File>)>,
    dir_dirty: bool,
    seq_limit: u64,
}

impl Log {
    /// Starts a new head numbered `head` after the `sealed` segments (numbers and bytes),
    /// beginning with `seq_limit`. Nothing is durable before [`Log::commit`] with `sync`.
    pub fn start(
        dir: &Path,
        segment_bytes: u64,
        sealed: BTreeMap<u64, u64>,
        head: u64,
        seq_limit: u64,
    ) -> io::Result<Log> {
        let head_file = create_segment(dir, head)?;
        let mut log = Log {
            dir: dir.to_owned(),
            segment_bytes,
            head,
            head_file: head_file.clone(),
            head_len: 0,
            buf: Vec::new(),
            sealed,
            unsynced: Vec::new(),
            new: vec![(head, head_file)],
            dir_dirty: true,
            seq_limit,
        };
        log.push(&Frame::SeqLimit(seq_limit))?;
        Ok(log)
    }

    /// Adds `frame` to the head (made a new head first if it would not fit); written by the
    /// next [`Log::commit`].
    pub fn push(&mut self, frame: &Frame) -> io::Result<Loc> {
        if let Frame::SeqLimit(limit) = frame {
            self.seq_limit = self.seq_limit.max(*limit);
        }
        let fill = self.head_len + self.buf.len() as u64;
        // A head holding only its sequence limit takes any frame, however large.
        if fill > HEADER as u64 + 9 && fill + frame_len_hint(frame) > self.segment_bytes {
            self.roll()?;
        }
        let offset = self.head_len + self.buf.len() as u64;
        let (len, value_at) = encode(frame, &mut self.buf);
        Ok(Loc {
            segment: self.head,
            offset,
            len,
            value_at,
        })
    }

    /// Seals the head and starts the next one.
    pub fn roll(&mut self) -> io::Result<()> {
        self.write_buf()?;
        let next = self.head + 1;
        let file = create_segment(&self.dir, next)?;
        self.sealed.insert(self.head, self.head_len);
        self.unsynced
            .push(std::mem::replace(&mut self.head_file, file.clone()));
        self.new.push((next, file));
        self.head = next;
        self.head_len = 0;
        self.dir_dirty = true;
        self.push(&Frame::SeqLimit(self.seq_limit)).map(|_| ())
    }

    fn write_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.head_file.write_all_at(&self.buf, self.head_len)?;
            self.head_len += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes what was pushed; with `sync`, makes everything written so far durable.
    /// After an error, what was pushed since the last commit is dropped (it may be partly
    /// on disk, where the next write goes over it or a replay reads it as never confirmed).
    pub fn commit(&mut self, sync: bool) -> io::Result<()> {
        if let Err(e) = self.write_buf() {
            self.buf.clear();
            return Err(e);
        }
        if sync {
            for f in &self.unsynced {
                f.sync_data()?;
            }
            self.unsynced.clear();
            self.head_file.sync_data()?;
            if self.dir_dirty {
                sync_dir(&self.dir)?;
                self.dir_dirty = false;
            }
        }
        Ok(())
    }

    /// Drops what was pushed since the last commit (after a failed push).
    pub fn discard(&mut self) {
        self.buf.clear();
    }

    /// Segments made since the last call, for the readers.
    pub fn take_new(&mut self) -> Vec<(u64, Arc<File>)> {
        std::mem::take(&mut self.new)
    }

    /// Bytes of every segment, the head's unwritten frames included.
    pub fn disk_bytes(&self) -> u64 {
        self.sealed.values().sum::<u64>() + self.head_len + self.buf.len() as u64
    }

    /// The oldest segment other than the head.
    pub fn oldest_sealed(&self) -> Option<u64> {
        self.sealed.keys().next().copied()
    }

    pub fn read_segment(&self, n: u64) -> io::Result<Vec<u8>> {
        fs::read(segment_path(&self.dir, n))
    }

    /// Deletes a sealed segment (after its live frames were written again and synced).
    pub fn drop_segment(&mut self, n: u64) -> io::Result<()> {
        debug_assert_ne!(n, self.head);
        fs::remove_file(segment_path(&self.dir, n))?;
        self.sealed.remove(&n);
        sync_dir(&self.dir)
    }

    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }
}

fn frame_len_hint(frame: &Frame) -> u64 {
    let value = match frame {
        Frame::Record { value, .. } | Frame::Rejected { value, .. } => value.len(),
        _ => 0,
    };
    (HEADER + 2 + 8 + KEY_LEN + value) as u64
}

fn create_segment(dir: &Path, n: u64) -> io::Result<Arc<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(segment_path(dir, n))?;
    Ok(Arc::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Priority;

    fn key(seq: u64) -> Key {
        Key {
            priority: Priority::Vital,
            seq,
        }
    }

    fn frames(buf: &[u8]) -> (Vec<Frame<'_>>, Damage) {
        let mut out = Vec::new();
        let damage = scan(buf, |_, f, _, _| out.push(f));
        (out, damage)
    }

    #[test]
    fn every_frame_reads_back_as_written() {
        let all = [
            Frame::SeqLimit(4096),
            Frame::Record {
                key: key(1),
                held: true,
                value: b"sealed",
            },
            Frame::Delete(key(1)),
            Frame::Rejected {
                number: 7,
                key: key(2),
                value: b"refused",
            },
            Frame::Unreject(7),
        ];
        let mut buf = Vec::new();
        let mut values = Vec::new();
        for f in &all {
            let start = buf.len();
            let (len, value_at) = encode(f, &mut buf);
            assert_eq!(buf.len() - start, len as usize);
            if value_at > 0 {
                values.push(buf[start + value_at as usize..].to_vec());
            }
        }
        let (read, damage) = frames(&buf);
        assert_eq!(read, all);
        assert_eq!(damage, Damage::default());
        assert_eq!(values, [b"sealed".to_vec(), b"refused".to_vec()]);
    }

    #[test]
    fn damage_is_skipped_to_the_next_good_frame_and_a_cut_tail_reported() {
        let mut buf = Vec::new();
        for n in 0..3 {
            encode(
                &Frame::Record {
                    key: key(n),
                    held: false,
                    value: &[n as u8; 40],
                },
                &mut buf,
            );
        }
        let second = HEADER + 2 + KEY_LEN + 40;
        buf[second + 20] ^= 0x01;
        let whole = buf.len();
        encode(&Frame::Delete(key(0)), &mut buf);
        buf.truncate(buf.len() - 3);
        let (read, damage) = frames(&buf);
        let seqs: Vec<u64> = read
            .iter()
            .map(|f| match f {
                Frame::Record { key, .. } => key.seq,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(seqs, [0, 2]);
        assert_eq!(damage.skipped, vec![second..2 * second]);
        assert_eq!(damage.tail, Some(whole..buf.len()));
    }

    #[test]
    fn a_log_rolls_segments_each_starting_with_the_sequence_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::start(dir.path(), 256, BTreeMap::new(), 0, 4096).unwrap();
        let mut locs = Vec::new();
        for n in 0..10 {
            let value = [n as u8; 60];
            locs.push(
                log.push(&Frame::Record {
                    key: key(n),
                    held: false,
                    value: &value,
                })
                .unwrap(),
            );
        }
        log.commit(true).unwrap();
        assert!(log.segment_count() > 3);
        assert_eq!(log.take_new().len(), log.segment_count());
        for (n, loc) in locs.iter().enumerate() {
            let bytes = fs::read(segment_path(dir.path(), loc.segment)).unwrap();
            let (at, len) = loc.value();
            assert_eq!(&bytes[at as usize..at as usize + len], &[n as u8; 60]);
            let (first, _) = frames(&bytes);
            assert_eq!(first[0], Frame::SeqLimit(4096));
        }
        let total: u64 = segments(dir.path())
            .unwrap()
            .values()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(total, log.disk_bytes());
    }
}
