//! The peer transport over loopback: authentication, framing, bad input. The listener
//! must keep serving after every bad client.

use std::time::Duration;

use tandem::core::wire::Msg;
use tandem::shell::net::{accept, connect, read_frame, write_frame, Attached, NetError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const SECRET: &[u8] = b"correct horse battery staple";

fn attach() -> Attached {
    Attached {
        resource: "pg".into(),
        node: "alpha".into(),
        channel: 0,
    }
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<Result<Attached, String>>,
) -> Result<Attached, String> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("listener answered within 10 s")
        .expect("channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_authenticates_and_survives_bad_clients() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Attached, String>>();
    let server = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match accept(s, SECRET).await {
                    Ok((mut s, a)) => {
                        let _ = tx.send(Ok(a));
                        // Echo one data frame back.
                        if let Ok(f) = read_frame(&mut s).await {
                            let d = f.data.map(|d| d.as_slice().to_vec()).unwrap_or_default();
                            let _ = write_frame(&mut s, &f.msg, &d).await;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    // 1. Random bytes on the port.
    let mut junk = TcpStream::connect(addr).await.expect("connect");
    junk.write_all(&[0xde; 64]).await.expect("send junk");
    let e = next(&mut rx).await.expect_err("junk refused");
    assert!(e.contains("bad frame magic"), "{e}");

    // 2. A client with the wrong secret: refused on both sides.
    let r = connect(addr, b"wrong secret", &attach()).await;
    assert!(matches!(r, Err(NetError::Auth(_))), "{r:?}");
    let e = next(&mut rx).await.expect_err("wrong secret refused");
    assert!(e.contains("authentication") || e.contains("i/o"), "{e}");

    // 3. A frame with a corrupted CRC after a valid header.
    let mut bad = TcpStream::connect(addr).await.expect("connect");
    let mut f = Msg::AuthChallenge { nonce: [9; 32] }.encode(0, &[]);
    let last = f.len() - 1;
    f[last] ^= 1;
    bad.write_all(&f).await.expect("send");
    let e = next(&mut rx).await.expect_err("bad crc refused");
    assert!(e.contains("CRC"), "{e}");

    // 4. The right secret: authenticated, attached, and a data frame round-trips.
    let mut s = connect(addr, SECRET, &attach())
        .await
        .expect("authenticated");
    assert_eq!(next(&mut rx).await.expect("accepted"), attach());
    let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let m = Msg::Data {
        seq: 1,
        epoch: 1,
        offset: 8192,
        len: 4096,
    };
    write_frame(&mut s, &m, &payload).await.expect("send data");
    let back = read_frame(&mut s).await.expect("echo");
    assert_eq!(back.msg, m);
    assert_eq!(back.data.expect("payload").as_slice(), &payload[..]);
    server.abort();
}

/// A socket that hands out what was "sent" in fixed slices, saying `WouldBlock` after
/// each, as a non-blocking socket does between arrivals.
struct Trickle {
    bytes: Vec<u8>,
    pos: usize,
    slice: usize,
    ready: bool,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.bytes.len() {
            return Ok(0);
        }
        if !self.ready {
            self.ready = true;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.ready = false;
        let n = buf.len().min(self.slice).min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn data_frame(seq: u64, len: usize) -> (Vec<u8>, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + seq) as u8).collect();
    let msg = Msg::Data {
        seq,
        epoch: 1,
        offset: seq * 4096,
        len: len as u32,
    };
    let mut f = msg.encode(9, &data);
    f.extend_from_slice(&data);
    (f, data)
}

#[test]
fn frame_reader_reassembles_frames_from_any_slicing() {
    use tandem::shell::net::{FrameReader, ReadState};
    // Small frames, a 4 KiB write, a 1 MiB resync-sized write (read straight into its
    // buffer), pings between.
    let mut stream = Vec::new();
    let mut want = Vec::new();
    for (seq, len) in [(1u64, 4096usize), (2, 1 << 20), (3, 8192)] {
        let ping = Msg::Ping { id: seq };
        stream.extend_from_slice(&ping.encode(9, &[]));
        want.push((ping, None));
        let (f, d) = data_frame(seq, len);
        stream.extend_from_slice(&f);
        want.push((
            Msg::Data {
                seq,
                epoch: 1,
                offset: seq * 4096,
                len: len as u32,
            },
            Some(d),
        ));
    }
    for slice in [1usize, 7, 28, 4096, 65536, 1 << 22] {
        let mut sock = Trickle {
            bytes: stream.clone(),
            pos: 0,
            slice,
            ready: true,
        };
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 10_000_000, "slice {slice}: no end");
            match r.read_available(&mut sock, &mut got, 1 << 20) {
                Ok(ReadState::Eof) => break,
                Ok(ReadState::WouldBlock | ReadState::Budget) => {}
                Err(e) => panic!("slice {slice}: {e}"),
            }
        }
        assert_eq!(got.len(), want.len(), "slice {slice}");
        for (f, (m, d)) in got.iter().zip(&want) {
            assert_eq!(&f.msg, m, "slice {slice}");
            assert_eq!(f.term, 9);
            assert_eq!(
                f.data.as_ref().map(|b| b.as_slice().to_vec()),
                *d,
                "slice {slice}"
            );
        }
    }
}

#[test]
fn frame_reader_returns_good_frames_then_the_error() {
    use tandem::shell::net::FrameReader;
    let (good, _) = data_frame(1, 4096);
    let (mut bad, _) = data_frame(2, 4096);
    let last = bad.len() - 1;
    bad[last] ^= 0xff; // a flipped data byte: the CRC no longer matches
    let mut bytes = good.clone();
    bytes.extend_from_slice(&bad);
    let mut sock = Trickle {
        bytes,
        pos: 0,
        slice: 1 << 20,
        ready: true,
    };
    let mut r = FrameReader::default();
    let mut got = Vec::new();
    let err = r
        .read_available(&mut sock, &mut got, 1 << 20)
        .expect_err("a corrupt frame is an error");
    assert!(matches!(err, NetError::Wire(_)), "{err}");
    assert_eq!(got.len(), 1, "the good frame before it is delivered");
    // Garbage where a header should be: refused by its magic.
    let mut sock = Trickle {
        bytes: vec![0x55; 100],
        pos: 0,
        slice: 100,
        ready: true,
    };
    let mut got = Vec::new();
    assert!(FrameReader::default()
        .read_available(&mut sock, &mut got, 1 << 20)
        .is_err());
    assert!(got.is_empty());
}
