//! The call journal: what makes a call durable before its row is in SQLite.
//!
//! A call's pending row, its settlement and a refusal are each appended to
//! the journal as one line of JSON, in one `pwrite` after the previous line
//! (the files are preallocated, sparse, so a line does not change a file's
//! size), before the caller goes on; the writer thread then commits them to SQLite in batches, off the
//! request's path. A line in the page cache survives the process dying
//! (`kill -9`), as a SQLite commit with `synchronous = NORMAL` does, for the
//! cost of one system call instead of a transaction (pages, checksums, file
//! locks). The next owner of the ledger replays what the journal holds; each
//! record applies at most once (rows carry their id, a settlement applies to
//! a pending row only), so records already committed change nothing.
//!
//! Two files take turns: once the active one passes [`ROTATE_AT`] bytes,
//! appends move to the other, and the full one is emptied as soon as the
//! writer has committed its last record. A third file, `-calls.lock`, is held
//! locked by the process that owns the ledger for as long as it has it open.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

use crate::day::Day;
use crate::store::{Admitted, Settled};

/// Bytes after which appends move to the other file.
pub(super) const ROTATE_AT: u64 = 4 << 20;

/// Each file's length, set when it is emptied (a sparse file: nothing is
/// written to disk until a record is). Records are written at their offset
/// inside it rather than appended, so a record does not change the file's
/// size (on ext4 a size change is a metadata update, on the call's path).
/// The bytes after the last record read as zeros.
const PREALLOCATED: u64 = ROTATE_AT + (1 << 20);

/// Empty a journal file, keeping its preallocated length.
pub(super) fn empty(file: &File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.set_len(PREALLOCATED)
}

/// A record to append.
pub(super) enum Entry<'a> {
    Admit(i64, &'a Admitted),
    Refuse(i64, &'a Admitted, u16),
    Settle(i64, &'a Settled),
}

/// A record read back.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Replayed {
    Admit(i64, Admitted),
    Refuse(i64, Admitted, u16),
    Settle(i64, Settled),
}

/// The journal of the ledger at some path: its two files.
pub(super) struct Journal {
    files: [File; 2],
    /// The file appends go to.
    active: usize,
    /// Bytes appended to each file since it was last emptied.
    size: [u64; 2],
    /// The last sequence number appended to each file.
    last: [u64; 2],
    /// The inactive file holds records not yet committed.
    draining: bool,
    buf: Vec<u8>,
}

fn file_path(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The journal's files next to the ledger at `db`.
pub(super) fn paths(db: &Path) -> [PathBuf; 2] {
    [file_path(db, "-calls.0"), file_path(db, "-calls.1")]
}

/// Take the ledger's owner lock, if no other process holds it. `None`: a
/// live process owns the ledger.
pub(super) fn lock(db: &Path) -> std::io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(file_path(db, "-calls.lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// A record as serde would write it: the reference the hand-written
/// [`line`] is tested against.
#[cfg(test)]
#[derive(Serialize)]
struct AdmittedOut<'a> {
    started_ms: i64,
    day: i64,
    org: &'a str,
    project: &'a str,
    key_id: &'a str,
    endpoint: &'a str,
    requested_model: &'a str,
    served_model: &'a str,
    group: Option<&'a str>,
    decision: &'a str,
    reserved: u64,
    free_lane: bool,
    streamed: bool,
    shared: bool,
}

#[cfg(test)]
#[derive(Serialize)]
struct Out<'a> {
    seq: u64,
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    admitted: Option<AdmittedOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settled: Option<&'a Settled>,
}

#[derive(Deserialize)]
struct AdmittedIn {
    started_ms: i64,
    day: i64,
    org: String,
    project: String,
    key_id: String,
    endpoint: String,
    requested_model: String,
    served_model: String,
    group: Option<String>,
    decision: String,
    reserved: u64,
    free_lane: bool,
    streamed: bool,
    shared: bool,
}

#[derive(Deserialize)]
struct In {
    seq: u64,
    id: i64,
    admitted: Option<AdmittedIn>,
    refused: Option<u16>,
    settled: Option<Settled>,
}

/// The ledger's columns hold these as text; the row keeps `&'static str`.
fn intern(s: String, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .copied()
        .find(|k| *k == s)
        .unwrap_or_else(|| Box::leak(s.into_boxed_str()))
}

const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
];
const DECISIONS: &[&str] = &["free", "billed", "clamped", "downgraded", "refused"];

impl AdmittedIn {
    fn into_admitted(self) -> Admitted {
        Admitted {
            started_ms: self.started_ms,
            day: Day(self.day),
            org: self.org.into(),
            project: self.project.into(),
            key_id: self.key_id.into(),
            endpoint: intern(self.endpoint, ENDPOINTS),
            requested_model: self.requested_model.into(),
            served_model: self.served_model.into(),
            group: self.group.map(Into::into),
            decision: intern(self.decision, DECISIONS),
            reserved: self.reserved,
            free_lane: self.free_lane,
            streamed: self.streamed,
            shared: self.shared,
        }
    }
}

#[cfg(test)]
fn admitted_out(a: &Admitted) -> AdmittedOut<'_> {
    AdmittedOut {
        started_ms: a.started_ms,
        day: a.day.0,
        org: &a.org,
        project: &a.project,
        key_id: &a.key_id,
        endpoint: a.endpoint,
        requested_model: &a.requested_model,
        served_model: &a.served_model,
        group: a.group.as_deref(),
        decision: a.decision,
        reserved: a.reserved,
        free_lane: a.free_lane,
        streamed: a.streamed,
        shared: a.shared,
    }
}

