//! Feeds arbitrary bytes to the frame decoder, as a hostile or broken peer would.
//!
//! Checks beyond "no panic": a frame that decodes must re-encode and decode to the same value, and the
//! decoder must refuse any frame over its maximum before consuming it.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shared::envelope::Envelope;
use shared::wire::{check, decode, parse, DecodeError};

/// Small enough that the fuzzer reaches both sides of the limit.
const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // As a stream: split frames off the front until the bytes run out or turn invalid.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode(&mut buf, MAX_FRAME) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                frame
                    .encode(&mut again)
                    .expect("a decoded frame always fits its own format");
                let redecoded = decode(&mut again, usize::MAX).expect("re-encoded frame decodes");
                assert_eq!(redecoded.as_ref(), Some(&frame));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(
                    buf.len(),
                    before,
                    "an incomplete frame is left in the buffer"
                );
                break;
            }
            Err(DecodeError::FrameTooLarge { len, max }) => {
                assert!(len > max);
                assert_eq!(
                    buf.len(),
                    before,
                    "an oversized frame is refused before it is consumed"
                );
                break;
            }
            Err(_) => break,
        }
    }

    // The pieces on their own: contents without a prefix, and the bytes as a queue record.
    let _ = check(data, MAX_FRAME);
    let _ = parse(Bytes::copy_from_slice(data));
    if let Ok(env) = Envelope::decode_body(1, Bytes::copy_from_slice(data)) {
        let mut body = BytesMut::new();
        env.encode_body(&mut body)
            .expect("a decoded envelope always fits its own format");
        assert_eq!(Envelope::decode_body(1, body.freeze()).as_ref(), Ok(&env));
    }
});
