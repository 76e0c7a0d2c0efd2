//! Raw blocks: a slice of plain numbers (`Vec<f32>`, `[u64]`, `Vec<u8>`, ...)
//! carried as its bytes, little-endian, in one piece, where MessagePack would
//! write one encoding per element. Bytes are MessagePack `bin`; the other
//! kinds an extension type per kind ([`Kind::tag`]).
//!
//! Serde hands a serializer or a deserializer no type, only calls; this module
//! finds the types by their ids (`typeid`, which works for types with
//! lifetimes too): a value seen as `Vec<f32>` by the serializer
//! ([`of_value`]), and serde's own visitor of `Vec<f32>` seen by the
//! deserializer ([`vec_visitor`], found once by probing). Along with the
//! streaming copy of large blocks, this is the module with `unsafe` besides
//! `shm`: each use is a cast between types whose ids were just found equal,
//! or between a slice of plain numbers and its bytes.

#![allow(unsafe_code)]

use std::any::TypeId;
use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::OnceLock;

use serde::de::{self, Deserialize, Deserializer, IntoDeserializer, Visitor};

/// The kind of number a block holds (`usize` and `isize` travel as their
/// 64-bit kinds on 64-bit targets).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

const KINDS: [Kind; 10] = [
    Kind::U8,
    Kind::I8,
    Kind::U16,
    Kind::I16,
    Kind::U32,
    Kind::I32,
    Kind::U64,
    Kind::I64,
    Kind::F32,
    Kind::F64,
];

/// The first extension type of a block; kind `i` is `TAG_BASE + i`.
const TAG_BASE: i8 = 0x50;

impl Kind {
    /// Bytes per element.
    pub(crate) fn size(self) -> usize {
        match self {
            Kind::U8 | Kind::I8 => 1,
            Kind::U16 | Kind::I16 => 2,
            Kind::U32 | Kind::I32 | Kind::F32 => 4,
            Kind::U64 | Kind::I64 | Kind::F64 => 8,
        }
    }

    /// The MessagePack extension type of a block of this kind.
    pub(crate) fn tag(self) -> i8 {
        let at = KINDS.iter().position(|k| *k == self).unwrap_or(0);
        TAG_BASE + at as i8
    }

    fn of_tag(tag: i8) -> Option<Kind> {
        let at = usize::try_from(tag.checked_sub(TAG_BASE)?).ok()?;
        KINDS.get(at).copied()
    }
}

/// A number type whose every bit pattern is a value and which has no
/// padding, so a slice of it is its bytes.
///
/// # Safety
/// Only the primitive integer and float types implement it.
pub(crate) unsafe trait Plain: Copy + Default + 'static {
    const KIND: Kind;
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! plain {
    ($($t:ty => $k:ident),* $(,)?) => {$(
        // SAFETY: a primitive number: no padding, every bit pattern valid.
        unsafe impl Plain for $t {
            const KIND: Kind = Kind::$k;
            fn from_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}

plain!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
    u64 => U64, i64 => I64, f32 => F32, f64 => F64);
#[cfg(target_pointer_width = "64")]
plain!(usize => U64, isize => I64);

/// The bytes of a slice of plain numbers.
fn bytes_of<N: Plain>(numbers: &[N]) -> &[u8] {
    // SAFETY: `N` has no padding (`Plain`), so its slice's memory is
    // `size_of_val` initialized bytes, borrowed for as long as the slice.
    unsafe { std::slice::from_raw_parts(numbers.as_ptr().cast(), std::mem::size_of_val(numbers)) }
}

/// A value to write as a block: its kind and bytes.
pub(crate) type Block<'a> = (Kind, &'a [u8]);

/// `value` as a block, if its type is a `Vec`, slice or slice reference of
/// plain numbers (on a little-endian target: elsewhere values are written
/// element by element, and read either way).
pub(crate) fn of_value<T: ?Sized>(value: &T) -> Option<Block<'_>> {
    if cfg!(target_endian = "big") {
        return None;
    }
    let id = typeid::of::<T>();
    macro_rules! try_types {
        ($($t:ty),*) => {$(
            if id == TypeId::of::<Vec<$t>>() {
                // SAFETY: `T` is `Vec<$t>` (their ids are equal).
                let v = unsafe { &*(value as *const T).cast::<Vec<$t>>() };
                return Some((<$t>::KIND, bytes_of(v)));
            }
            if id == TypeId::of::<[$t]>() {
                // SAFETY: `T` is `[$t]`: `&T` is `&[$t]`, the same fat pointer.
                let v: &[$t] = unsafe { std::mem::transmute_copy::<&T, &[$t]>(&value) };
                return Some((<$t>::KIND, bytes_of(v)));
            }
            if id == typeid::of::<&[$t]>() {
                // SAFETY: `T` is `&[$t]` (the lifetime is the only thing the
                // id does not see, and the reference outlives `value`).
                let v = unsafe { *(value as *const T).cast::<&[$t]>() };
                return Some((<$t>::KIND, bytes_of(v)));
            }
        )*};
    }
    try_types!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);
    #[cfg(target_pointer_width = "64")]
    try_types!(usize, isize);
    None
}