/// Every record the journal of `db` holds, in the order they were appended,
/// and how many lines could not be read (a line cut short by a crash in the
/// middle of its `write`, which the caller never saw succeed).
pub(super) fn read(db: &Path) -> std::io::Result<(Vec<Replayed>, usize)> {
    let mut records = Vec::new();
    let mut unreadable = 0;
    for path in paths(db) {
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // The preallocated tail (and only it) is zeros.
        let end = text.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        for line in text[..end].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<In>(line) {
                Ok(r) => records.push(r),
                Err(_) => unreadable += 1,
            }
        }
    }
    records.sort_by_key(|r| r.seq);
    let replayed = records
        .into_iter()
        .filter_map(|r| match (r.admitted, r.refused, r.settled) {
            (Some(a), None, None) => Some(Replayed::Admit(r.id, a.into_admitted())),
            (Some(a), Some(status), None) => {
                Some(Replayed::Refuse(r.id, a.into_admitted(), status))
            }
            (None, None, Some(s)) => Some(Replayed::Settle(r.id, s)),
            _ => {
                unreadable += 1;
                None
            }
        })
        .collect();
    Ok((replayed, unreadable))
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, at)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, buf: &[u8], at: u64) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    file.seek(std::io::SeekFrom::Start(at))?;
    file.write_all(buf)
}

impl Journal {
    /// Open the journal of `db` for appending, emptied: the caller has
    /// replayed what it held.
    pub(super) fn open_empty(db: &Path) -> std::io::Result<Self> {
        let open = |path: &Path| {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)?;
            empty(&file)?;
            Ok::<_, std::io::Error>(file)
        };
        let [a, b] = paths(db);
        Ok(Journal {
            files: [open(&a)?, open(&b)?],
            active: 0,
            size: [0; 2],
            last: [0; 2],
            draining: false,
            buf: Vec::with_capacity(512),
        })
    }

    /// Append one record, in one `write`.
    pub(super) fn append(&mut self, seq: u64, entry: Entry<'_>) -> std::io::Result<()> {
        // Each line starts with its line feed: whatever a failed write left
        // before it is a line of its own, read back as unreadable, never as
        // a call.
        self.buf.clear();
        self.buf.push(b'\n');
        line(&mut self.buf, seq, &entry);
        let at = self.size[self.active];
        if let Err(e) = write_at(&self.files[self.active], &self.buf, at) {
            self.size[self.active] += self.buf.len() as u64;
            return Err(e);
        }
        self.size[self.active] += self.buf.len() as u64;
        self.last[self.active] = seq;
        Ok(())
    }

    /// After the writer has committed every record up to `committed`: switch
    /// files when the active one is full and the other is empty. Returns the
    /// file to empty now (every record in it is committed), if any.
    pub(super) fn after_commit(&mut self, committed: u64) -> Option<File> {
        let other = 1 - self.active;
        if self.draining && self.last[other] <= committed {
            self.draining = false;
            self.size[other] = 0;
            return self.files[other].try_clone().ok();
        }
        if !self.draining && self.size[self.active] >= ROTATE_AT {
            self.active = other;
            self.draining = true;
        }
        None
    }

    /// Empty both files: every record is committed (a clean shutdown).
    pub(super) fn clear(&mut self) {
        for (file, size) in self.files.iter().zip(self.size.iter_mut()) {
            if empty(file).is_ok() {
                *size = 0;
            }
        }
        self.draining = false;
    }
}

