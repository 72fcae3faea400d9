//! Every `check` diagnostic, as a table: a config, then the rule, line, column and a piece of
//! the message each finding must have. A config with findings must also produce no config.

use safelb_config::{check, Rule, Severity};

const BASE: &str = r#"
[listener.public]
bind = "127.0.0.1:8080"

[pool.api]
backends = ["127.0.0.1:9001"]

[[route]]
name = "api"
pool = "api"
"#;

/// (source, [(rule, line, column, message fragment)])
fn expect(source: &str, expected: &[(Rule, usize, usize, &str)]) {
    let checked = check("safelb.toml", source);
    let got = checked.diagnostics.located();
    let summary: Vec<String> = got
        .iter()
        .map(|l| format!("{}:{}:{} {}", l.rule.as_str(), l.line, l.column, l.message))
        .collect();
    assert_eq!(got.len(), expected.len(), "findings: {summary:#?}");
    for (l, (rule, line, column, fragment)) in got.iter().zip(expected) {
        assert_eq!(
            (l.rule, l.line, l.column),
            (*rule, *line, *column),
            "findings: {summary:#?}"
        );
        assert!(l.message.contains(fragment), "{:?} lacks {fragment:?}", l.message);
    }
    let errors = got.iter().any(|l| l.severity == Severity::Error);
    assert_eq!(
        checked.config.is_some(),
        !errors,
        "a config is produced exactly when there is no error"
    );
}

#[test]
fn the_base_config_is_valid() {
    expect(BASE, &[]);
}

#[test]
fn syntax_error_has_position() {
    expect("[listener.public\nbind = 1", &[(Rule::Syntax, 1, 17, "TOML syntax")]);
}

