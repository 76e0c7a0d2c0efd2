//! [`Chunk`]: the bytes of an object's part inside a message, decoded
//! without a copy when the frame is shared ([`decode_shared`]).
//!
//! An 8 MiB part of a pull arrives as one frame. Decoded the usual way,
//! its bytes are copied out of the frame into a `Vec`; decoded with
//! [`decode_shared`], a [`Chunk`] is a slice of the frame itself. On the
//! wire it is MessagePack `bin`, as `serde_bytes` writes a `Vec<u8>`, so
//! the change is invisible to peers.

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{decode, CodecLimits, DecodeError};

thread_local! {
    /// The frame [`decode_shared`] is decoding on this thread.
    static SHARED: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Clears [`SHARED`] when the decoding ends, panic or not.
struct Sharing;

impl Drop for Sharing {
    fn drop(&mut self) {
        SHARED.with(|s| s.borrow_mut().take());
    }
}

/// [`decode`] of a frame body held as [`Bytes`]: every [`Chunk`] in the
/// message is a slice of `body`, not a copy of it.
pub fn decode_shared<T: DeserializeOwned>(
    body: Bytes,
    limits: &CodecLimits,
) -> Result<T, DecodeError> {
    SHARED.with(|s| *s.borrow_mut() = Some(body.clone()));
    let _sharing = Sharing;
    decode(&body, limits)
}

/// `bytes` as a slice of the frame being decoded, if they lie inside it.
fn shared_slice(bytes: &[u8]) -> Option<Bytes> {
    SHARED.with(|s| {
        let shared = s.borrow();
        let frame = shared.as_ref()?;
        let base = frame.as_ptr() as usize;
        let start = (bytes.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(bytes.len())?;
        (end <= frame.len()).then(|| frame.slice(start..end))
    })
}

/// Bytes of an object inside a message (MessagePack `bin`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chunk(pub Bytes);

impl Chunk {
    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(v: Vec<u8>) -> Self {
        Chunk(Bytes::from(v))
    }
}

impl Serialize for Chunk {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(ChunkVisitor)
    }
}

struct ChunkVisitor;

impl<'de> Visitor<'de> for ChunkVisitor {
    type Value = Chunk;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Chunk, E> {
        Ok(Chunk(
            shared_slice(v).unwrap_or_else(|| Bytes::copy_from_slice(v)),
        ))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Chunk, E> {
        Ok(Chunk(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Chunk, E> {
        Ok(Chunk::from(v))
    }

    /// An array of numbers, as `serde_bytes` also reads.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Chunk, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Chunk::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Chunk, E> {
        Err(E::invalid_type(
            serde::de::Unexpected::Other("a string"),
            &self,
        ))
    }
}

#[cfg(any(test, feature = "arbitrary"))]
impl proptest::arbitrary::Arbitrary for Chunk {
    type Parameters = ();
    type Strategy = proptest::strategy::Map<
        <Vec<u8> as proptest::arbitrary::Arbitrary>::Strategy,
        fn(Vec<u8>) -> Chunk,
    >;

    fn arbitrary_with((): ()) -> Self::Strategy {
        use proptest::strategy::Strategy;
        proptest::arbitrary::any::<Vec<u8>>().prop_map(Chunk::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, CodecLimits};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Part {
        total: u64,
        data: Chunk,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Legacy {
        total: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }

    #[test]
    fn a_shared_frame_is_sliced_not_copied() {
        let part = Part {
            total: 9,
            data: Chunk::from(vec![7u8; 1 << 16]),
        };
        let body = Bytes::from(encode(&part).expect("encoded"));
        let back: Part = decode_shared(body.clone(), &CodecLimits::CONTROL).expect("decoded");
        assert_eq!(back, part);
        let inside = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        assert!(
            inside.contains(&(back.data.as_ptr() as usize)),
            "the chunk points into the frame"
        );
        // Decoded the usual way, or after the shared decode ended, it is
        // a copy.
        let copied: Part = decode(&body, &CodecLimits::CONTROL).expect("decoded");
        assert!(!inside.contains(&(copied.data.as_ptr() as usize)));
        assert_eq!(copied, part);
    }

    #[test]
    fn the_wire_format_is_serde_bytes() {
        let legacy = Legacy {
            total: 3,
            data: b"abc".to_vec(),
        };
        let part = Part {
            total: 3,
            data: Chunk::from(b"abc".to_vec()),
        };
        let encoded = encode(&part).expect("encoded");
        assert_eq!(encoded, encode(&legacy).expect("encoded"));
        let back: Legacy = decode(&encoded, &CodecLimits::CONTROL).expect("decoded");
        assert_eq!(back, legacy);
    }

    #[test]
    fn a_string_where_bytes_belong_is_an_error() {
        let wrong = encode(&("x", "not bytes")).expect("encoded");
        assert!(decode::<(String, Chunk)>(&wrong, &CodecLimits::CONTROL).is_err());
    }
}
