//! Following nginx's access log without losing or repeating a line.
//!
//! The file lives on an emptyDir that nginx and the sidecar share; it
//! survives a restart of either container. The sidecar owns it: nothing
//! rotates it (no logrotate, no USR1), so nginx appends to the same file
//! for the pod's life. The sidecar reads it from a persisted offset (see
//! `state`), which moves only once the records before it are sealed in the
//! destination; a killed sidecar starts again from there, rebuilds the same
//! records and seals them again (the same objects, byte for byte).
//!
//! Disk use stays bounded without moving the file under nginx: the sealed
//! part is deallocated in place ([`release`], `fallocate(PUNCH_HOLE)`),
//! which keeps the size and every offset, so nginx's `O_APPEND` writes and
//! the sidecar's offset stay valid. The file's apparent size still grows;
//! on ext4 (16 TiB per file) that is months at thousands of requests per
//! second, and a new pod starts a new file.
//!
//! If the file is replaced or truncated anyway, the sidecar reads the new
//! file from its start and records in the next checkpoint that it cannot
//! vouch for what happened in between (`Checkpoint::source_reset`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Identity of a file: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(metadata: &std::fs::Metadata) -> Self {
        FileId { dev: metadata.dev(), ino: metadata.ino() }
    }
}

/// Splits bytes as they arrive into complete lines, keeping a partial last
/// line until its newline comes. Pure.
#[derive(Debug, Clone, Default)]
pub struct LineBuffer {
    partial: Vec<u8>,
    /// File offset just past the last byte pushed.
    offset: u64,
}

impl LineBuffer {
    /// Starts at `offset` of the file (a line boundary).
    pub fn at(offset: u64) -> Self {
        LineBuffer { partial: Vec::new(), offset }
    }

    /// Offset of the end of the last complete line returned: where a
    /// restart resumes.
    pub fn line_end(&self) -> u64 {
        self.offset - self.partial.len() as u64
    }

    /// Appends `bytes` and returns each complete line (without `\n`) with
    /// the offset just past its newline.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(Vec<u8>, u64)> {
        let mut lines = Vec::new();
        let start = self.offset;
        self.offset += bytes.len() as u64;
        let mut rest = bytes;
        let mut consumed = 0u64;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..i]);
            consumed += i as u64 + 1;
            lines.push((line, start + consumed));
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        lines
    }
}

/// What reading found about the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// The file at the path is no longer the one being read.
    Replaced,
    /// The file is shorter than what was already read.
    Truncated { size: u64, offset: u64 },
}

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reset::Replaced => write!(f, "the access log was replaced"),
            Reset::Truncated { size, offset } => {
                write!(f, "the access log was truncated to {size} bytes below the read offset {offset}")
            }
        }
    }
}

/// Reads an append-only file from an offset, line by line.
pub struct Follower {
    path: PathBuf,
    file: File,
    id: FileId,
    buffer: LineBuffer,
    chunk: Vec<u8>,
}

impl Follower {
    /// Opens `path` (which must exist) at `offset`. When `expected` names
    /// another file, or the file is shorter than `offset`, starts at 0 and
    /// says why.
    pub fn open(path: &Path, offset: u64, expected: Option<FileId>) -> std::io::Result<(Self, Option<Reset>)> {
        // Writable only to release sealed blocks; read-only will do otherwise.
        let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => File::open(path)?,
            opened => opened?,
        };
        let metadata = file.metadata()?;
        let id = FileId::of(&metadata);
        let reset = match expected {
            Some(expected) if expected != id && offset > 0 => Some(Reset::Replaced),
            _ if metadata.len() < offset => Some(Reset::Truncated { size: metadata.len(), offset }),
            _ => None,
        };
        let offset = if reset.is_some() { 0 } else { offset };
        file.seek(SeekFrom::Start(offset))?;
        let follower =
            Follower { path: path.to_owned(), file, id, buffer: LineBuffer::at(offset), chunk: vec![0; 1 << 20] };
        Ok((follower, reset))
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    /// End of the last complete line read.
    pub fn line_end(&self) -> u64 {
        self.buffer.line_end()
    }