/// Write one record as a JSON object: the bytes serde_json writes for
/// `Out` (the test `hand_written_lines_are_serdes_lines` holds them equal),
/// in a fraction of its instructions (a call writes two lines on its path).
fn line(buf: &mut Vec<u8>, seq: u64, entry: &Entry<'_>) {
    let mut w = Line(buf);
    w.raw(b"{\"seq\":");
    w.u64(seq);
    match entry {
        Entry::Admit(id, a) => {
            w.raw(b",\"id\":");
            w.i64(*id);
            w.admitted(a);
        }
        Entry::Refuse(id, a, status) => {
            w.raw(b",\"id\":");
            w.i64(*id);
            w.admitted(a);
            w.raw(b",\"refused\":");
            w.u64(u64::from(*status));
        }
        Entry::Settle(id, s) => {
            w.raw(b",\"id\":");
            w.i64(*id);
            w.raw(b",\"settled\":");
            w.raw(b"{\"served_model\":");
            w.opt_str(s.served_model.as_deref());
            for (name, n) in [
                (&b",\"input\":"[..], s.input),
                (b",\"cached\":", s.cached),
                (b",\"output\":", s.output),
                (b",\"reasoning\":", s.reasoning),
            ] {
                w.raw(name);
                w.u64(n);
            }
            w.raw(b",\"free\":");
            w.bool(s.free);
            w.raw(b",\"cost_pico\":");
            w.u64(s.cost_pico);
            w.raw(b",\"status\":");
            w.u64(u64::from(s.status));
            w.raw(b",\"latency_ms\":");
            w.u64(s.latency_ms);
            w.raw(b",\"estimated\":");
            w.bool(s.estimated);
            w.raw(b"}");
        }
    }
    w.raw(b"}");
}

struct Line<'b>(&'b mut Vec<u8>);

