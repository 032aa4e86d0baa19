//! Control messages (postcard) from arbitrary bytes: never a panic, and whatever decodes
//! re-encodes to something that decodes to the same message.
#![no_main]

use ferry_wire::{ControlMessage, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::from_bytes(data) {
        let frame = Frame::encode_control(&msg).expect("a decoded message encodes");
        match Frame::decode(&frame) {
            Ok((Frame::Control(again), _)) => assert_eq!(again, msg),
            other => panic!("re-encoded control message decoded as {other:?}"),
        }
    }
});