/// An element type whose `Vec` is read as a block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Elem {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    Usize,
    Isize,
}

const ELEMS: [Elem; 12] = [
    Elem::U8,
    Elem::I8,
    Elem::U16,
    Elem::I16,
    Elem::U32,
    Elem::I32,
    Elem::U64,
    Elem::I64,
    Elem::F32,
    Elem::F64,
    Elem::Usize,
    Elem::Isize,
];

/// Calls `$body` with `$n` the element type of `$elem`.
macro_rules! with_elem {
    ($elem:expr, $n:ident => $body:expr) => {
        match $elem {
            Elem::U8 => {
                type $n = u8;
                $body
            }
            Elem::I8 => {
                type $n = i8;
                $body
            }
            Elem::U16 => {
                type $n = u16;
                $body
            }
            Elem::I16 => {
                type $n = i16;
                $body
            }
            Elem::U32 => {
                type $n = u32;
                $body
            }
            Elem::I32 => {
                type $n = i32;
                $body
            }
            Elem::U64 => {
                type $n = u64;
                $body
            }
            Elem::I64 => {
                type $n = i64;
                $body
            }
            Elem::F32 => {
                type $n = f32;
                $body
            }
            Elem::F64 => {
                type $n = f64;
                $body
            }
            Elem::Usize => {
                type $n = usize;
                $body
            }
            Elem::Isize => {
                type $n = isize;
                $body
            }
        }
    };
}

impl Elem {
    /// The type id of the visitor `Vec<N>`'s `Deserialize` hands to
    /// `deserialize_seq`.
    fn probe(self) -> Option<TypeId> {
        // `usize` and `isize` are plain only on 64-bit targets.
        if std::mem::size_of::<usize>() != 8 && matches!(self, Elem::Usize | Elem::Isize) {
            return None;
        }
        with_elem!(self, N => match Vec::<N>::deserialize(Probe) {
            Err(Probed(id)) => id,
            Ok(_) => None,
        })
    }

    /// Reads a `Vec` of this element from `d`, as `Value` (which must be
    /// that `Vec`: the visitor's value, checked by id).
    pub(crate) fn read<'de, D: Deserializer<'de>, Value>(self, d: D) -> Result<Value, D::Error> {
        with_elem!(self, N => {
            let v: Vec<N> = d.deserialize_any(VecOf::<N>(PhantomData))?;
            cast(v).ok_or_else(|| de::Error::custom("a block read as another type"))
        })
    }
}

/// Which `Vec` of plain numbers serde's own visitor builds, when `V` is that
/// visitor. The value type is compared first (with constants: for any
/// other type this costs nothing); then the visitor's id with the one
/// `Vec<N>`'s `Deserialize` was found to hand over (found once, by
/// probing).
pub(crate) fn vec_visitor<'de, V: Visitor<'de>>() -> Option<Elem> {
    static VISITORS: OnceLock<[Option<TypeId>; 12]> = OnceLock::new();
    let value = typeid::of::<V::Value>();
    macro_rules! which {
        ($($t:ty => $e:ident),*) => {
            $(if value == TypeId::of::<Vec<$t>>() { Elem::$e } else)* { return None }
        };
    }
    let elem = which!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
        u64 => U64, i64 => I64, f32 => F32, f64 => F64, usize => Usize, isize => Isize);
    let visitors = VISITORS.get_or_init(|| ELEMS.map(Elem::probe));
    (visitors[elem as usize] == Some(typeid::of::<V>())).then_some(elem)
}

/// `a` as `B`, when they are the same type (by id); `None` otherwise.
fn cast<A: 'static, B>(a: A) -> Option<B> {
    if TypeId::of::<A>() != typeid::of::<B>() {
        return None;
    }
    let a = std::mem::ManuallyDrop::new(a);
    // SAFETY: `A` and `B` are the same type (equal ids); `a` is not dropped
    // (`ManuallyDrop`), so ownership moves to the copy.
    Some(unsafe { std::mem::transmute_copy::<A, B>(&a) })
}

/// A deserializer that only records the visitor given to `deserialize_seq`.
struct Probe;

#[derive(Debug)]
struct Probed(Option<TypeId>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probed")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

impl<'de> Deserializer<'de> for Probe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(Some(typeid::of::<V>())))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// A `Vec<N>` from whatever was written for it: a block (one copy), bytes
/// (for `u8`), a block of another kind or an array (element by element).
struct VecOf<N>(PhantomData<N>);

