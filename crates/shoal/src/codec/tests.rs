//! Raw blocks: what a user's values encode to, and that every shape of
//! value holding them reads back, whoever reads it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Deserializer, Serialize};

use super::{decode, encode, encoded_len};

fn round_trip<T>(value: &T) -> T
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value).expect("encodes");
    assert_eq!(encoded_len(value).expect("len"), bytes.len() as u64);
    let back: T = decode(&bytes).expect("decodes");
    assert_eq!(&back, value);
    back
}

#[test]
fn vecs_of_plain_numbers_are_one_block_of_their_bytes() {
    let n = 100_000;
    let floats: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.25).collect();
    let bytes = encode(&floats).expect("encodes");
    // A block: the bytes and a header; MessagePack would take 5 per float.
    assert!(bytes.len() <= 4 * n + 8, "{} bytes", bytes.len());
    assert_eq!(decode::<Vec<f32>>(&bytes).expect("decodes"), floats);

    let raw: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let bytes = encode(&raw).expect("encodes");
    assert!(bytes.len() <= n + 8, "{} bytes", bytes.len());
    round_trip(&raw);

    round_trip(&(0..1000).map(|i| -i as i8).collect::<Vec<i8>>());
    round_trip(&(0..1000).map(|i| i as u16 * 3).collect::<Vec<u16>>());
    round_trip(&(0..1000).map(|i| -i as i16).collect::<Vec<i16>>());
    round_trip(&(0..1000).map(|i| i as u32 * 77).collect::<Vec<u32>>());
    round_trip(&(0..1000).map(|i| -i * 99).collect::<Vec<i32>>());
    round_trip(&(0..1000).map(|i| u64::MAX - i).collect::<Vec<u64>>());
    round_trip(&(0..1000).map(|i| i64::MIN + i).collect::<Vec<i64>>());
    round_trip(&(0..1000).map(|i| f64::from(i) / 3.0).collect::<Vec<f64>>());
    round_trip(&(0..1000).collect::<Vec<usize>>());
    round_trip(&(-500..500).collect::<Vec<isize>>());
    round_trip(&vec![f32::NAN.to_bits(), 1]);
    round_trip(&Vec::<f64>::new());
    // Not-a-number survives bit for bit (not compared with ==).
    let nan: Vec<f64> = decode(&encode(&vec![f64::NAN]).expect("enc")).expect("dec");
    assert!(nan[0].is_nan());
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Embedding(Vec<f32>);

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    pixels: Vec<u8>,
    features: Vec<f32>,
    maybe: Option<Vec<f64>>,
    embedding: Embedding,
    boxed: Box<[i32]>,
    nested: Vec<Vec<u16>>,
    by_key: HashMap<String, Vec<i64>>,
    shape: Shape,
    ordered: BTreeMap<u32, (Vec<u8>, Vec<f64>)>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Line(Vec<f32>),
    Grid(u32, Vec<f64>),
    Named { rows: Vec<u64>, cols: Vec<u8> },
}

fn sample(shape: Shape) -> Sample {
    Sample {
        name: "ok".repeat(50),
        pixels: (0..300).map(|i| i as u8).collect(),
        features: vec![1.5, -2.0, 3.25],
        maybe: Some(vec![0.1, 0.2]),
        embedding: Embedding(vec![9.0; 17]),
        boxed: vec![-1, 2, -3].into_boxed_slice(),
        nested: vec![vec![1, 2], vec![], vec![3]],
        by_key: HashMap::from([("a".into(), vec![1, -1]), ("b".into(), vec![])]),
        shape,
        ordered: BTreeMap::from([(7, (vec![1, 2, 3], vec![4.0]))]),
    }
}

#[test]
fn values_holding_blocks_read_back_in_every_position() {
    for shape in [
        Shape::Unit,
        Shape::Line(vec![1.0, 2.0]),
        Shape::Grid(3, vec![0.5; 9]),
        Shape::Named {
            rows: vec![1, 2],
            cols: vec![3],
        },
    ] {
        round_trip(&sample(shape));
    }
    round_trip(&Some(vec![1u32, 2]));
    round_trip(&(vec![1u8], "text".to_string(), vec![2.5f64]));
    round_trip(&"a string".to_string());
    round_trip(&serde_bytes::ByteBuf::from(vec![1, 2, 3]));
    round_trip(&bytes::Bytes::from(vec![4u8; 1000]));
    let slice: &[f32] = &[1.0, 2.0];
    let encoded = encode(&slice).expect("encodes a slice");
    assert_eq!(decode::<Vec<f32>>(&encoded).expect("dec"), slice);
}

/// Reads a block through its own visitor (not serde's `Vec`), as a
/// `deserialize_with` might: it gets the block's numbers as a sequence.
fn sum_of<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct Sum;
    impl<'de> serde::de::Visitor<'de> for Sum {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("numbers")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<f64, A::Error> {
            let mut sum = 0.0;
            while let Some(x) = seq.next_element::<f64>()? {
                sum += x;
            }
            Ok(sum)
        }
    }
    d.deserialize_seq(Sum)
}

#[derive(Serialize)]
struct Written {
    values: Vec<f32>,
    widths: Vec<u32>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct ReadOtherwise {
    #[serde(deserialize_with = "sum_of")]
    values: f64,
    /// Another element type than was written: converted number by number.
    widths: Vec<u64>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Loose {
    Floats(Vec<f64>),
    Text(String),
}

#[test]
fn a_block_reaches_any_other_reader_as_its_numbers() {
    let written = Written {
        values: vec![1.0, 2.5, -0.5],
        widths: vec![7, u32::MAX],
    };
    let read: ReadOtherwise = decode(&encode(&written).expect("enc")).expect("dec");
    assert_eq!(
        read,
        ReadOtherwise {
            values: 3.0,
            widths: vec![7, u64::from(u32::MAX)]
        }
    );
    // Serde's buffering (untagged enums, flatten) reads any value first.
    round_trip(&vec![
        Loose::Floats(vec![1.0, 2.0]),
        Loose::Text("x".into()),
    ]);
    // Plain MessagePack arrays (written by anything else) still read.
    let plain = rmp_serde::to_vec(&vec![1.5f32, 2.5]).expect("enc");
    assert_eq!(decode::<Vec<f32>>(&plain).expect("dec"), vec![1.5, 2.5]);
}

#[test]
fn malformed_blocks_are_errors() {
    let good = encode(&vec![1u32, 2, 3]).expect("enc");
    // An unknown extension type, a length that is not whole elements, and
    // every truncation: each an error, never a panic.
    let mut unknown = good.clone();
    let tag_at = unknown.len() - 12 - 1;
    unknown[tag_at] = 0x10;
    assert!(decode::<Vec<u32>>(&unknown).is_err());
    let ragged = {
        let mut b = vec![0xc7u8, 5, super::block::Kind::U32.tag() as u8];
        b.extend_from_slice(&[1, 2, 3, 4, 5]);
        b
    };
    assert!(decode::<Vec<u32>>(&ragged).is_err());
    for cut in 0..good.len() {
        assert!(decode::<Vec<u32>>(&good[..cut]).is_err(), "cut at {cut}");
    }
    // A block where a string is expected.
    assert!(decode::<String>(&good).is_err());
}
