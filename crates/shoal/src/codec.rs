//! Encoding values: MessagePack, positional (both ends run the same build).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value that could not be encoded, decoded or written, and why.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("{0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes do not decode as the type asked for.
    #[error("{0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// Writing the encoding (into a file) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The encoding does not fit the room made for it.
    #[error("{0}")]
    Size(String),
}

/// Encodes a value (MessagePack, positional: both ends run the same build).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec(value)?)
}

/// The size of a value's encoding, without making it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<u64, CodecError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    rmp_serde::encode::write(&mut count, value)?;
    Ok(count.0)
}

/// Encodes a value if its encoding is at most `limit` bytes; `Ok(None)`
/// when it is larger (nothing more than `limit` bytes is buffered).
pub fn encode_small<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
) -> Result<Option<Vec<u8>>, CodecError> {
    struct Limited {
        out: Vec<u8>,
        limit: usize,
        over: bool,
    }
    impl std::io::Write for Limited {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.out.len() + buf.len() > self.limit {
                self.over = true;
                return Err(std::io::Error::other("over the limit"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Limited {
        out: Vec::new(),
        limit,
        over: false,
    };
    match rmp_serde::encode::write(&mut w, value) {
        Ok(()) => Ok(Some(w.out)),
        Err(_) if w.over => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Encodes a value into a writer (as [`encode`] does into memory).
pub fn encode_into<T: Serialize + ?Sized>(
    out: &mut impl std::io::Write,
    value: &T,
) -> Result<(), CodecError> {
    Ok(rmp_serde::encode::write(out, value)?)
}

/// Decodes a value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}