impl<'de, N: Plain + Deserialize<'de>> Visitor<'de> for VecOf<N> {
    type Value = Vec<N>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a sequence of {:?}", N::KIND)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<N>, E> {
        if N::KIND == Kind::U8 {
            return Ok(vec_from_le(v));
        }
        Err(E::invalid_type(de::Unexpected::Bytes(v), &self))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Vec<N>, D::Error> {
        let (kind, bytes) = ext_parts(d)?;
        if kind == N::KIND {
            return Ok(vec_from_le(&bytes));
        }
        Numbers::new(kind, &bytes).collect()
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<N>, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(n) = seq.next_element()? {
            v.push(n);
        }
        Ok(v)
    }
}

/// The numbers of a little-endian block of `N` (its length is a whole
/// number of elements: checked where the block is read).
fn vec_from_le<N: Plain>(bytes: &[u8]) -> Vec<N> {
    let size = std::mem::size_of::<N>();
    let n = bytes.len() / size;
    if cfg!(target_endian = "big") {
        return bytes.chunks_exact(size).map(N::from_le).collect();
    }
    if n * size < STREAMING_MIN {
        let mut v: Vec<N> = Vec::with_capacity(n);
        // SAFETY: `v` has room for `n` elements, whose `n * size` bytes
        // are written here from `bytes` (at least that long, and not
        // overlapping a new allocation); `N` is plain, so any bytes are
        // `n` initialized values before the length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size);
            v.set_len(n);
        }
        return v;
    }
    // Zeroed (from the allocator's zero pages when large), then written once.
    let mut v = vec![N::default(); n];
    // SAFETY: `N` is plain: its slice is `n * size` bytes that any bytes
    // may overwrite, borrowed mutably for the copy only.
    let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n * size) };
    copy(dst, &bytes[..n * size]);
    v
}

/// Reads an extension value's type and bytes, which must be a block's.
fn ext_parts<'de, D: Deserializer<'de>>(d: D) -> Result<(Kind, Cow<'de, [u8]>), D::Error> {
    struct Parts;
    impl<'de> Visitor<'de> for Parts {
        type Value = (i8, Cow<'de, [u8]>);
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an extension type and its bytes")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let missing = || de::Error::custom("an extension value without its parts");
            let tag: i8 = seq.next_element()?.ok_or_else(missing)?;
            let bytes: Bytes<'de> = seq.next_element()?.ok_or_else(missing)?;
            Ok((tag, bytes.0))
        }
    }
    let (tag, bytes) = d.deserialize_any(Parts)?;
    let kind = Kind::of_tag(tag)
        .ok_or_else(|| de::Error::custom(format!("unknown MessagePack extension type {tag}")))?;
    if !bytes.len().is_multiple_of(kind.size()) {
        return Err(de::Error::custom(format!(
            "a block of {kind:?} of {} bytes, not a whole number of elements",
            bytes.len()
        )));
    }
    Ok((kind, bytes))
}

/// Bytes, borrowed from the input when they can be.
struct Bytes<'de>(Cow<'de, [u8]>);

impl<'de> Deserialize<'de> for Bytes<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes<'de>, E> {
                Ok(Bytes(Cow::Borrowed(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes<'de>, E> {
                Ok(Bytes(Cow::Owned(v.to_vec())))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A block's numbers one by one, as a sequence any visitor can read: the
/// way a block reaches a type that reads it as something other than the
/// `Vec` it was written as.
pub(crate) struct Numbers<'b> {
    kind: Kind,
    bytes: &'b [u8],
}

impl<'b> Numbers<'b> {
    fn new(kind: Kind, bytes: &'b [u8]) -> Self {
        Numbers { kind, bytes }
    }

    fn collect<'de, N: Deserialize<'de>, E: de::Error>(mut self) -> Result<Vec<N>, E> {
        let mut out = Vec::with_capacity(self.bytes.len() / self.kind.size());
        while let Some(n) = self.next_number(PhantomData::<N>)? {
            out.push(n);
        }
        Ok(out)
    }
}

/// Presents the extension value `d` holds (a block) to `visitor` as a
/// sequence of its numbers.
pub(crate) fn visit_block<'de, D: Deserializer<'de>, V: Visitor<'de>>(
    d: D,
    visitor: V,
) -> Result<V::Value, D::Error> {
    let (kind, bytes) = ext_parts(d)?;
    visitor.visit_seq(NumbersOf::<D::Error> {
        numbers: Numbers::new(kind, &bytes),
        error: PhantomData,
    })
}

/// [`Numbers`] with the error type of the deserializer it came from.
struct NumbersOf<'b, E> {
    numbers: Numbers<'b>,
    error: PhantomData<E>,
}

