//! `[[test]]`: route tests, a request and what the routing must do with it.

use super::*;

pub(super) const TEST_KEYS: &[&str] = &[
    "request",
    "listener",
    "headers",
    "expect_pool",
    "expect_route",
    "expect_status",
    "expect_redirect",
    "expect_path",
    "expect_header",
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
        let Some(parsed) = parse_test_request(request.get_ref()) else {
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
        let given: Vec<&str> = ["expect_pool", "expect_route", "expect_status", "expect_redirect"]
            .into_iter()
            .filter(|k| t.get(k).is_some())
            .collect();
        if given.len() != 1 {
            d.error(
                Rule::InvalidValue,
                item.span(),
                format!(
                    "test #{} needs exactly one of `expect_pool`, `expect_route`, `expect_status`, `expect_redirect`",
                    i + 1
                ),
            );
            continue;
        }
        let expect = match given[0] {
            "expect_pool" => t
                .str(d, "expect_pool")
                .map(|p| TestExpectation::Pool(p.get_ref().to_string())),
            "expect_route" => t
                .str(d, "expect_route")
                .map(|r| TestExpectation::Route(r.get_ref().to_string())),
            "expect_redirect" => t
                .str(d, "expect_redirect")
                .map(|r| TestExpectation::Redirect(r.get_ref().to_string())),
            _ => match t.uint(d, "expect_status", 999) {
                Some(429) => {
                    d.error(
                        Rule::InvalidValue,
                        t.get("expect_status").map_or(item.span(), |v| v.span()),
                        format!("test #{}: expect_status = 429 cannot be checked offline", i + 1),
                    )
                    .hint("a rate limit depends on the traffic before the request");
                    None
                }
                Some(s) if (200..=599).contains(&s) => Some(TestExpectation::Status(s as u16)),
                Some(s) => {
                    d.error(
                        Rule::InvalidValue,
                        t.get("expect_status").map_or(item.span(), |v| v.span()),
                        format!("test #{}: expect_status = {s} is not a final HTTP status", i + 1),
                    );
                    None
                }
                None => None,
            },
        };
        let Some(expect) = expect else { continue };
        let expect_path = t.str(d, "expect_path").map(|p| p.get_ref().to_string());
        let expect_headers = t
            .section(d, "expect_header")
            .map(|h| header_pairs(d, &h))
            .unwrap_or_default();
        let headers = t.section(d, "headers").map(|h| header_pairs(d, &h)).unwrap_or_default();
        out.push((
            RouteTest {
                listener: t
                    .str(d, "listener")
                    .map(|l| l.get_ref().to_string())
                    .unwrap_or_default(),
                scheme: parsed.scheme,
                method: parsed.method,
                host: parsed.host,
                path: parsed.path,
                query: parsed.query,
                headers,
                expect,
                expect_path,
                expect_headers,
            },
            request.span(),
        ));
    }
    out
}

/// A test's request line, split.
pub(super) struct TestRequest {
    pub scheme: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
}

/// "GET http://shop.example/api/cart?x=1" -> GET, http, shop.example, /api/cart, x=1.
pub(super) fn parse_test_request(text: &str) -> Option<TestRequest> {
    let (method, url) = text.trim().split_once(char::is_whitespace)?;
    let url = url.trim();
    let (scheme, rest) = match url.strip_prefix("http://") {
        Some(rest) => ("http", rest),
        None => ("https", url.strip_prefix("https://")?),
    };
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let target = target.split('#').next().unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if authority.is_empty() || method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    Some(TestRequest {
        scheme: scheme.to_string(),
        method: method.to_ascii_uppercase(),
        host: authority.to_string(),
        path: path.to_string(),
        query,
    })
}
