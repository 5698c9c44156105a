//! Bitmap, activity log, superblock and frame codec: round trips and rejections.

use tandem::core::al::{ActivityLog, AlTxn, TXN_BYTES};
use tandem::core::bitmap::Bitmap;
use tandem::core::meta::{Layout, MetaError, Metadata, Superblock, FLAG_CONSISTENT};
use tandem::core::uuid::Generation;
use tandem::core::wire::{decode_frame, frame_term, Hello, Msg, WireError, HEADER_BYTES};

#[test]
fn bitmap_set_clear_runs_and_pages() {
    let mut b = Bitmap::new(10 * 4096 + 100, 4096);
    assert_eq!(b.nbits(), 11);
    b.set_range(4095, 2); // touches blocks 0 and 1
    assert_eq!(b.count(), 2);
    b.set_range(8 * 4096, 3 * 4096);
    assert_eq!(b.runs(), vec![(0, 2), (8, 3)]);
    b.clear_range(100, 4096); // covers no whole block
    assert_eq!(b.count(), 5);
    b.clear_range(4096, 4096);
    assert_eq!(b.runs(), vec![(0, 1), (8, 3)]);
    assert_eq!(b.out_of_sync_bytes(), 4 * 4096);
    assert_eq!(b.dirty_page_indices(), vec![0]);
    let page = b.take_page(0);
    assert!(b.dirty_page_indices().is_empty());
    let mut c = Bitmap::new(10 * 4096 + 100, 4096);
    c.load(&page);
    assert_eq!(c.runs(), b.runs());
    assert_eq!(c.count(), 4);
    assert_eq!(c.next_set(1), Some(8));
    c.set_all();
    assert_eq!(c.count(), 11);
}

#[test]
fn activity_log_evicts_idle_extents_only() {
    let mut al = ActivityLog::new(2, 4 << 20, 4);
    let e0 = al.extents_of(0, 4096);
    let (ev, t1, _) = al.plan(e0.clone()).expect("room");
    assert!(ev.is_empty());
    al.acquire(e0.clone());
    let e1 = al.extents_of(4 << 20, 4096);
    al.plan(e1.clone()).expect("room");
    al.acquire(e1.clone());
    let e2 = al.extents_of(8 << 20, 4096);
    assert!(al.plan(e2.clone()).is_err(), "both slots busy");
    al.release(e0);
    let (ev, t3, slot) = al.plan(e2).expect("extent 0 is idle now");
    assert_eq!(ev, vec![0]);
    assert_eq!(t3.extents, vec![1, 2]);
    assert!(t3.number > t1.number);
    assert!(slot < 4);
}

#[test]
fn activity_log_recovers_newest_valid_transaction() {
    let mut ring = vec![0u8; 4 * TXN_BYTES];
    let t1 = AlTxn {
        number: 7,
        extents: vec![1, 2, 3],
    };
    let t2 = AlTxn {
        number: 8,
        extents: vec![2, 3, 9],
    };
    ring[TXN_BYTES..2 * TXN_BYTES].copy_from_slice(&t1.encode());
    ring[2 * TXN_BYTES..3 * TXN_BYTES].copy_from_slice(&t2.encode());
    assert_eq!(AlTxn::newest_in_ring(&ring), Some(t2.clone()));
    // A torn write of the newest block: recovery falls back to the one before.
    ring[2 * TXN_BYTES + 20] ^= 0xFF;
    assert_eq!(AlTxn::newest_in_ring(&ring), Some(t1));
    assert_eq!(AlTxn::decode(&[0u8; TXN_BYTES]), None);
}

fn sample_sb() -> Superblock {
    let layout = Layout::compute(64 << 20, 4096, 16).expect("layout");
    let mut sb = Superblock::fresh(layout, "pg", "alpha", 4 << 20, 64, Some(0xABCD));
    sb.gen = Generation {
        current: 0x1234_5670,
        bitmap: 0x99,
        history: [1, 2, 3, 0x10],
    };
    sb.term = 0x0102_0304_0506;
    sb
}

