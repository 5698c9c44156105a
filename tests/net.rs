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
