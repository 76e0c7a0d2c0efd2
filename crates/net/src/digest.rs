//! SHA-256 digests as hex: the names of content-addressed executables.

/// The SHA-256 of `bytes`, as 64 lower-case hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    shoal_proto::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// True when `text` can be a name [`sha256_hex`] gives: 64 lower-case hex
/// digits. Checked before such a name from a peer becomes a file name.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_are_64_lower_case_hex_digits() {
        assert!(is_sha256_hex(&sha256_hex(b"x")));
        assert!(!is_sha256_hex(&sha256_hex(b"x").to_uppercase()));
        assert!(!is_sha256_hex(&sha256_hex(b"x")[1..]));
        assert!(!is_sha256_hex(&format!("../{}", &sha256_hex(b"x")[3..])));
    }
}
