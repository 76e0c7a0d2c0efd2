//! The frame codec.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack (named encoding: structs are maps, except task events, which
//! `state` encodes as arrays for their number). Decoding is defensive,
//! because the bytes may come from an attacker:
//! 1. the length is checked against [`CodecLimits::frame_bytes_max`] before a
//!    buffer is allocated for the body ([`frame_len`]);
//! 2. the body is walked once without allocating ([`validate`]): nesting deeper
//!    than [`CodecLimits::depth_max`] is refused, and so is any array, map,
//!    string or binary that claims more elements or bytes than the body holds,
//!    so a 5-byte frame claiming 2^32 items costs nothing;
//! 3. only then is it decoded with `rmp_serde`.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes in a frame's length prefix.
pub const LEN_PREFIX: usize = 4;

/// Bounds applied to every decoded frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecLimits {
    /// Largest frame body accepted, in bytes.
    pub frame_bytes_max: u32,
    /// Deepest nesting of arrays and maps accepted.
    pub depth_max: u32,
}

impl CodecLimits {
    /// Limits for control messages: 16 MiB frames, 64 levels deep.
    pub const CONTROL: CodecLimits = CodecLimits {
        frame_bytes_max: 16 << 20,
        depth_max: 64,
    };
    /// Limits for the handshake, read from an unauthenticated peer: 4 KiB.
    pub const HANDSHAKE: CodecLimits = CodecLimits {
        frame_bytes_max: 4 << 10,
        depth_max: 8,
    };
}

impl Default for CodecLimits {
    fn default() -> Self {
        Self::CONTROL
    }
}

/// A frame that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the configured maximum; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The claimed length.
        len: u64,
        /// The configured maximum.
        max: u32,
    },
    /// The frame ended before its length prefix or body did.
    #[error("frame truncated: needed {needed} bytes, had {had}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        had: usize,
    },
}

/// A frame body that is not an acceptable message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame itself is bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Arrays and maps nest deeper than allowed.
    #[error("message nests deeper than {max} levels")]
    TooDeep {
        /// The configured maximum.
        max: u32,
    },
    /// A container, string or binary claims more than the body holds.
    #[error(
        "message claims {claimed} {what} at offset {offset} but only {remaining} bytes remain"
    )]
    LengthOverrun {
        /// "elements" or "bytes".
        what: &'static str,
        /// The claimed count.
        claimed: u64,
        /// Bytes left in the body.
        remaining: usize,
        /// Where the claim was made.
        offset: usize,
    },
    /// The body is not well-formed MessagePack (bad marker, trailing bytes, ...).
    #[error("malformed message at offset {offset}: {reason}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What.
        reason: &'static str,
    },
    /// Well-formed MessagePack that does not match the expected type.
    #[error("message does not match the expected type: {0}")]
    Schema(String),
}

/// A message that cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message exceeds the frame limit the peer will accept.
    #[error("encoded message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The configured maximum.
        max: u32,
    },
    /// Serialization failed.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Encodes `msg` (named encoding) without a length prefix.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(msg).map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Appends `msg` as one frame (length prefix and body) to `out`.
pub fn encode_frame<T: Serialize>(
    msg: &T,
    limits: &CodecLimits,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    let mut ser = rmp_serde::Serializer::new(&mut *out).with_struct_map();
    if let Err(e) = msg.serialize(&mut ser) {
        out.truncate(start);
        return Err(EncodeError::Serialize(e.to_string()));
    }
    let len = out.len() - start - LEN_PREFIX;
    if len > limits.frame_bytes_max as usize {
        out.truncate(start);
        return Err(EncodeError::TooLarge {
            len,
            max: limits.frame_bytes_max,
        });
    }
    // Cannot truncate: len <= frame_bytes_max, a u32.
    let prefix = (len as u32).to_be_bytes();
    out[start..start + LEN_PREFIX].copy_from_slice(&prefix);
    Ok(())
}

/// Reads a length prefix and checks it against the limit, before anything is
/// allocated for the body.
pub fn frame_len(prefix: [u8; LEN_PREFIX], limits: &CodecLimits) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > limits.frame_bytes_max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: limits.frame_bytes_max,
        });
    }
    Ok(len as usize)
}

/// Splits one whole frame off the front of `buf`: `Ok(None)` if `buf` does not
/// yet hold all of it, else the body and the bytes consumed.
pub fn split_frame<'a>(
    buf: &'a [u8],
    limits: &CodecLimits,
) -> Result<Option<(&'a [u8], usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = frame_len(*prefix, limits)?;
    let end = LEN_PREFIX + len;
    Ok(buf.get(LEN_PREFIX..end).map(|body| (body, end)))
}

