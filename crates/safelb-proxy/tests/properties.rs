//! Properties on generated input, the stable-Rust side of the fuzz targets `h1_head`, `h1_body`
//! and `request_head` (`fuzz/`; the checks themselves are in `safelb_proxy::fuzzing`), and the
//! balancers' distributions: round robin and weighted shares exact over whole cycles, a skipped
//! backend's share spread within bounds, and a hash ring that moves only the keys of a backend
//! that leaves.

use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use safelb_config::Balance;
use safelb_proxy::backend::BackendState;
use safelb_proxy::balance::{Balancer, Candidates, Ring};
use safelb_proxy::fuzzing::{self, Framing, Treated};

/// Header fields a response head may carry, framing ones included, with odd spellings.
const RESPONSE_FIELDS: &[&str] = &[
    "Content-Length: 5",
    "content-length: 5",
    "Content-Length:  7 ",
    "Content-Length: +5",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding:\tChunked",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Keep-Alive, x-a",
    "X-A: 1",
    "Set-Cookie: a=b",
];

/// Fields of a client's request head, hop-by-hop and framing ones included.
const REQUEST_FIELDS: &[&str] = &[
    "Host: shop.example",
    "Host: other.example",
    "Content-Length: 0",
    "Content-Length: 5",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip",
    "Connection: close",
    "Connection: keep-alive, x-drop",
    "X-Drop: 1",
    "TE: trailers",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
    "Upgrade: websocket",
    "X-Forwarded-For: 10.0.0.1",
    "x-forwarded-for: 10.0.0.2, 10.0.0.3",
    "X-Forwarded-For:",
    "X-Forwarded-Proto: https",
    "x-forwarded-host: evil.example",
    "X-Request-Id: abc",
    "x-request-id:",
    "Connection: Keep-Alive, TE",
    "TE: trailers, deflate",
    "Cookie: a=1",
    "HOST: SHOP.example",
];

fn head_bytes(first: String, fields: &[usize], all: &[&str], lf_only: bool) -> Vec<u8> {
    let eol = if lf_only { "\n" } else { "\r\n" };
    let mut head = first + eol;
    for &f in fields {
        head += all[f % all.len()];
        head += eol;
    }
    head += eol;
    head.into_bytes()
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn response_heads_keep_the_parsers_promises(
        http10 in any::<bool>(),
        status in 100u16..600,
        fields in vec(any::<usize>(), 0..6),
        lf_only in any::<bool>(),
        after in vec(any::<u8>(), 0..16),
    ) {
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut data = head_bytes(format!("{version} {status} Reason"), &fields, RESPONSE_FIELDS, lf_only);
        let clean = fields.iter().all(|f| RESPONSE_FIELDS[f % RESPONSE_FIELDS.len()].starts_with('X'));
        data.extend_from_slice(&after);
        let parsed = fuzzing::response_head(&data);
        prop_assert!(parsed || !clean, "a plain head was refused: {:?}", String::from_utf8_lossy(&data));
    }

    #[test]
    fn arbitrary_bytes_never_break_the_head_parser(data in vec(any::<u8>(), 0..256)) {
        fuzzing::response_head(&data);
    }

    #[test]
    fn chunked_bodies_decode_to_their_chunks_however_reads_are_cut(
        chunks in vec(vec(any::<u8>(), 0..40), 0..6),
        trailers in vec((0u8..4, 0u8..100), 0..3),
        extensions in any::<bool>(),
        cuts in vec(0usize..300, 0..8),
    ) {
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let trailers: Vec<(String, String)> =
            trailers.iter().map(|(n, v)| (format!("x-t{n}"), format!("v{v}"))).collect();
        fuzzing::chunked_roundtrip(&chunks, &trailers, extensions, &cuts);
    }

    #[test]
    fn any_bytes_frame_the_same_however_reads_are_cut(
        framing in prop_oneof![
            (0u64..200).prop_map(Framing::Length),
            Just(Framing::Chunked),
            Just(Framing::Close),
        ],
        // Bytes from a chunked body's alphabet, so that sizes, line ends and data all occur.
        wire in vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'0'), Just(b'5'), Just(b'a'), Just(b';'), Just(b':'), any::<u8>()], 0..120),
        cuts in vec(0usize..120, 0..8),
    ) {
        fuzzing::body_framing(framing, &wire, &cuts);
    }

    #[test]
    fn request_heads_are_refused_or_forwarded_clean(
        method in prop_oneof![Just("GET"), Just("POST"), Just("HEAD"), Just("CONNECT"), Just("OPTIONS")],
        target in prop_oneof![Just("/"), Just("/a?b=c"), Just("http://shop.example/abs"), Just("http://shop.example?q"), Just("*"), Just("shop.example:443")],
        http10 in any::<bool>(),
        fields in vec(any::<usize>(), 0..8),
        body in vec(any::<u8>(), 0..8),
    ) {
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut raw = head_bytes(format!("{method} {target} {version}"), &fields, REQUEST_FIELDS, false);
        raw.extend_from_slice(&body);
        fuzzing::request_head(&raw);
    }
}

