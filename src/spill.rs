//! Where a channel's backlog goes once it passes `max_pending` in memory: an unnamed file in
//! the temporary directory (the unit's private /tmp), as nginx buffers a slow client's
//! response. russh re-opens a channel's SSH window as data arrives, not as the target takes
//! it, so a slow target's backlog cannot be pushed back to the server per channel; holding it
//! here, instead of pausing the whole session, keeps every other channel at full speed.
//!
//! The file is created with `O_TMPFILE`: it never has a name, so nothing can open it and
//! nothing is left behind, even if the agent is killed; its blocks are freed when the channel
//! ends. Writes and reads are plain `pwrite`/`pread` on the runtime thread: they go to and
//! come from the page cache, in the chunk sizes SSH delivers.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::constants::SPILL_SHRINK_AT;

/// The writing end, held by the session side of a channel.
pub struct Spill {
    file: Arc<File>,
    /// Where the next chunk goes. Chunks are read in the order written; once every chunk has
    /// been read, writing starts over at the beginning.
    end: u64,
}

/// One chunk in the file, queued in the channel's inbox in arrival order.
pub struct Chunk {
    file: Arc<File>,
    at: u64,
    len: usize,
}

impl Spill {
    pub fn create(dir: &Path) -> io::Result<Spill> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)?;
        Ok(Spill {
            file: Arc::new(file),
            end: 0,
        })
    }

    /// Append `data`. `empty` says every chunk written so far has been read: the file then
    /// starts over (and gives its blocks back if it had grown large).
    pub fn write(&mut self, data: &[u8], empty: bool) -> io::Result<Chunk> {
        if empty && self.end > 0 {
            if self.end >= SPILL_SHRINK_AT {
                self.file.set_len(0)?;
            }
            self.end = 0;
        }
        self.file.write_all_at(data, self.end)?;
        let chunk = Chunk {
            file: self.file.clone(),
            at: self.end,
            len: data.len(),
        };
        self.end += data.len() as u64;
        Ok(chunk)
    }
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn read(&self) -> io::Result<Bytes> {
        let mut buf = BytesMut::zeroed(self.len);
        self.file.read_exact_at(&mut buf, self.at)?;
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_in_order_and_the_file_starts_over_when_read() {
        let dir = std::env::temp_dir();
        let mut spill = Spill::create(&dir).unwrap();
        let a = spill.write(b"first", true).unwrap();
        let b = spill.write(b"second", false).unwrap();
        assert_eq!(&a.read().unwrap()[..], b"first");
        assert_eq!(&b.read().unwrap()[..], b"second");
        let c = spill.write(b"third", true).unwrap();
        assert_eq!(c.at, 0, "a fully read file is reused from the start");
        assert_eq!(&c.read().unwrap()[..], b"third");
    }
}