#[test]
fn layout_fits_and_leaves_data_first() {
    let l = Layout::compute(64 << 20, 4096, 16).expect("layout");
    assert!(l.data_bytes <= l.bitmap_offset);
    assert!(l.bitmap_offset + l.bitmap_bytes <= l.al_offset);
    assert_eq!(l.al_offset + 16 * 4096, l.superblock_offset);
    assert_eq!(l.superblock_offset + 4096, 64 << 20);
    assert!(l.data_bytes > 63 << 20);
    assert!(matches!(
        Layout::compute(16 * 1024, 4096, 16),
        Err(MetaError::TooSmall(_))
    ));
}

#[test]
fn superblock_round_trip_and_rejections() {
    let sb = sample_sb();
    assert!(sb.has(FLAG_CONSISTENT));
    let bytes = sb.encode();
    let off = sb.layout.superblock_offset;
    assert_eq!(Superblock::decode(&bytes, off), Ok(sb.clone()));
    let mut bad = bytes.clone();
    bad[80] ^= 1;
    assert!(matches!(
        Superblock::decode(&bad, off),
        Err(MetaError::BadCrc { .. })
    ));
    assert!(matches!(
        Superblock::decode(&[0u8; 4096], off),
        Err(MetaError::NoMagic(_))
    ));
    assert!(
        Superblock::decode(&bytes, off + 4096).is_err(),
        "wrong place"
    );
    let msg = Superblock::decode(&bad, off).unwrap_err().to_string();
    assert!(msg.contains("corrupt"), "{msg}");
}

#[test]
fn metadata_read_with_reads_all_areas() {
    let sb = sample_sb();
    let mut dev = vec![0u8; 64 << 20];
    let o = sb.layout.superblock_offset as usize;
    dev[o..o + 4096].copy_from_slice(&sb.encode());
    let md = Metadata::read_with(64 << 20, |off, len| {
        dev[off as usize..off as usize + len].to_vec()
    })
    .expect("valid metadata");
    assert_eq!(md.sb, sb);
    assert_eq!(md.bitmap_bytes.len() as u64, sb.layout.bitmap_bytes);
    assert_eq!(md.al_ring.len(), 16 * 4096);
}

fn all_messages() -> Vec<Msg> {
    vec![
        Msg::AuthChallenge { nonce: [7; 32] },
        Msg::AuthResponse {
            nonce: [1; 32],
            mac: [2; 32],
        },
        Msg::AuthProof { mac: [3; 32] },
        Msg::Attach {
            resource: "pg".into(),
            node: "alpha".into(),
            channel: 1,
        },
        Msg::Hello(Hello {
            version: 1,
            resource: "pg".into(),
            node: "beta".into(),
            data_bytes: 1 << 30,
            block_bytes: 4096,
            gen: Generation {
                current: 5,
                bitmap: 6,
                history: [7, 8, 9, 10],
            },
            flags: 3,
            gen_term: 12,
        }),
        Msg::BitmapRuns {
            runs: vec![(0, 5), (100, 1)],
        },
        Msg::BitmapEnd,
        Msg::Barrier { epoch: 9 },
        Msg::RecvAck { seq: 1 },
        Msg::WriteAck { seq: 2 },
        Msg::NegAck { seq: 3 },
        Msg::BarrierAck { epoch: 9 },
        Msg::ResyncAck {
            offset: 4096,
            len: 8192,
            ok: true,
        },
        Msg::ResyncDone {
            gen: Generation::default(),
        },
        Msg::State {
            primary: true,
            disk: 1,
        },
        Msg::Ping { id: 77 },
        Msg::PingAck { id: 77 },
        Msg::WitnessRequest(tandem::core::witness::Request {
            op: tandem::core::witness::Op::Outdate,
            resource: "pg".into(),
            term: 9,
            peer: "beta".into(),
            uptodate: true,
            force: true,
            primary: true,
            seq: 0,
        }),
        Msg::WitnessReply(tandem::core::witness::Reply {
            granted: false,
            term: 9,
            lease_ms: 2000,
            primary: "alpha".into(),
            up_to_date: vec!["alpha".into(), "beta".into()],
            reason: "stale term".into(),
        }),
    ]
}