    /// Reads what has been appended, up to about a megabyte, and returns
    /// its complete lines; empty at the end of the file.
    pub fn read_lines(&mut self) -> std::io::Result<Vec<(Vec<u8>, u64)>> {
        let n = self.file.read(&mut self.chunk)?;
        Ok(self.buffer.push(&self.chunk[..n]))
    }

    /// At the end of the file: whether it was replaced or truncated since.
    pub fn check(&self) -> std::io::Result<Option<Reset>> {
        let size = self.file.metadata()?.len();
        if size < self.buffer.offset {
            return Ok(Some(Reset::Truncated { size, offset: self.buffer.offset }));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if FileId::of(&m) != self.id => Ok(Some(Reset::Replaced)),
            _ => Ok(None),
        }
    }

    /// Frees the disk blocks of the file's first `upto` bytes (sealed);
    /// see [`release`].
    pub fn release(&self, upto: u64) -> std::io::Result<()> {
        release(&self.file, upto)
    }
}

/// Deallocates whole 4 KiB blocks of `[0, upto)` without changing the
/// file's size or offsets (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`);
/// they read as zeros afterwards. A filesystem without hole punching
/// answers `EOPNOTSUPP`: the file then keeps growing on disk.
pub fn release(file: &File, upto: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let length = upto & !4095;
    if length == 0 {
        return Ok(());
    }
    let length = libc::off_t::try_from(length).map_err(|_| std::io::Error::other("offset beyond off_t"))?;
    // SAFETY: fallocate only reads its integer arguments; the descriptor
    // belongs to `file`, open for writing, for the whole call.
    let done =
        unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, length) };
    if done == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let mut buffer = LineBuffer::at(100);
        assert_eq!(buffer.push(b"ab"), vec![]);
        assert_eq!(buffer.line_end(), 100);
        assert_eq!(buffer.push(b"c\nde\n\nf"), vec![(b"abc".to_vec(), 104), (b"de".to_vec(), 107), (vec![], 108)]);
        assert_eq!(buffer.line_end(), 108);
        assert_eq!(buffer.push(b"g\n"), vec![(b"fg".to_vec(), 111)]);
        assert_eq!(buffer.line_end(), 111);
    }

    #[test]
    fn resumes_at_an_offset_and_notices_replacement_and_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        std::fs::write(&path, b"one\ntwo\nthr").expect("write");
        let (mut follower, reset) = Follower::open(&path, 4, None).expect("opens");
        assert_eq!(reset, None);
        assert_eq!(follower.read_lines().expect("reads"), vec![(b"two".to_vec(), 8)]);
        std::fs::OpenOptions::new().append(true).open(&path).and_then(|mut f| f.write_all(b"ee\n")).expect("append");
        assert_eq!(follower.read_lines().expect("reads"), vec![(b"three".to_vec(), 14)]);
        assert_eq!(follower.check().expect("checks"), None);
        let id = follower.id();

        let (_, reset) = Follower::open(&path, 99, Some(id)).expect("opens");
        assert_eq!(reset, Some(Reset::Truncated { size: 14, offset: 99 }));
        std::fs::rename(&path, dir.path().join("old.log")).expect("rename");
        std::fs::write(&path, b"new\n").expect("write");
        assert_eq!(follower.check().expect("checks"), Some(Reset::Replaced));
        let (mut follower, reset) = Follower::open(&path, 14, Some(id)).expect("opens");
        assert_eq!(reset, Some(Reset::Replaced));
        assert_eq!(follower.read_lines().expect("reads"), vec![(b"new".to_vec(), 4)]);
    }

    #[test]
    fn released_blocks_keep_size_and_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let line = [b'x'; 99];
        let mut content = Vec::new();
        for _ in 0..100 {
            content.extend_from_slice(&line);
            content.push(b'\n');
        }
        std::fs::write(&path, &content).expect("write");
        let (follower, _) = Follower::open(&path, 0, None).expect("opens");
        match follower.release(8200) {
            Ok(()) => {
                let after = std::fs::read(&path).expect("read");
                assert_eq!(after.len(), content.len());
                assert!(after[..8192].iter().all(|b| *b == 0));
                assert_eq!(after[8192..], content[8192..]);
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
    }
}
