//! One testkit backend in a process of its own, for `bench/chaos.sh`: a process can be killed
//! with `kill -9`, stopped with SIGSTOP or moved into a network namespace, which a backend inside
//! the test's process cannot.
//!
//! Usage: `chaos-backend NAME ADDR CONTROL_ADDR [BASE_DELAY_MS]`. The backend serves the
//! testkit's paths on ADDR; its behaviour is switched by a GET on CONTROL_ADDR (a port of its
//! own, so a backend that answers 503 or cuts bodies still takes commands):
//! `/ok` (normal, after the base delay), `/status/N`, `/delay/MS`, `/close-mid-body`, `/hang`,
//! `/flap/MS` (503 on every path, health checks included, and normal in turn, each for MS).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use safelb_testkit::{Behavior, TestBackend};

struct Control {
    backend: TestBackend,
    normal: Behavior,
    /// Bumped by every command, so a flapping task knows when it has been replaced.
    generation: AtomicU64,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: chaos-backend NAME ADDR CONTROL_ADDR [BASE_DELAY_MS]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[2].parse().expect("ADDR is IP:port");
    let control: SocketAddr = args[3].parse().expect("CONTROL_ADDR is IP:port");
    let base_ms: u64 = args.get(4).map_or(0, |v| v.parse().expect("BASE_DELAY_MS is a number"));
    let backend = TestBackend::start_on(addr, &args[1]).await.expect("binding ADDR");
    // A real service takes some time to answer; "20x slower" needs a time to multiply.
    let normal = if base_ms == 0 {
        Behavior::Ok
    } else {
        Behavior::Delay(Duration::from_millis(base_ms))
    };
    backend.set(normal);
    let state = Arc::new(Control {
        backend,
        normal,
        generation: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(control)
        .await
        .expect("binding CONTROL_ADDR");
    println!("ready {addr} control {control}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(command(&state, &req)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn command(state: &Arc<Control>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let number = |i: usize| parts.get(i).and_then(|v| v.parse::<u64>().ok());
    let generation = state.generation.fetch_add(1, SeqCst) + 1;
    let behavior = match (parts[0], number(1)) {
        ("ok", _) => state.normal,
        ("status", Some(n)) => Behavior::Status(n as u16),
        ("delay", Some(ms)) => Behavior::Delay(Duration::from_millis(ms)),
        ("close-mid-body", _) => Behavior::CloseMidBody,
        ("hang", _) => Behavior::Hang,
        ("flap", Some(ms)) => {
            tokio::spawn(flap(state.clone(), generation, Duration::from_millis(ms)));
            Behavior::Status(503)
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from("unknown command\n")));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    state.backend.set(behavior);
    Response::new(Full::new(Bytes::from(format!("{behavior:?}\n"))))
}

/// Alternates between down (503 everywhere) and normal every `period` until another command
/// arrives; the process's lifetime bounds it too.
async fn flap(state: Arc<Control>, generation: u64, period: Duration) {
    let mut down = true;
    loop {
        tokio::time::sleep(period).await;
        if state.generation.load(SeqCst) != generation {
            return;
        }
        down = !down;
        state
            .backend
            .set(if down { Behavior::Status(503) } else { state.normal });
    }
}