#[test]
fn frames_round_trip() {
    for (k, m) in all_messages().into_iter().enumerate() {
        let term = 7 + k as u64;
        let b = m.encode(term, &[]);
        let (got, data, used) = decode_frame(&b).expect("valid").expect("complete");
        assert_eq!(got, m);
        assert_eq!(frame_term(&b), Some(term), "the header carries the term");
        assert!(data.is_empty());
        assert_eq!(used, b.len());
    }
    let payload = vec![0x5A; 4096];
    let m = Msg::Data {
        seq: 1,
        epoch: 2,
        offset: 8192,
        len: 4096,
    };
    let mut b = m.encode(3, &payload);
    b.extend_from_slice(&payload);
    let (got, data, _) = decode_frame(&b).expect("valid").expect("complete");
    assert_eq!(got, m);
    assert_eq!(data, &payload[..]);
    // A partial frame asks for more.
    assert_eq!(decode_frame(&b[..b.len() - 1]), Ok(None));
}

#[test]
fn frames_reject_bad_input() {
    let m = Msg::Ping { id: 1 };
    let good = m.encode(5, &[]);
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xFF;
    assert!(matches!(decode_frame(&bad_magic), Err(WireError::Magic(_))));
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    assert_eq!(decode_frame(&bad_crc), Err(WireError::Crc));
    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode_frame(&huge), Err(WireError::TooLarge(..))));
    // Unknown kind, with a correct CRC.
    let mut unknown = good.clone();
    unknown[4] = 200;
    let mut h = crc32fast::Hasher::new();
    h.update(&unknown[0..24]);
    h.update(&unknown[HEADER_BYTES..]);
    unknown[24..28].copy_from_slice(&h.finalize().to_le_bytes());
    assert_eq!(decode_frame(&unknown), Err(WireError::Kind(200)));
    // The term is covered by the CRC: a forged term is a corrupt frame.
    let mut forged = good.clone();
    forged[16] ^= 1;
    assert_eq!(decode_frame(&forged), Err(WireError::Crc));
    // Random bytes never panic.
    let mut rng = tandem::core::SplitMix64(1);
    for _ in 0..2000 {
        let n = rng.below(64) as usize;
        let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        let _ = decode_frame(&junk);
    }
}

#[test]
fn codec_round_trips_and_never_reads_past_the_end() {
    use tandem::core::codec::{self, Reader, Writer};
    let mut w = Writer::default();
    w.u8(0xAB);
    w.u16(0xBEEF);
    w.u32(0xDEAD_BEEF);
    w.u64(u64::MAX - 1);
    w.str8("alpha");
    w.str8(&"x".repeat(300));
    let b = w.into_inner();
    // Little-endian, fixed width, a one-byte length before a string (cut at 255).
    assert_eq!(&b[..7], &[0xAB, 0xEF, 0xBE, 0xEF, 0xBE, 0xAD, 0xDE]);
    assert_eq!(b.len(), 1 + 2 + 4 + 8 + 1 + 5 + 1 + 255);
    let mut r = Reader::new(&b);
    assert_eq!(r.u8(), Some(0xAB));
    assert_eq!(r.u16(), Some(0xBEEF));
    assert_eq!(r.u32(), Some(0xDEAD_BEEF));
    assert_eq!(r.u64(), Some(u64::MAX - 1));
    assert_eq!(r.str8().as_deref(), Some("alpha"));
    assert_eq!(r.str8().map(|s| s.len()), Some(255));
    assert!(r.is_empty());
    // Short input: None, never a panic.
    for n in 0..8 {
        assert_eq!(Reader::new(&b[..n.min(b.len())]).u64().is_some(), n >= 8);
    }
    assert_eq!(
        Reader::new(&[5, b'a', b'b']).str8(),
        None,
        "length past the end"
    );
    assert_eq!(Reader::new(&[2, 0xFF, 0xFE]).str8(), None, "not UTF-8");
    // Fixed offsets.
    let mut rec = vec![0u8; 16];
    codec::put_u64(&mut rec, 8, 42);
    codec::put_u16(&mut rec, 2, 7);
    assert_eq!(codec::u64_at(&rec, 8), Some(42));
    assert_eq!(codec::u16_at(&rec, 2), Some(7));
    assert_eq!(codec::u64_at(&rec, 9), None);
    assert_eq!(codec::u32_at(&rec, usize::MAX - 1), None);
}
