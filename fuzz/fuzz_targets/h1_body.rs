//! The inline HTTP/1 client's body framing: arbitrary bytes decoded as a length, chunked or
//! close-delimited body, and well-formed chunked bodies, each read in arbitrary pieces; the
//! properties are in `safelb_proxy::fuzzing::{body_framing, chunked_roundtrip}`.
#![no_main]

use arbitrary::Arbitrary;
use safelb_proxy::fuzzing::{body_framing, chunked_roundtrip, Framing};

#[derive(Arbitrary, Debug)]
enum Input {
    Length(u16, Vec<u16>, Vec<u8>),
    Chunked(Vec<u16>, Vec<u8>),
    Close(Vec<u16>, Vec<u8>),
    Encoded {
        chunks: Vec<Vec<u8>>,
        trailers: Vec<(u8, u8)>,
        extensions: bool,
        cuts: Vec<u16>,
    },
}

fn offsets(cuts: &[u16]) -> Vec<usize> {
    cuts.iter().map(|&c| usize::from(c)).collect()
}

libfuzzer_sys::fuzz_target!(|input: Input| match input {
    Input::Length(n, cuts, wire) => body_framing(Framing::Length(u64::from(n)), &wire, &offsets(&cuts)),
    Input::Chunked(cuts, wire) => body_framing(Framing::Chunked, &wire, &offsets(&cuts)),
    Input::Close(cuts, wire) => body_framing(Framing::Close, &wire, &offsets(&cuts)),
    Input::Encoded {
        chunks,
        trailers,
        extensions,
        cuts,
    } => {
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let trailers: Vec<(String, String)> = trailers
            .iter()
            .map(|&(n, v)| (format!("x-t{}", n % 4), format!("v{v}")))
            .collect();
        chunked_roundtrip(&chunks, &trailers, extensions, &offsets(&cuts));
    }
});
