//! [`Bytes`]: a byte buffer that travels as one block.

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Serialize};

/// A byte buffer encoded as one binary block (a copy, not an element-by-
/// element encoding as `Vec<u8>` gets): use it for large binary payloads in
/// arguments, results and `put`.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Bytes {
    /// The bytes as a vector.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl From<Bytes> for Vec<u8> {
    fn from(b: Bytes) -> Self {
        b.0
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_encode_as_one_block() {
        let b = Bytes(vec![7u8; 1000]);
        let encoded = crate::codec::encode(&b).expect("encodes");
        assert!(
            encoded.len() < 1010,
            "a bin block, not 1000 integers: {}",
            encoded.len()
        );
        assert_eq!(crate::codec::decode::<Bytes>(&encoded).expect("decodes"), b);
    }
}
