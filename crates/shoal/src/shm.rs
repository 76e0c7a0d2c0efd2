//! Objects read from the node's shared-memory store without copying.
//!
//! A process on the node's host maps a sealed object's file read-only
//! ([`Mapping`]); decoding from the mapping copies only what the value's
//! type owns. [`Buffer`] owns nothing: decoded from a mapping it borrows the
//! mapping (kept alive by the buffer), so `get` of an `ObjectRef<Buffer>`
//! costs no copy of the payload. This module and `codec::block` are the
//! only ones with `unsafe`.

#![allow(unsafe_code)]

use crate::codec::CodecError;
use shoal_net::sync::MutexExt;
use std::cell::RefCell;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Serialize};

/// A sealed object's file, mapped read-only.
pub struct Mapping {
    map: memmap2::Mmap,
    /// Open, with a shared lock, while mapped: the store does not give a
    /// locked file to a new object once this one is freed.
    _file: File,
}

impl Mapping {
    /// Maps the file at `path`, which must hold exactly `size` bytes.
    pub(crate) fn open(path: &Path, size: u64) -> std::io::Result<Arc<Self>> {
        let file = open_locked(path, false)?;
        let len = file.metadata()?.len();
        if len != size || size == 0 {
            return Err(std::io::Error::other(format!(
                "{} has {len} bytes, not {size}",
                path.display()
            )));
        }
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        // SAFETY: the file is a sealed object in the node's store: the node
        // never writes, truncates or reuses it after sealing (it only
        // unlinks it, which leaves this mapping intact), and it was checked
        // above to hold `len` bytes. Another process of the same user could
        // still truncate it (and a read past the new end would fault); the
        // store directory is private to the cluster's user for that reason.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file)? };
        Ok(Arc::new(Self { map, _file: file }))
    }

    fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Opens an object's file in the store and takes a shared lock on it,
/// which tells the store that the file is in use (it then never reuses the
/// file for another object). Fails if the path no longer names the locked
/// file: the object was freed between the open and the lock.
pub(crate) fn open_locked(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    file.try_lock_shared().map_err(std::io::Error::other)?;
    let (locked, named) = (file.metadata()?, std::fs::metadata(path)?);
    if (locked.dev(), locked.ino()) != (named.dev(), named.ino()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} was freed while being opened", path.display()),
        ));
    }
    Ok(file)
}

/// Writable mappings of the store files this process wrote large objects
/// into, kept after sealing: when the store gives a freed file to this
/// process's next object (it keeps freed files for reuse), writing it is a
/// plain `memcpy` into pages already mapped, with no page faults and no
/// `write` system call going page by page. A kept mapping holds no lock,
/// so the store may reuse or remove the file: an entry is used again only
/// when the store hands this process the same file at the same size, and
/// entries whose file was removed are dropped (each put, and by
/// [`WriteMaps::sweep`]) so they do not keep its memory.
#[derive(Default)]
pub(crate) struct WriteMaps {
    kept: std::sync::Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    maps: Vec<WriteMap>,
    /// A task calls [`WriteMaps::sweep`] every second while maps are kept.
    swept: bool,
}

struct WriteMap {
    file: File,
    key: (u64, u64),
    map: memmap2::MmapMut,
}

/// Objects smaller than this are written with `write`: mapping costs more.
pub(crate) const WRITE_MAP_MIN: u64 = 8 << 20;
/// Most mappings kept, and most bytes mapped by them.
const WRITE_MAPS_KEPT: usize = 16;
const WRITE_MAPS_BYTES: u64 = 8 << 30;

impl WriteMaps {
    /// Writes exactly `size` bytes into `file` (an object being written,
    /// opened by [`open_locked`] for writing, holding exactly `size`
    /// bytes) through a mapping, kept afterwards for the next object.
    /// `Ok(true)` when the caller must start the task that calls
    /// [`WriteMaps::sweep`].
    pub(crate) fn write(
        &self,
        file: &File,
        size: u64,
        fill: impl FnOnce(&mut SliceWriter<'_>) -> Result<(), CodecError>,
    ) -> Result<bool, CodecError> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let len = usize::try_from(size).map_err(|e| CodecError::Size(e.to_string()))?;
        if meta.len() != size || len == 0 {
            return Err(CodecError::Size(format!(
                "the object's file has {} bytes, not {size}",
                meta.len()
            )));
        }
        let key = (meta.dev(), meta.ino());
        let reused = {
            let mut kept = self.kept.locked();
            kept.maps.retain(|m| m.key == key || m.file_is_linked());
            let at = kept.maps.iter().position(|m| m.key == key);
            at.map(|i| kept.maps.swap_remove(i))
        };
        let mut entry = match reused {
            Some(entry) if entry.map.len() == len => entry,
            _ => WriteMap {
                file: file.try_clone()?,
                key,
                // SAFETY: the file is an object being written by this
                // process: the store gave it to this process alone, does
                // not truncate it while it is being written, and holds
                // `len` bytes (checked above). Once the object is sealed
                // the mapping is only unmapped, or written again after the
                // store hands the same file of the same size to this
                // process for a new object (checked above, each time).
                map: unsafe {
                    memmap2::MmapOptions::new()
                        .len(len)
                        .populate()
                        .map_mut(file)?
                },
            },
        };
        let mut out = SliceWriter {
            out: &mut entry.map[..],
            at: 0,
        };
        let filled = fill(&mut out).and_then(|()| {
            if out.at == len {
                Ok(())
            } else {
                Err(CodecError::Size(format!(
                    "the value encoded to {} bytes, not {len}",
                    out.at
                )))
            }
        });
        // A new entry's file is a clone of `file`: the same open file
        // description, whose lock would outlive closing `file`. The object
        // is written: release the lock (a kept mapping holds none).
        let _ = entry.file.unlock();
        filled.map(|()| self.keep(entry))
    }