#[test]
fn the_hostile_heads_are_refused_and_an_honest_one_is_forwarded() {
    // The property's own test: it must see the refusals the hostile table expects.
    let refused = |raw: &[u8]| matches!(fuzzing::request_head(raw).first(), Some(Treated::Refused(_)));
    assert!(refused(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"));
    assert!(refused(b"GET / HTTP/1.1\r\n\r\n"));
    assert!(refused(b"CONNECT x:22 HTTP/1.1\r\nHost: x:22\r\n\r\n"));
    let forwarded = |raw: &[u8]| match fuzzing::request_head(raw).as_slice() {
        [Treated::Forwarded(head)] => String::from_utf8_lossy(head).to_ascii_lowercase(),
        other => panic!("not forwarded once: {other:?}"),
    };
    // hyper keeps chunked and drops the length (RFC 9112 §6.3); neither goes on from here.
    let both =
        forwarded(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(
        !both.contains("content-length") && !both.contains("transfer-encoding"),
        "{both}"
    );
    let honest = forwarded(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: x-drop\r\nX-Drop: 1\r\n\r\n");
    assert!(
        honest.starts_with("get /a http/1.1\r\n") && !honest.contains("x-drop"),
        "{honest}"
    );
}

fn backends(n: usize) -> Vec<Arc<BackendState>> {
    (0..n)
        .map(|i| {
            Arc::new(BackendState::new(
                format!("127.0.0.1:{}", 20_000 + i).parse().expect("an address"),
            ))
        })
        .collect()
}

/// Picks per backend over `rounds` picks, keys hashed from the pick number.
fn counts(
    b: &Balancer,
    backends: &[Arc<BackendState>],
    weights: &[u32],
    out: Option<usize>,
    rounds: usize,
) -> Vec<usize> {
    let eligible = |i: usize| Some(i) != out;
    let c = Candidates {
        backends,
        weights,
        eligible: &eligible,
    };
    let mut counts = vec![0; backends.len()];
    for key in 0..rounds as u64 {
        let i = b
            .pick(&c, key.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .expect("a backend is eligible");
        assert_ne!(Some(i), out, "an ineligible backend was picked");
        counts[i] += 1;
    }
    counts
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn round_robin_and_weighted_give_exact_shares_over_whole_cycles(
        weights in vec(1u32..10, 1..7),
        cycles in 1usize..5,
    ) {
        let b = backends(weights.len());
        let rr = Balancer::new(Balance::RoundRobin, &b, &weights);
        prop_assert_eq!(counts(&rr, &b, &weights, None, b.len() * cycles), vec![cycles; b.len()]);
        let total: u32 = weights.iter().sum();
        let weighted = Balancer::new(Balance::Weighted, &b, &weights);
        let got = counts(&weighted, &b, &weights, None, total as usize * cycles);
        let want: Vec<usize> = weights.iter().map(|&w| w as usize * cycles).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_skipped_backends_share_spreads_by_weight_within_bounds(
        weights in vec(1u32..10, 2..6),
        out in any::<prop::sample::Index>(),
    ) {
        let b = backends(weights.len());
        let out = out.index(weights.len());
        let weighted = Balancer::new(Balance::Weighted, &b, &weights);
        let rounds = 20_000;
        let got = counts(&weighted, &b, &weights, Some(out), rounds);
        let rest: u32 = weights.iter().enumerate().filter(|&(i, _)| i != out).map(|(_, &w)| w).sum();
        for (i, &n) in got.iter().enumerate().filter(|&(i, _)| i != out) {
            let p = f64::from(weights[i]) / f64::from(rest);
            let expected = p * rounds as f64;
            // Six standard deviations of the random hand-over, plus 1% for the schedule's order.
            let bound = 6.0 * (rounds as f64 * p * (1.0 - p)).sqrt() + 0.01 * rounds as f64;
            prop_assert!((n as f64 - expected).abs() <= bound, "backend {i}: {n} picks, expected {expected:.0} ± {bound:.0}: {got:?}");
        }
    }

    #[test]
    fn the_hash_ring_moves_only_the_keys_of_a_backend_that_leaves(
        weights in vec(1u32..4, 2..7),
        out in any::<prop::sample::Index>(),
    ) {
        let b = backends(weights.len());
        let out = out.index(weights.len());
        let all = |_: usize| true;
        let before = Ring::new(&b, &weights);
        let mut rest = b.clone();
        rest.remove(out);
        let mut rest_weights = weights.clone();
        rest_weights.remove(out);
        let after = Ring::new(&rest, &rest_weights);
        let skipping = |i: usize| i != out;
        let keys = 2_000u64;
        let mut moved = 0;
        for key in 0..keys {
            let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let owner = before.pick(&Candidates { backends: &b, weights: &weights, eligible: &all }, hash).expect("an owner");
            let skipped = before.pick(&Candidates { backends: &b, weights: &weights, eligible: &skipping }, hash).expect("another");
            let rebuilt = after.pick(&Candidates { backends: &rest, weights: &rest_weights, eligible: &all }, hash).expect("an owner");
            // The same backend whether it was skipped in the old ring or absent from a new one.
            prop_assert_eq!(&b[skipped].addr, &rest[rebuilt].addr);
            if owner == out {
                moved += 1;
                prop_assert_ne!(skipped, out);
            } else {
                prop_assert_eq!(skipped, owner, "key {} left backend {} though {} left", key, owner, out);
            }
        }
        // The keys that move are the leaver's: about its share of the ring.
        let share = f64::from(weights[out]) / f64::from(weights.iter().sum::<u32>());
        prop_assert!((moved as f64) <= keys as f64 * (share + 0.15), "{moved} of {keys} keys moved, share {share:.2}");
    }

    #[test]
    fn every_policy_picks_only_eligible_backends(
        weights in vec(1u32..5, 1..6),
        mask in any::<u8>(),
    ) {
        let b = backends(weights.len());
        let eligible = |i: usize| mask & (1 << i) != 0;
        let any_eligible = (0..b.len()).any(eligible);
        for policy in [Balance::RoundRobin, Balance::Weighted, Balance::LeastRequest, Balance::P2cEwma, Balance::ConsistentHash] {
            let balancer = Balancer::new(policy, &b, &weights);
            let c = Candidates { backends: &b, weights: &weights, eligible: &eligible };
            for key in 0..50u64 {
                match balancer.pick(&c, key.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                    Some(i) => prop_assert!(eligible(i), "{:?} picked ineligible backend {}", policy, i),
                    None => prop_assert!(!any_eligible, "{:?} found none though some are eligible", policy),
                }
            }
        }
    }
}
