//! Building and swapping a routing snapshot for a large config: ROUTES routes (5,000 by
//! default) over BACKENDS backends (1,000) in pools of 5, each route with its own host.
//!
//! `cargo run --release -p safelb-proxy --example snapshot_swap [ROUTES] [BACKENDS]`

use std::time::Instant;

use safelb_proxy::ProxyHandle;

fn config(routes: usize, backends: usize) -> String {
    let mut s = String::from("[listener.public]\nbind = \"127.0.0.1:8080\"\n[access_log]\nenabled = false\n");
    let pools = (backends / 5).max(1);
    for p in 0..pools {
        s.push_str(&format!("[pool.p{p}]\nbalance = \"p2c_ewma\"\nbackends = ["));
        for b in 0..5 {
            let n = p * 5 + b;
            s.push_str(&format!("\"127.0.{}.{}:{}\", ", 1 + n / 250, 1 + n % 250, 9000 + b));
        }
        s.push_str("]\n");
    }
    for r in 0..routes {
        s.push_str(&format!(
            "[[route]]\nname = \"r{r}\"\nhost = \"r{r}.example\"\npath_prefix = \"/api\"\npool = \"p{}\"\n",
            r % pools
        ));
    }
    s
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("a number"));
    let routes = args.next().unwrap_or(5_000);
    let backends = args.next().unwrap_or(1_000);
    let source = config(routes, backends);
    let started = Instant::now();
    let checked = safelb_config::check("bench.toml", &source)
        .into_result()
        .expect("the generated config is valid");
    let check = started.elapsed();
    let next = safelb_config::check(
        "bench.toml",
        &source.replace("balance = \"p2c_ewma\"", "balance = \"round_robin\""),
    )
    .into_result()
    .expect("valid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let handle = ProxyHandle::new(checked, 1);
        let mut best = std::time::Duration::MAX;
        for v in 2..7 {
            let started = Instant::now();
            handle.swap(next.clone(), v).expect("same listeners");
            best = best.min(started.elapsed());
        }
        println!("  {routes} routes, {backends} backends: check (parse + validate + route tests) {check:?}; snapshot build + swap {best:?} (best of 5)");
    });
}