    /// Keeps a mapping (the oldest go past the bounds); true when no task
    /// sweeps yet.
    fn keep(&self, entry: WriteMap) -> bool {
        let mut kept = self.kept.locked();
        kept.maps.push(entry);
        let mut bytes: u64 = kept.maps.iter().map(|m| m.map.len() as u64).sum();
        while kept.maps.len() > WRITE_MAPS_KEPT || bytes > WRITE_MAPS_BYTES {
            bytes -= kept.maps.remove(0).map.len() as u64;
        }
        !std::mem::replace(&mut kept.swept, true)
    }

    /// Drops the mappings of files the store removed. False when none is
    /// left: the sweeping task ends (the next kept mapping starts one).
    pub(crate) fn sweep(&self) -> bool {
        let mut kept = self.kept.locked();
        kept.maps.retain(WriteMap::file_is_linked);
        kept.swept = !kept.maps.is_empty();
        kept.swept
    }

    /// Mappings kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.locked().maps.len()
    }
}

impl WriteMap {
    fn file_is_linked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().is_ok_and(|m| m.nlink() > 0)
    }
}

/// Writes into a slice, failing when it is full.
pub(crate) struct SliceWriter<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl std::io::Write for SliceWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self
            .at
            .checked_add(buf.len())
            .filter(|&end| end <= self.out.len())
            .ok_or_else(|| std::io::Error::other("the value is larger than its object"))?;
        crate::codec::block::copy(&mut self.out[self.at..end], buf);
        self.at = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A call's arguments, as their bytes.
pub type Args = Vec<Blob>;

/// An object's bytes: read into memory, or mapped from the node's store.
#[derive(Clone)]
pub enum Blob {
    /// In this process's memory.
    Owned(Arc<Vec<u8>>),
    /// Mapped from the node's shared-memory store.
    Mapped(Arc<Mapping>),
    /// A frozen [`BufferMut`]: anonymous memory of this process.
    Anon(Arc<BufferMut>),
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Blob::Owned(v) => v,
            Blob::Mapped(m) => m.bytes(),
            Blob::Anon(b) => b,
        }
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob::Owned(Arc::new(v))
    }
}

thread_local! {
    /// The mapping being decoded on this thread, which `Buffer`s borrow.
    static DECODING: RefCell<Option<Arc<Mapping>>> = const { RefCell::new(None) };
}

/// Decodes a value from a blob; [`Buffer`]s in it borrow a mapped blob.
pub(crate) fn decode<T: DeserializeOwned>(blob: &Blob) -> Result<T, crate::codec::CodecError> {
    let Blob::Mapped(mapping) = blob else {
        return crate::codec::decode(blob);
    };
    let previous = DECODING.with(|d| d.replace(Some(Arc::clone(mapping))));
    let decoded = crate::codec::decode(mapping.bytes());
    DECODING.with(|d| *d.borrow_mut() = previous);
    decoded
}

/// A zero-filled buffer to fill in place and then [`freeze`] into a
/// [`Buffer`] without a copy: the way to build a large object. Its memory
/// is anonymous and asks the kernel for huge pages (as numpy does for large
/// arrays), so allocating, filling and putting it cost far fewer page
/// faults than a `Vec` of the same size.
///
/// [`freeze`]: BufferMut::freeze
pub struct BufferMut {
    map: memmap2::MmapMut,
    len: usize,
}

impl BufferMut {
    /// `len` zero bytes; fails only when the memory cannot be had.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapMut::map_anon(len.max(1))?;
        // Advice only: without huge pages the buffer works the same.
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self { map, len })
    }

    /// The bytes, now immutable, as a buffer (no copy).
    pub fn freeze(self) -> Buffer {
        let range = 0..self.len;
        Buffer {
            inner: Blob::Anon(Arc::new(self)),
            range,
        }
    }
}

