//! `[[test]]`: route tests, a request and what the routing must do with it.

use super::*;

pub(super) const TEST_KEYS: &[&str] = &[
    "request",
    "listener",
    "headers",
    "expect_pool",
    "expect_route",
    "expect_status",
];

pub(super) fn tests(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<SpannedTest> {
    let Some(list) = top.get("test") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`test`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(t) = as_section(d, item, format!("test #{}", i + 1)) else {
            continue;
        };
        t.deny_unknown(d, TEST_KEYS);
        let Some(_) = t.require(d, "request", "\"GET http://shop.example/api/cart\"") else {
            continue;
        };
        let Some(request) = t.str(d, "request") else {
            continue;
        };
        let Some((method, host, path)) = parse_test_request(request.get_ref()) else {
            d.error(
                Rule::InvalidValue,
                request.span(),
                format!(
                    "test #{}: `request` = \"{}\" is not \"METHOD http://host/path\"",
                    i + 1,
                    request.get_ref()
                ),
            )
            .hint("e.g. \"GET http://shop.example/api/cart\"");
            continue;
        };
        let expect = match (
            t.str(d, "expect_pool"),
            t.str(d, "expect_route"),
            t.get("expect_status"),
        ) {
            (Some(p), None, None) => TestExpectation::Pool(p.get_ref().to_string()),
            (None, Some(r), None) => TestExpectation::Route(r.get_ref().to_string()),
            (None, None, Some(s)) => match as_uint(d, s, "`expect_status`", 999) {
                Some(404) => TestExpectation::Status(404),
                Some(other) => {
                    d.error(
                        Rule::InvalidValue,
                        s.span(),
                        format!("test #{}: expect_status = {other} cannot be checked offline", i + 1),
                    )
                    .hint("only 404 (no route matches) is decided by the routing table");
                    continue;
                }
                None => continue,
            },
            _ => {
                d.error(
                    Rule::InvalidValue,
                    item.span(),
                    format!(
                        "test #{} needs exactly one of `expect_pool`, `expect_route`, `expect_status`",
                        i + 1
                    ),
                );
                continue;
            }
        };
        let headers = t.section(d, "headers").map(|h| header_pairs(d, &h)).unwrap_or_default();
        out.push((
            RouteTest {
                listener: t
                    .str(d, "listener")
                    .map(|l| l.get_ref().to_string())
                    .unwrap_or_default(),
                method,
                host,
                path,
                headers,
                expect,
            },
            request.span(),
        ));
    }
    out
}

/// "GET http://shop.example/api/cart?x=1" -> ("GET", "shop.example", "/api/cart").
pub(super) fn parse_test_request(text: &str) -> Option<(String, String, String)> {
    let (method, url) = text.trim().split_once(char::is_whitespace)?;
    let rest = url
        .trim()
        .strip_prefix("http://")
        .or_else(|| url.trim().strip_prefix("https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    if authority.is_empty() || method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    Some((method.to_ascii_uppercase(), authority.to_string(), path.to_string()))
}