impl<'de, E: de::Error> de::SeqAccess<'de> for NumbersOf<'_, E> {
    type Error = E;

    fn next_element_seed<S: de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, E> {
        self.numbers.next_number(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.numbers.bytes.len() / self.numbers.kind.size())
    }
}

impl Numbers<'_> {
    /// The next number, given to `seed`.
    fn next_number<'de, S: de::DeserializeSeed<'de>, E: de::Error>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, E> {
        let size = self.kind.size();
        if self.bytes.len() < size {
            return Ok(None);
        }
        let (one, rest) = self.bytes.split_at(size);
        self.bytes = rest;
        macro_rules! give {
            ($t:ty) => {
                seed.deserialize(<$t as Plain>::from_le(one).into_deserializer())
                    .map(Some)
            };
        }
        match self.kind {
            Kind::U8 => give!(u8),
            Kind::I8 => give!(i8),
            Kind::U16 => give!(u16),
            Kind::I16 => give!(i16),
            Kind::U32 => give!(u32),
            Kind::I32 => give!(i32),
            Kind::U64 => give!(u64),
            Kind::I64 => give!(i64),
            Kind::F32 => give!(f32),
            Kind::F64 => give!(f64),
        }
    }
}

/// Copies of at least this many bytes go through [`copy_streaming`].
const STREAMING_MIN: usize = 1 << 20;

/// Copies `src` into `dst` (of the same length). A large copy on an x86-64
/// CPU with AVX streams into `dst` ([`copy_streaming`]): on the project's
/// machines that runs at 1.4-2 times glibc's `memcpy` for copies of tens
/// to hundreds of MB, whatever the two buffers' alignment (80 MB into a
/// shared mapping at a 5-byte offset, from memory already written: 29
/// against 21 GB/s; from the kernel's huge zero page, one thread: 46
/// against 26 GB/s, two: 74 against 38).
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= STREAMING_MIN && dst.len() == src.len() && std::is_x86_feature_detected!("avx")
    {
        // SAFETY: the CPU has AVX (checked just above); `dst` and `src` are
        // valid for `src.len()` bytes each and do not overlap (`dst` is
        // borrowed mutably).
        unsafe { copy_streaming(dst.as_mut_ptr(), src.as_ptr(), src.len()) };
        return;
    }
    dst.copy_from_slice(src);
}

/// Copies `len` bytes with 32-byte loads and non-temporal stores to
/// 64-byte-aligned addresses of `dst` (the data goes to memory without
/// filling the caches with lines nobody reads next), then fences so the
/// stores are visible before anything this thread does next.
///
/// # Safety
/// The CPU must have AVX; `dst` and `src` must be valid for `len` bytes
/// and must not overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_sfence};
    const STEP: usize = 128;
    let head = dst.align_offset(64).min(len);
    // SAFETY (this block and the ones below): every offset read or written
    // is below `len` (the loop stops `STEP` short of it), within the two
    // buffers the caller vouches for; stores through `dst + i` for `i`
    // past `head` are 64-byte aligned, as `_mm256_stream_si256` requires.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + STEP <= len {
            let (s, d) = (src.add(i), dst.add(i));
            let a = _mm256_loadu_si256(s.cast::<__m256i>());
            let b = _mm256_loadu_si256(s.add(32).cast::<__m256i>());
            let c = _mm256_loadu_si256(s.add(64).cast::<__m256i>());
            let e = _mm256_loadu_si256(s.add(96).cast::<__m256i>());
            _mm256_stream_si256(d.cast::<__m256i>(), a);
            _mm256_stream_si256(d.add(32).cast::<__m256i>(), b);
            _mm256_stream_si256(d.add(64).cast::<__m256i>(), c);
            _mm256_stream_si256(d.add(96).cast::<__m256i>(), e);
            i += STEP;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
    _mm_sfence();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_copies_are_exact_at_any_alignment_and_length() {
        let len = STREAMING_MIN + 200;
        let src: Vec<u8> = (0..len + 64).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; len + 128];
        for (from, to, n) in [
            (0, 0, len),
            (3, 5, len - 77),
            (0, 63, len - 1),
            (17, 1, STREAMING_MIN),
        ] {
            dst.fill(0);
            copy(&mut dst[to..to + n], &src[from..from + n]);
            assert_eq!(
                &dst[to..to + n],
                &src[from..from + n],
                "{from} -> {to}, {n} bytes"
            );
            assert!(dst[..to].iter().all(|b| *b == 0), "nothing before");
            assert!(dst[to + n..].iter().all(|b| *b == 0), "nothing after");
        }
        let mut small = [0u8; 10];
        copy(&mut small, b"0123456789");
        assert_eq!(&small, b"0123456789");
    }
}