impl Deref for BufferMut {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl std::ops::DerefMut for BufferMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

impl std::fmt::Debug for BufferMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferMut({} bytes)", self.len)
    }
}

/// Immutable bytes that may borrow an object in the node's shared-memory
/// store: `get` of an `ObjectRef<Buffer>` on the object's host maps it and
/// copies nothing. Cheap to clone; encodes as one binary block.
#[derive(Clone)]
pub struct Buffer {
    inner: Blob,
    range: Range<usize>,
}

impl Buffer {
    /// Bytes of this process's memory as a buffer.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        Self {
            inner: Blob::from(v),
            range,
        }
    }

    /// A buffer of numbers (`f32`, `f64`, `i32`, `i64`, `u32`, `u64`, ...),
    /// their bytes in this machine's order: one block, not one encoding per
    /// element. Read back with [`Buffer::to_vec_of`].
    pub fn from_slice_of<N: Number>(numbers: &[N]) -> Self {
        let mut v = Vec::with_capacity(std::mem::size_of_val(numbers));
        for n in numbers {
            n.append_to(&mut v);
        }
        Self::from_vec(v)
    }

    /// The numbers a [`Buffer::from_slice_of`] buffer holds; `None` if its
    /// length is not a multiple of the number's size.
    pub fn to_vec_of<N: Number>(&self) -> Option<Vec<N>> {
        let size = std::mem::size_of::<N>();
        if !self.len().is_multiple_of(size) {
            return None;
        }
        Some(self.chunks_exact(size).map(N::read_from).collect())
    }

    /// True when the bytes are mapped from the node's store (not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Blob::Mapped(_))
    }
}

impl Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.inner[self.range.clone()]
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Buffer {}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Buffer({} bytes, {how})", self.len())
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(v: Vec<u8>) -> Self {
        Self::from_vec(v)
    }
}

impl Serialize for Buffer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self)
    }
}

impl<'de> Deserialize<'de> for Buffer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(BufferVisitor)
    }
}

struct BufferVisitor;

impl<'de> Visitor<'de> for BufferVisitor {
    type Value = Buffer;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Buffer, E> {
        // Bytes inside the mapping being decoded are borrowed from it.
        let mapped = DECODING.with(|d| {
            let mapping = d.borrow().clone()?;
            let base = mapping.bytes().as_ptr() as usize;
            let start = (v.as_ptr() as usize).checked_sub(base)?;
            let end = start.checked_add(v.len())?;
            (end <= mapping.bytes().len()).then(|| Buffer {
                inner: Blob::Mapped(Arc::clone(&mapping)),
                range: start..end,
            })
        });
        Ok(mapped.unwrap_or_else(|| Buffer::from_vec(v.to_vec())))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Buffer, E> {
        Ok(Buffer::from_vec(v.to_vec()))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Buffer, E> {
        Ok(Buffer::from_vec(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Buffer, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Buffer::from_vec(v))
    }
}

/// A number a [`Buffer`] can hold as a block.
pub trait Number: Copy + Sized {
    /// Appends the number's bytes (this machine's order).
    fn append_to(self, out: &mut Vec<u8>);
    /// Reads a number from exactly its size in bytes.
    fn read_from(bytes: &[u8]) -> Self;
}

macro_rules! numbers {
    ($($t:ty),*) => {$(
        impl Number for $t {
            fn append_to(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_ne_bytes());
            }
            fn read_from(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_ne_bytes(a)
            }
        }
    )*};
}

numbers!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_decoded_from_a_mapping_borrows_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let encoded =
            crate::codec::encode(&(7u32, Buffer::from_vec(payload.clone()))).expect("enc");
        let path = dir.path().join("object");
        std::fs::write(&path, &encoded).expect("written");
        let mapping = Mapping::open(&path, encoded.len() as u64).expect("mapped");
        let (n, buffer): (u32, Buffer) = decode(&Blob::Mapped(mapping)).expect("decodes");
        assert_eq!(n, 7);
        assert!(buffer.is_mapped());
        assert_eq!(&*buffer, payload.as_slice());
        // Decoded from memory, it is a copy.
        let (_, owned): (u32, Buffer) = decode(&Blob::from(encoded)).expect("decodes");
        assert!(!owned.is_mapped());
        assert_eq!(owned, buffer);
    }