/// Decodes a frame body (without its prefix) after [`validate`] accepts it.
pub fn decode<T: DeserializeOwned>(body: &[u8], limits: &CodecLimits) -> Result<T, DecodeError> {
    if body.len() > limits.frame_bytes_max as usize {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: limits.frame_bytes_max,
        }
        .into());
    }
    validate(body, limits.depth_max)?;
    rmp_serde::from_slice(body).map_err(|e| DecodeError::Schema(e.to_string()))
}

/// Decodes a whole frame, prefix included; the frame must be exactly `frame`.
pub fn decode_frame<T: DeserializeOwned>(
    frame: &[u8],
    limits: &CodecLimits,
) -> Result<T, DecodeError> {
    match split_frame(frame, limits)? {
        Some((body, used)) if used == frame.len() => decode(body, limits),
        Some(_) => Err(DecodeError::Malformed {
            offset: frame.len(),
            reason: "bytes after frame",
        }),
        None => {
            let needed = match frame.first_chunk::<LEN_PREFIX>() {
                Some(p) => LEN_PREFIX + u32::from_be_bytes(*p) as usize,
                None => LEN_PREFIX,
            };
            Err(FrameError::Truncated {
                needed,
                had: frame.len(),
            }
            .into())
        }
    }
}

/// Walks one MessagePack value that must fill `body` exactly, without
/// allocating: checks every marker, that nesting stays within `depth_max`, and
/// that no length claims more bytes or elements than remain.
pub fn validate(body: &[u8], depth_max: u32) -> Result<(), DecodeError> {
    // `pending[i]` is how many values the container at depth i still holds;
    // the bottom entry is the single top-level value.
    let mut pending: Vec<u64> = Vec::with_capacity(8);
    pending.push(1);
    let mut pos = 0usize;
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let at = pos;
        let marker = *body.get(pos).ok_or(DecodeError::Malformed {
            offset: pos,
            reason: "unexpected end of message",
        })?;
        pos += 1;
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => {
                return Err(DecodeError::Malformed {
                    offset: at,
                    reason: "reserved marker 0xc1",
                })
            }
            0xc4 | 0xd9 => (read_uint(body, &mut pos, 1)?, 0),
            0xc5 | 0xda => (read_uint(body, &mut pos, 2)?, 0),
            0xc6 | 0xdb => (read_uint(body, &mut pos, 4)?, 0),
            0xc7 => (read_uint(body, &mut pos, 1)? + 1, 0),
            0xc8 => (read_uint(body, &mut pos, 2)? + 1, 0),
            0xc9 => (read_uint(body, &mut pos, 4)? + 1, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, read_uint(body, &mut pos, 2)?),
            0xdd => (0, read_uint(body, &mut pos, 4)?),
            0xde => (0, 2 * read_uint(body, &mut pos, 2)?),
            0xdf => (0, 2 * read_uint(body, &mut pos, 4)?),
        };
        let remaining = body.len() - pos;
        if skip > remaining as u64 {
            return Err(DecodeError::LengthOverrun {
                what: "bytes",
                claimed: skip,
                remaining,
                offset: at,
            });
        }
        pos += skip as usize;
        if children > 0 {
            // Every element takes at least one byte.
            if children > (body.len() - pos) as u64 {
                return Err(DecodeError::LengthOverrun {
                    what: "elements",
                    claimed: children,
                    remaining: body.len() - pos,
                    offset: at,
                });
            }
            if pending.len() as u64 > u64::from(depth_max) {
                return Err(DecodeError::TooDeep { max: depth_max });
            }
            pending.push(children);
        }
    }
    if pos != body.len() {
        return Err(DecodeError::Malformed {
            offset: pos,
            reason: "bytes after the message",
        });
    }
    Ok(())
}

