//! Objects read from the node's shared-memory store without copying.
//!
//! A process on the node's host maps a sealed object's file read-only
//! ([`Mapping`]); decoding from the mapping copies only what the value's
//! type owns. [`Buffer`] owns nothing: decoded from a mapping it borrows the
//! mapping (kept alive by the buffer), so `get` of an `ObjectRef<Buffer>`
//! costs no copy of the payload. This is the only module with `unsafe`.

#![allow(unsafe_code)]

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
}

impl Mapping {
    /// Maps the file at `path`, which must hold exactly `size` bytes.
    pub(crate) fn open(path: &Path, size: u64) -> std::io::Result<Arc<Self>> {
        let file = File::open(path)?;
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
        Ok(Arc::new(Self { map }))
    }

    fn bytes(&self) -> &[u8] {
        &self.map
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
pub(crate) fn decode<T: DeserializeOwned>(blob: &Blob) -> Result<T, String> {
    let Blob::Mapped(mapping) = blob else {
        return crate::exec::decode(blob);
    };
    let previous = DECODING.with(|d| d.replace(Some(Arc::clone(mapping))));
    let decoded = crate::exec::decode(mapping.bytes());
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
        if self.len() % size != 0 {
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
        let encoded = crate::exec::encode(&(7u32, Buffer::from_vec(payload.clone()))).expect("enc");
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
    fn a_filled_buffer_mut_freezes_into_the_same_bytes() {
        let mut b = BufferMut::zeroed(3 << 20).expect("memory");
        assert!(b.iter().all(|x| *x == 0));
        b[5] = 7;
        b[(3 << 20) - 1] = 9;
        let frozen = b.freeze();
        assert_eq!(frozen.len(), 3 << 20);
        assert_eq!((frozen[5], frozen[(3 << 20) - 1]), (7, 9));
        let back: Buffer =
            crate::exec::decode(&crate::exec::encode(&frozen).expect("enc")).expect("dec");
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
        let encoded = crate::exec::encode(&buffer).expect("enc");
        assert!(encoded.len() <= 4005, "one block: {} bytes", encoded.len());
        let back: Buffer = crate::exec::decode(&encoded).expect("dec");
        assert_eq!(back.to_vec_of::<f32>(), Some(xs));
        assert_eq!(back.to_vec_of::<f64>().map(|v| v.len()), Some(500));
        assert!(Buffer::from_vec(vec![0; 3]).to_vec_of::<u32>().is_none());
    }
}