    #[test]
    fn a_file_of_the_wrong_size_is_not_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("object");
        std::fs::write(&path, b"abc").expect("written");
        assert!(Mapping::open(&path, 4).is_err());
        assert!(Mapping::open(&path, 3).is_ok());
    }

    #[test]
    fn a_mapped_file_is_locked_and_a_freed_one_is_not_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("object");
        std::fs::write(&path, b"abc").expect("written");
        let mapping = Mapping::open(&path, 3).expect("mapped");
        let other = File::open(&path).expect("opened");
        assert!(other.try_lock().is_err(), "the store sees the file in use");
        drop(mapping);
        assert!(other.try_lock().is_ok(), "unmapped, the lock is gone");
        other.unlock().expect("unlocked");
        // Renamed away (freed) after the open: not used.
        let opened = File::open(&path).expect("opened");
        std::fs::rename(&path, dir.path().join("free-1")).expect("renamed");
        std::fs::write(&path, b"new").expect("a new file of that name");
        drop(opened);
        let again = Mapping::open(&path, 3).expect("the new file maps");
        assert_eq!(again.bytes(), b"new");
    }

    fn object_file(dir: &Path, name: &str, len: u64) -> (std::path::PathBuf, File) {
        let path = dir.join(name);
        File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("file");
        let file = open_locked(&path, true).expect("opened");
        (path, file)
    }

    #[test]
    fn write_maps_reuse_a_file_given_back_and_drop_removed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let maps = WriteMaps::default();
        let (a, file) = object_file(dir.path(), "a", 4096);
        let fill = |byte: u8| {
            move |out: &mut SliceWriter<'_>| {
                std::io::Write::write_all(out, &[byte; 4096]).map_err(CodecError::from)
            }
        };
        assert!(
            matches!(maps.write(&file, 4096, fill(1)), Ok(true)),
            "a sweeper starts"
        );
        drop(file);
        assert!(
            File::open(&a).expect("opened").try_lock().is_ok(),
            "a kept mapping holds no lock"
        );
        assert_eq!(std::fs::read(&a).expect("read"), vec![1; 4096]);
        // The same file comes back for a new object: written again.
        let file = open_locked(&a, true).expect("opened");
        assert!(
            matches!(maps.write(&file, 4096, fill(2)), Ok(false)),
            "one sweeper"
        );
        drop(file);
        assert_eq!(std::fs::read(&a).expect("read"), vec![2; 4096]);
        assert_eq!(maps.len(), 1, "one mapping for one file");
        // At another size, the file is mapped anew at its size.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&a)
            .and_then(|f| f.set_len(100))
            .expect("resized");
        let file = open_locked(&a, true).expect("opened");
        let short = |out: &mut SliceWriter<'_>| {
            std::io::Write::write_all(out, &[3; 100]).map_err(CodecError::from)
        };
        assert!(matches!(maps.write(&file, 100, short), Ok(false)));
        assert_eq!(std::fs::read(&a).expect("read"), vec![3; 100]);
        // A value that does not fill the object exactly is an error.
        assert!(maps.write(&file, 100, fill(4)).is_err(), "too long");
        assert!(maps.write(&file, 100, |_| Ok(())).is_err(), "too short");
        assert!(
            maps.write(&file, 99, |_| Ok(())).is_err(),
            "not the file's size"
        );
        assert_eq!(maps.len(), 0, "a failed write keeps no mapping");
        assert!(matches!(maps.write(&file, 100, short), Ok(false)));
        drop(file);
        // Removed by the store: the mapping goes at the next sweep.
        assert!(maps.sweep());
        std::fs::remove_file(&a).expect("removed");
        assert!(!maps.sweep(), "nothing is kept");
        assert_eq!(maps.len(), 0);
    }

    #[test]
    fn a_filled_buffer_mut_freezes_into_the_same_bytes() {
        let mut b = BufferMut::zeroed(3 << 20).expect("memory");
        assert!(b.iter().all(|x| *x == 0));
        b[5] = 7;
        b[(3 << 20) - 1] = 9;
        let frozen = b.freeze();
        assert_eq!(frozen.len(), 3 << 20);
        assert_eq!((frozen[5], frozen[(3 << 20) - 1]), (7, 9));
        let back: Buffer =
            crate::codec::decode(&crate::codec::encode(&frozen).expect("enc")).expect("dec");
        assert_eq!(back, frozen);
        assert!(BufferMut::zeroed(0).expect("empty").freeze().is_empty());
        assert!(
            BufferMut::zeroed(usize::MAX).is_err(),
            "memory that cannot be had is an error, not a panic"
        );
    }

    #[test]
    fn numbers_travel_as_one_block() {
        let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let buffer = Buffer::from_slice_of(&xs);
        assert_eq!(buffer.len(), 4000);
        let encoded = crate::codec::encode(&buffer).expect("enc");
        assert!(encoded.len() <= 4005, "one block: {} bytes", encoded.len());
        let back: Buffer = crate::codec::decode(&encoded).expect("dec");
        assert_eq!(back.to_vec_of::<f32>(), Some(xs));
        assert_eq!(back.to_vec_of::<f64>().map(|v| v.len()), Some(500));
        assert!(Buffer::from_vec(vec![0; 3]).to_vec_of::<u32>().is_none());
    }
}