#[test]
fn unknown_keys_suggest_the_closest_name() {
    let src = BASE.replace("backends = [", "balanse = \"round_robin\"\nbackends = [");
    expect(&src, &[(Rule::UnknownKey, 6, 1, "unknown key `balanse` in pool `api`")]);
    let checked = check("f.toml", &src);
    assert_eq!(
        checked.diagnostics.items()[0].hint.as_deref(),
        Some("did you mean `balance`?")
    );
    expect(
        &format!("{BASE}\n[rollot]\nx = 1\n"),
        &[(Rule::UnknownKey, 12, 2, "unknown key `rollot`")],
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let src = r#"
[listener.public]
bind = "localhost:8080"

[pool.api]
balance = "fastest"
backends = ["127.0.0.1:9001", "127.0.0.1:9001"]
connect_timeout = "10"
health = { interval = "2x" }

[[route]]
name = "api"
pool = "apii"
"#;
    expect(
        src,
        &[
            (Rule::InvalidAddress, 3, 8, "not an IP:port"),
            (Rule::InvalidValue, 6, 11, "unknown balance policy `fastest`"),
            (Rule::DuplicateBackend, 7, 31, "twice"),
            (Rule::InvalidDuration, 8, 19, "no unit"),
            (Rule::InvalidDuration, 9, 23, "unknown unit"),
            (Rule::UndefinedPool, 13, 8, "pool `apii`, which is not defined"),
        ],
    );
    let rendered = check("safelb.toml", src).diagnostics.render();
    assert!(rendered.contains("--> safelb.toml:13:8"), "{rendered}");
    assert!(rendered.contains("did you mean `api`?"), "{rendered}");
}

#[test]
fn wrong_types_name_the_expected_type() {
    let src = BASE.replace("bind = \"127.0.0.1:8080\"", "bind = 8080");
    expect(&src, &[(Rule::WrongType, 3, 8, "must be a string, not integer")]);
}

#[test]
fn pools_without_usable_backends() {
    let empty = BASE.replace(r#"backends = ["127.0.0.1:9001"]"#, "backends = []");
    expect(&empty, &[(Rule::EmptyPool, 6, 12, "empty backend list")]);
    let missing = BASE.replace(r#"backends = ["127.0.0.1:9001"]"#, "");
    expect(&missing, &[(Rule::EmptyPool, 5, 7, "has no `backends`")]);
    let zero = BASE.replace(
        r#"backends = ["127.0.0.1:9001"]"#,
        r#"backends = [{ addr = "127.0.0.1:9001", weight = 0 }, { addr = "127.0.0.1:9002", weight = 0 }]"#,
    );
    expect(&zero, &[(Rule::ZeroWeights, 6, 12, "weight 0")]);
}

#[test]
fn duplicate_names() {
    let src = format!("{BASE}\n[[route]]\nname = \"api\"\npath_prefix = \"/v2\"\npool = \"api\"\n");
    expect(&src, &[(Rule::DuplicateName, 13, 8, "two routes are named `api`")]);
    let listeners = BASE.replace(
        "bind = \"127.0.0.1:8080\"\n",
        "bind = \"127.0.0.1:8080\"\n[listener.other]\nbind = \"127.0.0.1:8080\"\n",
    );
    expect(&listeners, &[(Rule::DuplicateName, 5, 8, "bind the same address")]);
}

#[test]
fn shadowed_route_is_an_error() {
    let src = format!("{BASE}\n[[route]]\nname = \"api-again\"\npool = \"api\"\n");
    expect(
        &src,
        &[(
            Rule::ShadowedRoute,
            13,
            8,
            "route `api-again` can never match: route `api`",
        )],
    );
}

#[test]
fn unused_pool_and_public_admin_marked_insecure_are_warnings() {
    let src = format!(
        "{BASE}\n[pool.spare]\nbackends = [\"127.0.0.1:9009\"]\n\n[admin]\nbind = \"0.0.0.0:9090\"\ninsecure = true\n"
    );
    expect(
        &src,
        &[
            (Rule::UnusedPool, 12, 7, "pool `spare` is not used"),
            (
                Rule::AdminNotLoopback,
                16,
                8,
                "reachable from other machines, without TLS",
            ),
        ],
    );
}

#[test]
fn a_public_admin_api_needs_tls_or_insecure() {
    let public = format!("{BASE}\n[admin]\nbind = \"0.0.0.0:9090\"\n");
    expect(
        &public,
        &[(
            Rule::AdminNotLoopback,
            13,
            8,
            "reachable from other machines, without TLS",
        )],
    );
    let checked = check("safelb.toml", &public);
    assert!(
        checked.diagnostics.render().contains("insecure = true"),
        "the hint names the way out"
    );
    let with_tls =
        format!("{BASE}\n[admin]\nbind = \"0.0.0.0:9090\"\ntls = {{ cert = \"admin.pem\", key = \"admin.key\" }}\n");
    expect(&with_tls, &[]);
    let both = format!("{BASE}\n[admin]\nbind = \"127.0.0.1:9090\"\ntoken_file = \"a\"\ntokens_file = \"b\"\n");
    expect(
        &both,
        &[(Rule::InvalidValue, 15, 15, "both name the admin API's tokens")],
    );
}

#[test]
fn route_tests_run_at_check() {
    let src = format!(
        "{BASE}\n[[test]]\nrequest = \"GET http://shop.example/api/cart\"\nexpect_pool = \"api\"\n\n[[test]]\nrequest = \"GET http://shop.example/\"\nexpect_status = 404\n"
    );
    expect(
        &src,
        &[(
            Rule::TestFailed,
            17,
            11,
            "expected status 404, got route `api` (pool `api`)",
        )],
    );
}

#[test]
fn route_tests_see_hosts_prefixes_and_headers() {
    let src = r#"
[listener.public]
bind = "127.0.0.1:8080"

[pool.web]
backends = ["127.0.0.1:9001"]
[pool.api]
backends = ["127.0.0.1:9002"]
[pool.beta]
backends = ["127.0.0.1:9003"]

[[route]]
name = "beta"
host = "*.shop.example"
path_prefix = "/api"
headers = { "X-Beta" = "1" }
pool = "beta"

[[route]]
name = "api"
host = "*.shop.example"
path_prefix = "/api"
pool = "api"

[[route]]
name = "web"
host = "www.shop.example"
pool = "web"

[[test]]
request = "GET http://www.shop.example/api/cart"
expect_route = "web"

[[test]]
request = "GET http://m.shop.example/api/cart"
expect_pool = "api"

[[test]]
request = "GET http://m.shop.example/api/cart"
headers = { "x-beta" = "1" }
expect_pool = "beta"

[[test]]
request = "GET http://other.example/"
expect_status = 404
"#;
    expect(src, &[]);
}

#[test]
fn missing_listener_and_bad_values() {
    let src = r#"
[pool.api]
backends = ["127.0.0.1:9001"]
min_healthy = 3
panic_policy = "maybe"
health = { timeout = "5s", interval = "1s" }

[[route]]
name = "api"
host = "http://shop.example"
path_prefix = "api"
pool = "api"
"#;
    expect(
        src,
        &[
            (Rule::MissingKey, 1, 1, "no listener"),
            (Rule::InvalidValue, 4, 15, "min_healthy = 3"),
            (Rule::InvalidValue, 5, 16, "unknown panic_policy"),
            (Rule::InvalidValue, 6, 12, "health `timeout`"),
            (Rule::InvalidValue, 10, 8, "not a host name"),
            (Rule::InvalidValue, 11, 15, "must start with `/`"),
        ],
    );
}

#[test]
fn rollout_policy_and_freeze_windows() {
    let good = format!(
        "{BASE}\n[rollout]\ncanary_steps = [1, 10, 100]\nstep_bake = \"30s\"\nmax_error_rate = 0.01\nmax_p99 = \"250ms\"\npreflight = {{ probes = 5, timeout = \"500ms\" }}\n\n[[change_freeze]]\nstart = 2026-12-24T00:00:00Z\nend = 2026-12-27T00:00:00+01:00\nreason = \"holidays\"\n"
    );
    expect(&good, &[]);
    let config = check("f.toml", &good).config.unwrap();
    assert_eq!(config.rollout.canary_steps, vec![1, 10, 100]);
    assert_eq!(config.rollout.preflight_probes, 5);
    let freeze = &config.change_freezes[0];
    assert_eq!((freeze.start, freeze.end), (1_798_070_400, 1_798_326_000));
    assert!(freeze.covers(1_798_070_400) && !freeze.covers(1_798_326_000));

    let bad = format!(
        "{BASE}\n[rollout]\ncanary_steps = [50, 10]\nmax_error_rate = 2\nstep_bak = \"1s\"\n\n[[change_freeze]]\nstart = 2026-12-27T00:00:00Z\nend = 2026-12-24T00:00:00Z\n"
    );
    expect(
        &bad,
        &[
            (Rule::InvalidValue, 13, 16, "`canary_steps` must be ascending"),
            (Rule::InvalidValue, 14, 18, "`max_error_rate` in `rollout`"),
            (Rule::UnknownKey, 15, 1, "unknown key `step_bak`"),
            (Rule::InvalidValue, 19, 1, "`end` must be after `start`"),
        ],
    );
}

#[test]
fn features_on_by_default_take_false_or_a_table() {
    let hedge = BASE.replace("backends = [", "hedge = \"off\"\nbackends = [");
    expect(
        &hedge,
        &[(Rule::WrongType, 6, 9, "must be `false` or a table, not string")],
    );
    let shadow = format!("{BASE}\n[rollout]\nshadow = 3\n");
    expect(&shadow, &[(Rule::WrongType, 13, 10, "must be `false` or a table")]);
    let off = format!(
        "{}\n[rollout]\nshadow = false\n",
        BASE.replace("backends = [", "hedge = false\nbackends = [")
    );
    let config = check("f.toml", &off).config.expect("valid");
    assert!(config.pools[0].hedge.is_none() && config.rollout.shadow.is_none());
    let tuned = BASE.replace("backends = [", "hedge = { budget = 0.25 }\nbackends = [");
    let config = check("f.toml", &tuned).config.expect("valid");
    assert_eq!(config.pools[0].hedge.map(|h| h.budget_permille), Some(250));
    assert!(
        check("f.toml", BASE).config.unwrap().pools[0].hedge.is_some(),
        "on by default"
    );
}

#[test]
fn route_actions_need_exactly_one_and_valid_parts() {
    // Line 11 is the appended `[[route]]`.
    let route = |body: &str| format!("{BASE}[[route]]\nname = \"x\"\npath_prefix = \"/x\"\n{body}\n");
    expect(
        &route("pool = \"api\"\nredirect = { scheme = \"https\" }"),
        &[(Rule::RouteAction, 15, 1, "route `x` has both `pool` and `redirect`")],
    );
    expect(
        &route("method = \"GET\""),
        &[(Rule::RouteAction, 11, 1, "route `x` has no action")],
    );
    expect(
        &route("listener = \"plain\"\npool = \"api\""),
        &[(
            Rule::UndefinedListener,
            14,
            12,
            "listener `plain`, which is not defined",
        )],
    );
    expect(
        &route("redirect = { status = 308 }"),
        &[(Rule::InvalidValue, 14, 12, "a redirect loop")],
    );
    expect(
        &route("redirect = { scheme = \"https\", status = 200 }"),
        &[(Rule::InvalidValue, 14, 41, "status 200 is not a redirect")],
    );
    expect(
        &route("redirect = { path = \"/a\", prefix = \"/b\" }"),
        &[(Rule::InvalidValue, 14, 27, "`path` and `prefix` cannot both be given")],
    );
    expect(
        &route("respond = { status = 503 }\nrewrite = { prefix = \"/v2\" }"),
        &[(Rule::RouteAction, 15, 1, "`rewrite` applies to requests sent to a pool")],
    );
    expect(
        &route("pool = \"api\"\nrewrite = { prefix = \"v2\" }"),
        &[(Rule::InvalidValue, 15, 22, "`prefix` = \"v2\" is not a path")],
    );
    expect(
        &route("respond = { status = 99 }"),
        &[(Rule::InvalidValue, 14, 22, "status 99 is not a final HTTP status")],
    );
}

#[test]
fn header_edits_are_checked_at_check_time() {
    let route = |body: &str| format!("{BASE}[[route]]\nname = \"x\"\npath_prefix = \"/x\"\npool = \"api\"\n{body}\n");
    expect(
        &route("request_headers = { set = { \"Transfer-Encoding\" = \"chunked\" } }"),
        &[(
            Rule::InvalidHeader,
            15,
            29,
            "`Transfer-Encoding` cannot be set by a route",
        )],
    );
    expect(
        &route("request_headers = { set = { \"Host\" = \"a\" } }"),
        &[(Rule::InvalidHeader, 15, 29, "`Host` cannot be set by a route")],
    );
    expect(
        &route("response_headers = { set = { \"Bad Name\" = \"1\" } }"),
        &[(Rule::InvalidHeader, 15, 30, "`Bad Name` is not a valid header name")],
    );
    expect(
        &route("response_headers = { set = { \"X-A\" = \"a\\r\\nSet-Cookie: x\" } }"),
        &[(Rule::InvalidHeader, 15, 38, "has a line break or a control character")],
    );
    expect(
        &route("request_headers = { remove = [\"X-Debug\"], add = {} }"),
        &[(Rule::UnknownKey, 15, 43, "unknown key `add`")],
    );
}

#[test]
fn rate_limits_and_slow_start() {
    let route = |body: &str| format!("{BASE}[[route]]\nname = \"x\"\npath_prefix = \"/x\"\npool = \"api\"\n{body}\n");
    expect(
        &route("rate_limit = { rate = \"50/s\", burst = 10, key = \"header:X-Api-Key\" }"),
        &[],
    );
    expect(
        &route("rate_limit = { rate = \"fast\" }"),
        &[(Rule::InvalidValue, 15, 23, "`rate` = \"fast\" is not a rate")],
    );
    expect(
        &route("rate_limit = { rate = \"5/s\", burst = 0 }"),
        &[(Rule::InvalidValue, 15, 38, "`burst` = 0 refuses every request")],
    );
    expect(
        &route("rate_limit = { rate = \"5/s\", key = \"cookie\" }"),
        &[(Rule::InvalidValue, 15, 36, "`key` = \"cookie\" is not a rate-limit key")],
    );
    expect(&BASE.replace("backends = [", "slow_start = \"30s\"\nbackends = ["), &[]);
    expect(
        &BASE.replace("backends = [", "slow_start = \"soon\"\nbackends = ["),
        &[(Rule::InvalidDuration, 6, 14, "slow_start")],
    );
}

#[test]
fn route_tests_expect_actions_paths_and_headers() {
    let base = format!(
        "{BASE}{}",
        r#"[[route]]
name = "to-https"
listener = "public"
path_prefix = "/shop"
redirect = { scheme = "https", port = 8443, status = 308 }
[[route]]
name = "v2"
path_prefix = "/v1"
pool = "api"
rewrite = { prefix = "/v2", host = "api.internal" }
request_headers = { set = { "X-Env" = "prod" } }
[[route]]
name = "maintenance"
path_prefix = "/old"
respond = { status = 503, headers = { "Retry-After" = "120" } }
"#
    );
    let passing = format!(
        "{base}{}",
        r#"[[test]]
request = "GET http://shop.example:8080/shop/x?a=1"
listener = "public"
expect_redirect = "https://shop.example:8443/shop/x?a=1"
[[test]]
request = "GET http://shop.example/shop/x"
expect_pool = "api"
[[test]]
request = "GET http://shop.example/v1/cart?id=3"
expect_pool = "api"
expect_path = "/v2/cart?id=3"
expect_header = { "Host" = "api.internal", "X-Env" = "prod" }
[[test]]
request = "GET http://shop.example/old/page"
expect_status = 503
expect_header = { "Retry-After" = "120" }
"#
    );
    expect(&passing, &[]);
    // Line 27 is the first appended [[test]]'s `request`.
    let failing = |test: &str| format!("{base}[[test]]\n{test}\n");
    expect(
        &failing("request = \"GET http://shop.example/shop/x\"\nlistener = \"public\"\nexpect_redirect = \"https://shop.example/shop/x\""),
        &[(
            Rule::TestFailed,
            27,
            11,
            "expected a redirect to https://shop.example/shop/x, got route `to-https` (redirect 308 to https://shop.example:8443/shop/x)",
        )],
    );
    expect(
        &failing("request = \"GET http://shop.example/v1/cart\"\nexpect_pool = \"api\"\nexpect_path = \"/v1/cart\""),
        &[(
            Rule::TestFailed,
            27,
            11,
            "expected the backend to see /v1/cart, it would see /v2/cart",
        )],
    );
    expect(
        &failing("request = \"GET http://shop.example/old\"\nexpect_status = 200"),
        &[(
            Rule::TestFailed,
            27,
            11,
            "expected status 200, got route `maintenance` (status 503)",
        )],
    );
    expect(
        &failing(
            "request = \"GET http://shop.example/v1\"\nexpect_pool = \"api\"\nexpect_header = { \"X-Env\" = \"dev\" }",
        ),
        &[(
            Rule::TestFailed,
            27,
            11,
            "expected `x-env: dev` on the backend's request, got `prod`",
        )],
    );
    expect(
        &failing("request = \"GET http://shop.example/x\"\nexpect_status = 429"),
        &[(
            Rule::InvalidValue,
            28,
            17,
            "expect_status = 429 cannot be checked offline",
        )],
    );
}