impl Line<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn u64(&mut self, n: u64) {
        self.raw(itoa::Buffer::new().format(n).as_bytes());
    }

    fn i64(&mut self, n: i64) {
        self.raw(itoa::Buffer::new().format(n).as_bytes());
    }

    fn bool(&mut self, b: bool) {
        self.raw(if b { b"true" } else { b"false" });
    }

    /// A string as JSON: as is when nothing in it needs an escape (the
    /// usual names and models), else through serde_json.
    fn str(&mut self, s: &str) {
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.raw(b"\"");
            self.raw(s.as_bytes());
            self.raw(b"\"");
        } else {
            // Writing to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *self.0, s);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw(b"null"),
        }
    }

    fn admitted(&mut self, a: &Admitted) {
        self.raw(b",\"admitted\":");
        self.raw(b"{\"started_ms\":");
        self.i64(a.started_ms);
        self.raw(b",\"day\":");
        self.i64(a.day.0);
        for (name, value) in [
            (&b",\"org\":"[..], &*a.org),
            (b",\"project\":", &a.project),
            (b",\"key_id\":", &a.key_id),
            (b",\"endpoint\":", a.endpoint),
            (b",\"requested_model\":", &a.requested_model),
            (b",\"served_model\":", &a.served_model),
        ] {
            self.raw(name);
            self.str(value);
        }
        self.raw(b",\"group\":");
        self.opt_str(a.group.as_deref());
        self.raw(b",\"decision\":");
        self.str(a.decision);
        self.raw(b",\"reserved\":");
        self.u64(a.reserved);
        self.raw(b",\"free_lane\":");
        self.bool(a.free_lane);
        self.raw(b",\"streamed\":");
        self.bool(a.streamed);
        self.raw(b",\"shared\":");
        self.bool(a.shared);
        self.raw(b"}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted() -> Admitted {
        Admitted {
            started_ms: 7,
            day: Day(20_000),
            org: "acme \"quoted\"\n".into(),
            project: "web".into(),
            key_id: "k1".into(),
            endpoint: "/v1/responses",
            requested_model: "gpt-4o".into(),
            served_model: "gpt-4o-mini".into(),
            group: None,
            decision: "downgraded",
            reserved: 123,
            free_lane: true,
            streamed: true,
            shared: false,
        }
    }

    #[test]
    fn hand_written_lines_are_serdes_lines() {
        let mut other = admitted();
        other.org = "plain".into();
        other.project = "café ünïcode, no escapes".into();
        other.group = Some("mini \\ \u{1} é".into());
        other.started_ms = -5;
        other.day = Day(-1);
        other.reserved = u64::MAX;
        let settled = [
            Settled::default(),
            Settled {
                cost_pico: 1_234_567_890_123,
                ..settled()
            },
            Settled {
                served_model: Some("tab\there \"q\"".into()),
                ..Settled::default()
            },
        ];
        let mut cases = Vec::new();
        for a in [admitted(), other] {
            cases.push((
                Entry::Admit(i64::MAX, &a).hand_line(),
                Out {
                    seq: 1,
                    id: i64::MAX,
                    admitted: Some(admitted_out(&a)),
                    refused: None,
                    settled: None,
                }
                .to_json(),
            ));
            cases.push((
                Entry::Refuse(-3, &a, 429).hand_line(),
                Out {
                    seq: 1,
                    id: -3,
                    admitted: Some(admitted_out(&a)),
                    refused: Some(429),
                    settled: None,
                }
                .to_json(),
            ));
        }
        for s in &settled {
            cases.push((
                Entry::Settle(0, s).hand_line(),
                Out {
                    seq: 1,
                    id: 0,
                    admitted: None,
                    refused: None,
                    settled: Some(s),
                }
                .to_json(),
            ));
        }
        for (hand, serde) in cases {
            assert_eq!(
                String::from_utf8_lossy(&hand),
                String::from_utf8_lossy(&serde)
            );
        }
    }

    impl Entry<'_> {
        /// This entry's line, as the journal writes it (without its line feed).
        fn hand_line(&self) -> Vec<u8> {
            let mut buf = Vec::new();
            line(&mut buf, 1, self);
            buf
        }
    }

    impl Out<'_> {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    fn settled() -> Settled {
        Settled {
            served_model: Some("gpt-4o-mini-2024-07-18".into()),
            input: 10,
            cached: 2,
            output: 5,
            reasoning: 1,
            free: true,
            cost_pico: 0,
            status: 200,
            latency_ms: 9,
            estimated: true,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tw-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    #[test]
    fn records_read_back_in_order_and_a_torn_line_is_skipped_alone() {
        let dir = dir("roundtrip");
        let db = dir.join("ledger.db");
        let settled = settled();
        let mut j = Journal::open_empty(&db).unwrap_or_else(|e| panic!("{e}"));
        j.append(1, Entry::Admit(41, &admitted()))
            .unwrap_or_else(|e| panic!("{e}"));
        j.append(2, Entry::Refuse(42, &admitted(), 429))
            .unwrap_or_else(|e| panic!("{e}"));
        // Later records may sit in the other file.
        j.active = 1;
        j.append(3, Entry::Settle(41, &settled))
            .unwrap_or_else(|e| panic!("{e}"));
        // A write that failed part-way (the disk filled, say): its first
        // bytes, then zeros up to where the next record goes.
        let at = j.size[1];
        write_at(&j.files[1], b"\n{\"seq\":4,\"id\":43,\"admi", at)
            .unwrap_or_else(|e| panic!("{e}"));
        j.size[1] += 300;
        j.append(5, Entry::Admit(44, &admitted()))
            .unwrap_or_else(|e| panic!("{e}"));
        let (records, unreadable) = read(&db).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            records,
            vec![
                Replayed::Admit(41, admitted()),
                Replayed::Refuse(42, admitted(), 429),
                Replayed::Settle(41, settled),
                Replayed::Admit(44, admitted()),
            ]
        );
        assert_eq!(unreadable, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_file_is_emptied_once_its_records_are_committed() {
        let dir = dir("rotate");
        let db = dir.join("ledger.db");
        let mut j = Journal::open_empty(&db).unwrap_or_else(|e| panic!("{e}"));
        let mut seq = 0;
        while j.size[0] < ROTATE_AT {
            seq += 1;
            j.append(seq, Entry::Admit(seq as i64, &admitted()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(j.after_commit(seq - 1).is_none());
        // Appends now go to the second file; the first still holds records
        // not committed.
        assert_eq!(j.active, 1);
        j.append(seq + 1, Entry::Admit(0, &admitted()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(j.after_commit(seq - 1).is_none());
        let full = j.after_commit(seq).unwrap_or_else(|| panic!("not emptied"));
        empty(&full).unwrap_or_else(|e| panic!("{e}"));
        let (records, _) = read(&db).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(records, vec![Replayed::Admit(0, admitted())]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
