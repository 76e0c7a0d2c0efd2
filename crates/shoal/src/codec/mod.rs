//! Encoding values: MessagePack, positional (both ends run the same build),
//! with slices of plain numbers as raw blocks ([`block`]): a `Vec<f32>` or a
//! `Vec<u8>` is one copy of its bytes, not one encoding per element.

pub(crate) mod block;
mod de;
mod ser;
#[cfg(test)]
mod tests;

use serde::de::DeserializeOwned;
use serde::Serialize;

use ser::Raw;

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
    Ok(rmp_serde::to_vec(&Raw(value))?)
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
    rmp_serde::encode::write(&mut count, &Raw(value))?;
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
    match rmp_serde::encode::write(&mut w, &Raw(value)) {
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
    Ok(rmp_serde::encode::write(out, &Raw(value))?)
}

/// Decodes a value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut d = rmp_serde::Deserializer::from_read_ref(bytes);
    Ok(T::deserialize(de::De(&mut d))?)
}

thread_local! {
    /// While a task's argument value is encoded on this thread: the
    /// references serialized into it, lent to the task.
    static LENDING: std::cell::RefCell<Option<Vec<shoal_proto::ObjectId>>> =
        const { std::cell::RefCell::new(None) };
}

/// A lending scope entered on this thread; the one outside it is put back
/// when it is left or dropped (if encoding panics too).
struct Scope(Option<Option<Vec<shoal_proto::ObjectId>>>);

impl Scope {
    fn enter(inner: Option<Vec<shoal_proto::ObjectId>>) -> Self {
        Scope(Some(LENDING.with(|l| l.replace(inner))))
    }

    /// Leaves the scope: the references lent in it.
    fn leave(mut self) -> Vec<shoal_proto::ObjectId> {
        let outer = self.0.take().flatten();
        LENDING.with(|l| l.replace(outer)).unwrap_or_default()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(outer) = self.0.take() {
            let _ = LENDING.try_with(|l| l.replace(outer));
        }
    }
}

/// Runs `encode` with every reference it serializes lent to a task rather
/// than escaped; returns them with its result.
pub fn lending<R>(encode: impl FnOnce() -> R) -> (R, Vec<shoal_proto::ObjectId>) {
    let scope = Scope::enter(Some(Vec::new()));
    let out = encode();
    (out, scope.leave())
}

/// Runs `encode` with every reference it serializes escaped, even inside
/// an argument's encoding (a value `put` or returned may be read by
/// anyone, later).
pub fn escaping<R>(encode: impl FnOnce() -> R) -> R {
    let scope = Scope::enter(None);
    let out = encode();
    drop(scope);
    out
}

/// Records `id` as lent if a lending scope is open on this thread.
pub fn lend_in_scope(id: shoal_proto::ObjectId) -> bool {
    LENDING.with(|l| l.borrow_mut().as_mut().map(|lent| lent.push(id)).is_some())
}