fn read_uint(body: &[u8], pos: &mut usize, width: usize) -> Result<u64, DecodeError> {
    let bytes = body.get(*pos..*pos + width).ok_or(DecodeError::Malformed {
        offset: *pos,
        reason: "length field truncated",
    })?;
    *pos += width;
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{ClusterStatus, HeadReply, HeadRequest, NodeState, NodeStatus};
    use crate::hello::{HandshakeRefusal, Hello, HelloReply, Role};
    use crate::hex;
    use crate::ids::{ClusterId, NodeId};
    use crate::node::{NodeReply, NodeRequest};
    use crate::resources::ResourceSet;
    use crate::rpc::{ReplyEnvelope, RequestEnvelope};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn round_trip<T>(msg: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut frame = Vec::new();
        encode_frame(msg, &CodecLimits::CONTROL, &mut frame).expect("encodes");
        let back: T = decode_frame(&frame, &CodecLimits::CONTROL).expect("decodes");
        assert_eq!(&back, msg);
    }

    proptest! {
        #[test]
        fn hello_round_trips(msg: Hello) { round_trip(&msg) }
        #[test]
        fn hello_reply_round_trips(msg: HelloReply) { round_trip(&msg) }
        #[test]
        fn head_request_round_trips(msg: RequestEnvelope<HeadRequest>) { round_trip(&msg) }
        #[test]
        fn head_reply_round_trips(msg: ReplyEnvelope<HeadReply>) { round_trip(&msg) }
        #[test]
        fn node_request_round_trips(msg: RequestEnvelope<NodeRequest>) { round_trip(&msg) }
        #[test]
        fn node_reply_round_trips(msg: ReplyEnvelope<NodeReply>) { round_trip(&msg) }

        #[test]
        fn worker_request_round_trips(msg: RequestEnvelope<crate::worker::WorkerRequest>) { round_trip(&msg) }
        #[test]
        fn worker_reply_round_trips(msg: ReplyEnvelope<crate::worker::WorkerReply>) { round_trip(&msg) }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<RequestEnvelope<HeadRequest>>(&bytes, &CodecLimits::CONTROL);
            let _ = decode::<Hello>(&bytes, &CodecLimits::HANDSHAKE);
        }
    }

    const CLUSTER: ClusterId =
        ClusterId::from_uuid(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef));
    const NODE: NodeId =
        NodeId::from_uuid(Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888));

    /// Pins the handshake's bytes: a change here breaks every deployed peer.
    #[test]
    fn golden_hello() {
        let hello = Hello {
            protocol_version: 1,
            cluster_id: CLUSTER,
            role: Role::Node,
            token_proof: vec![0xaa; 4],
            node_proof: Vec::new(),
        };
        let mut frame = Vec::new();
        encode_frame(&hello, &CodecLimits::HANDSHAKE, &mut frame).expect("encodes");
        assert_eq!(hex::encode(&frame), GOLDEN_HELLO);
    }

    /// Pins a request envelope around a unit variant and a struct variant.
    #[test]
    fn golden_head_requests() {
        let status = RequestEnvelope {
            id: 7,
            timeout_ms: 5000,
            body: HeadRequest::GetClusterStatus,
        };
        assert_eq!(
            hex::encode(&encode(&status).expect("encodes")),
            GOLDEN_GET_STATUS
        );
        let mut resources = ResourceSet::new();
        resources.set("CPU", 2.0);
        let heartbeat = RequestEnvelope {
            id: 8,
            timeout_ms: 1000,
            body: HeadRequest::Heartbeat {
                node_id: NODE,
                resources_available: resources,
                jobs: vec![],
                dead_workers: vec![],
                object_store_used_bytes: 0,
                object_changes: vec![],
                objects_pulled: 0,
                orders_acked: 0,
                registration_key: 0,
            },
        };
        assert_eq!(
            hex::encode(&encode(&heartbeat).expect("encodes")),
            GOLDEN_HEARTBEAT
        );
    }

    /// Pins the reply shapes: `Ok`/`Err` results and the node state names.
    #[test]
    fn golden_replies() {
        let refused = HelloReply::Refused(HandshakeRefusal::BadToken);
        assert_eq!(
            hex::encode(&encode(&refused).expect("encodes")),
            GOLDEN_REFUSED
        );
        let status = ReplyEnvelope {
            id: 7,
            result: Ok(HeadReply::ClusterStatus(ClusterStatus {
                cluster_id: CLUSTER,
                nodes: vec![NodeStatus {
                    node_id: NODE,
                    address: "127.0.0.1:1".into(),
                    state: NodeState::Dead,
                    pid: 9,
                    hostname: "h".into(),
                    host_id: String::new(),
                    is_head_node: false,
                    resources_total: ResourceSet::new(),
                    resources_available: ResourceSet::new(),
                    last_heartbeat_ms_ago: 0,
                    object_store_used_bytes: 0,
                    object_store_capacity_bytes: 0,
                    objects_pulled: 0,
                    metrics_address: None,
                    labels: Default::default(),
                }],
                handshakes_refused: 0,
                infeasible: vec![],
                placement_groups: vec![],
            })),
        };
        assert_eq!(
            hex::encode(&encode(&status).expect("encodes")),
            GOLDEN_STATUS
        );
    }

    /// The wire rule at work: bytes from a peer that predates a field still
    /// decode, the field taking its default.
    #[test]
    fn replies_without_later_fields_still_decode() {
        let bytes = hex::decode(GOLDEN_STATUS_V1).expect("hex");
        let reply: ReplyEnvelope<HeadReply> =
            decode(&bytes, &CodecLimits::CONTROL).expect("decodes");
        match reply.result {
            Ok(HeadReply::ClusterStatus(status)) => {
                assert_eq!(status.nodes.len(), 1);
                assert!(status.infeasible.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heartbeats_without_later_fields_still_decode() {
        let bytes = hex::decode(GOLDEN_HEARTBEAT_V1).expect("hex");
        let request: RequestEnvelope<HeadRequest> =
            decode(&bytes, &CodecLimits::CONTROL).expect("decodes");
        match request.body {
            HeadRequest::Heartbeat {
                node_id,
                jobs,
                dead_workers,
                ..
            } => {
                assert_eq!(node_id, NODE);
                assert!(jobs.is_empty() && dead_workers.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn golden_node_ping() {
        let ping = RequestEnvelope {
            id: 1,
            timeout_ms: 1,
            body: NodeRequest::Ping,
        };
        assert_eq!(hex::encode(&encode(&ping).expect("encodes")), GOLDEN_PING);
    }

    const GOLDEN_HELLO: &str = "0000004c84b070726f746f636f6c5f76657273696f6e01aa636c75737465725f6964c4100123456789abcdef0123456789abcdefa4726f6c65a44e6f6465ab746f6b656e5f70726f6f66c404aaaaaaaa";
    const GOLDEN_GET_STATUS: &str =
        "83a2696407aa74696d656f75745f6d73cd1388a4626f6479b0476574436c7573746572537461747573";
    /// Protocol 3: the heartbeat ends with `registration_key`.
    const GOLDEN_HEARTBEAT: &str = "83a2696408aa74696d656f75745f6d73cd03e8a4626f647981a948656172746265617489a76e6f64655f6964c41011112222333344445555666677778888b37265736f75726365735f617661696c61626c6581a3435055cb4000000000000000a46a6f627390ac646561645f776f726b65727390b76f626a6563745f73746f72655f757365645f627974657300ae6f626a6563745f6368616e67657390ae6f626a656374735f70756c6c656400ac6f72646572735f61636b656400b0726567697374726174696f6e5f6b657900";
    /// The heartbeat as first shipped, before `jobs` and `dead_workers`.
    const GOLDEN_HEARTBEAT_V1: &str = "83a2696408aa74696d656f75745f6d73cd03e8a4626f647981a948656172746265617482a76e6f64655f6964c41011112222333344445555666677778888b37265736f75726365735f617661696c61626c6581a3435055cb4000000000000000";
    const GOLDEN_REFUSED: &str = "81a752656675736564a8426164546f6b656e";
    const GOLDEN_STATUS: &str = "82a2696407a6726573756c7481a24f6b81ad436c757374657253746174757384aa636c75737465725f6964c4100123456789abcdef0123456789abcdefa56e6f646573918da76e6f64655f6964c41011112222333344445555666677778888a761646472657373ab3132372e302e302e313a31a57374617465a444454144a370696409a8686f73746e616d65a168a7686f73745f6964a0ac69735f686561645f6e6f6465c2af7265736f75726365735f746f74616c80b37265736f75726365735f617661696c61626c6580b56c6173745f6865617274626561745f6d735f61676f00b76f626a6563745f73746f72655f757365645f627974657300bb6f626a6563745f73746f72655f63617061636974795f627974657300ae6f626a656374735f70756c6c656400b268616e647368616b65735f7265667573656400aa696e6665617369626c6590";
    /// The same reply as first shipped, before `infeasible` was added.
    const GOLDEN_STATUS_V1: &str = "82a2696407a6726573756c7481a24f6b81ad436c757374657253746174757383aa636c75737465725f6964c4100123456789abcdef0123456789abcdefa56e6f6465739189a76e6f64655f6964c41011112222333344445555666677778888a761646472657373ab3132372e302e302e313a31a57374617465a444454144a370696409a8686f73746e616d65a168ac69735f686561645f6e6f6465c2af7265736f75726365735f746f74616c80b37265736f75726365735f617661696c61626c6580b56c6173745f6865617274626561745f6d735f61676f00b268616e647368616b65735f7265667573656400";
    const GOLDEN_PING: &str = "83a2696401aa74696d656f75745f6d7301a4626f6479a450696e67";

    #[test]
    fn length_prefix_of_4_gib_is_refused_before_allocating() {
        let frame = [0xff, 0xff, 0xff, 0xff, 0x00];
        let err =
            decode_frame::<Hello>(&frame, &CodecLimits::CONTROL).expect_err("must be refused");
        assert_eq!(
            err,
            DecodeError::Frame(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 16 << 20
            })
        );
    }

    #[test]
    fn array_claiming_2_pow_32_items_is_refused() {
        // array32 with count 0xffffffff and one element byte.
        let body = [0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0];
        let err = decode::<Vec<u8>>(&body, &CodecLimits::CONTROL).expect_err("must be refused");
        assert!(
            matches!(
                err,
                DecodeError::LengthOverrun {
                    what: "elements",
                    claimed: 0xffff_ffff,
                    ..
                }
            ),
            "{err:?}"
        );
        // map32 claiming 2^32-1 pairs.
        let body = [0xdf, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<HeadRequest>(&body, &CodecLimits::CONTROL),
            Err(DecodeError::LengthOverrun { .. })
        ));
        // bin32 claiming 4 GiB of bytes.
        let body = [0xc6, 0xff, 0xff, 0xff, 0xff, 0x00];
        assert!(matches!(
            decode::<Vec<u8>>(&body, &CodecLimits::CONTROL),
            Err(DecodeError::LengthOverrun { what: "bytes", .. })
        ));
    }

    #[test]
    fn nesting_10_000_deep_is_refused() {
        let mut body = vec![0x91; 10_000];
        body.push(0xc0);
        let err = decode::<HeadRequest>(&body, &CodecLimits::CONTROL).expect_err("must be refused");
        assert_eq!(err, DecodeError::TooDeep { max: 64 });
    }

    #[test]
    fn nesting_at_the_limit_is_accepted_by_the_walker() {
        let limits = CodecLimits {
            frame_bytes_max: 1024,
            depth_max: 4,
        };
        let ok = [0x91, 0x91, 0x91, 0x91, 0xc0];
        assert_eq!(validate(&ok, limits.depth_max), Ok(()));
        let too_deep = [0x91, 0x91, 0x91, 0x91, 0x91, 0xc0];
        assert_eq!(
            validate(&too_deep, limits.depth_max),
            Err(DecodeError::TooDeep { max: 4 })
        );
    }

    #[test]
    fn trailing_bytes_and_truncation_are_refused() {
        assert!(matches!(
            validate(&[0xc0, 0xc0], 8),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            validate(&[0x92, 0xc0], 8),
            Err(DecodeError::LengthOverrun { .. })
        ));
        assert!(matches!(
            validate(&[], 8),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            validate(&[0xc1], 8),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode_frame::<Hello>(&[0, 0, 0, 9, 0x80], &CodecLimits::CONTROL),
            Err(DecodeError::Frame(FrameError::Truncated {
                needed: 13,
                had: 5
            }))
        ));
    }

    #[test]
    fn wrong_type_is_a_schema_error() {
        let body = encode(&NodeRequest::Ping).expect("encodes");
        assert!(matches!(
            decode::<Hello>(&body, &CodecLimits::CONTROL),
            Err(DecodeError::Schema(_))
        ));
    }

    #[test]
    fn encode_refuses_frames_over_the_limit() {
        let limits = CodecLimits {
            frame_bytes_max: 8,
            depth_max: 8,
        };
        let mut out = vec![1, 2];
        let err = encode_frame(&"a string well over eight bytes", &limits, &mut out)
            .expect_err("must be refused");
        assert!(matches!(err, EncodeError::TooLarge { max: 8, .. }));
        assert_eq!(
            out,
            vec![1, 2],
            "a refused frame leaves the buffer as it was"
        );
    }

    #[test]
    fn split_frame_waits_for_the_whole_frame() {
        let mut frame = Vec::new();
        encode_frame(&NodeRequest::Ping, &CodecLimits::CONTROL, &mut frame).expect("encodes");
        for cut in 0..frame.len() {
            assert_eq!(split_frame(&frame[..cut], &CodecLimits::CONTROL), Ok(None));
        }
        let (body, used) = split_frame(&frame, &CodecLimits::CONTROL)
            .expect("ok")
            .expect("whole");
        assert_eq!(used, frame.len());
        assert_eq!(
            decode::<NodeRequest>(body, &CodecLimits::CONTROL),
            Ok(NodeRequest::Ping)
        );
    }
}
