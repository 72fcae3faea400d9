//! `[listener.NAME]` (with TLS certificates), `[admin]`, `[limits]` and `[access_log]`.

use super::*;

pub(super) fn listeners(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<Listener> {
    let Some(section) = top.section(d, "listener") else {
        d.error(Rule::MissingKey, 0..0, "no listener: safelb would accept no traffic")
            .hint("add `[listener.public]` with `bind = \"127.0.0.1:8080\"`");
        return Vec::new();
    };
    let mut out: Vec<Listener> = Vec::new();
    let mut seen: HashMap<std::net::SocketAddr, String> = HashMap::new();
    for (name, value) in section.table.iter() {
        let name = name.get_ref().to_string();
        let Some(l) = as_section(d, value, format!("listener `{name}`")) else {
            continue;
        };
        l.deny_unknown(d, &["bind", "tls"]);
        let Some(_) = l.require(d, "bind", "\"127.0.0.1:8080\"") else {
            continue;
        };
        let Some(bind) = l.addr(d, "bind") else {
            continue;
        };
        if let Some(other) = seen.insert(*bind.get_ref(), name.clone()) {
            d.error(
                Rule::DuplicateName,
                bind.span(),
                format!(
                    "listeners `{other}` and `{name}` bind the same address {}",
                    bind.get_ref()
                ),
            );
        }
        let tls = l.get("tls").and_then(|v| tls_certs(d, v, &name));
        out.push(Listener {
            name,
            bind: bind.into_inner(),
            tls,
        });
    }
    out
}

/// `tls = { cert, key, names }` or an array of such tables.
pub(super) fn tls_certs(d: &mut Diagnostics, v: &Value<'_>, listener: &str) -> Option<Vec<TlsCert>> {
    let what = format!("`tls` of listener `{listener}`");
    let items: Vec<&Value<'_>> = match v.get_ref() {
        DeValue::Array(a) => a.iter().collect(),
        _ => vec![v],
    };
    if items.is_empty() {
        d.error(Rule::InvalidValue, v.span(), format!("{what} lists no certificate"))
            .hint("tls = { cert = \"site.pem\", key = \"site.key\" }");
        return None;
    }
    let mut out = Vec::new();
    for item in items {
        let t = as_section(d, item, what.clone())?;
        t.deny_unknown(d, &["cert", "key", "names"]);
        let (Some(_), Some(_)) = (
            t.require(d, "cert", "\"site.pem\""),
            t.require(d, "key", "\"site.key\""),
        ) else {
            continue;
        };
        let (Some(cert), Some(key)) = (t.str(d, "cert"), t.str(d, "key")) else {
            continue;
        };
        let names = match t.get("names") {
            None => Vec::new(),
            Some(n) => as_array(d, n, &format!("`names` in {what}"))
                .unwrap_or(&[])
                .iter()
                .filter_map(|x| as_str(d, x, "a TLS name").map(|s| s.get_ref().to_ascii_lowercase()))
                .collect(),
        };
        out.push(TlsCert {
            cert: PathBuf::from(*cert.get_ref()),
            key: PathBuf::from(*key.get_ref()),
            names,
        });
    }
    Some(out)
}

pub(super) fn admin(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<(Admin, Range<usize>)> {
    s.deny_unknown(d, &["bind", "token_file", "tokens_file", "tls", "insecure"]);
    s.require(d, "bind", "\"127.0.0.1:9090\"")?;
    let bind = s.addr(d, "bind")?;
    let token_file = s.str(d, "token_file").map(|t| PathBuf::from(*t.get_ref()));
    let tokens_file = s.str(d, "tokens_file");
    if let (Some(_), Some(both)) = (&token_file, &tokens_file) {
        d.error(
            Rule::InvalidValue,
            both.span(),
            "`token_file` and `tokens_file` both name the admin API's tokens",
        )
        .hint("keep `tokens_file` (named tokens with roles) and put the single token in it as a line `admin operate SECRET`");
    }
    let tls = s.get("tls").and_then(|v| tls_certs(d, v, "admin"));
    let insecure = s.bool(d, "insecure").unwrap_or(false);
    Some((
        Admin {
            bind: *bind.get_ref(),
            token_file,
            tokens_file: tokens_file.map(|t| PathBuf::from(*t.get_ref())),
            tls,
            insecure,
        },
        bind.span(),
    ))
}

pub(super) fn limits(d: &mut Diagnostics, s: &Section<'_, '_>) -> Limits {
    s.deny_unknown(
        d,
        &[
            "header_timeout",
            "keepalive_timeout",
            "max_header_bytes",
            "max_body_bytes",
            "drain_timeout",
            "replay_body_bytes",
            "max_connections",
            "tunnel_idle_timeout",
            "send_timeout",
        ],
    );
    let def = Limits::default();
    let max_header_bytes = s.uint(d, "max_header_bytes", 1 << 20).map(|n| n as usize);
    if let Some(n) = max_header_bytes.filter(|n| *n < 8192) {
        d.error(
            Rule::InvalidValue,
            s.get("max_header_bytes").map_or(s.span.clone(), |v| v.span()),
            format!("`max_header_bytes` = {n} is below the 8192 bytes that common clients need"),
        );
    }
    Limits {
        header_timeout: s.duration(d, "header_timeout").unwrap_or(def.header_timeout),
        keepalive_timeout: s.duration(d, "keepalive_timeout").unwrap_or(def.keepalive_timeout),
        max_header_bytes: max_header_bytes.unwrap_or(def.max_header_bytes).max(8192),
        max_body_bytes: s.uint(d, "max_body_bytes", u64::MAX >> 1).unwrap_or(def.max_body_bytes),
        drain_timeout: s.duration(d, "drain_timeout").unwrap_or(def.drain_timeout),
        replay_body_bytes: s
            .uint(d, "replay_body_bytes", 16 << 20)
            .unwrap_or(def.replay_body_bytes),
        max_connections: s
            .uint(d, "max_connections", 10_000_000)
            .map_or(def.max_connections, |n| n.max(1) as usize),
        tunnel_idle_timeout: s
            .duration(d, "tunnel_idle_timeout")
            .filter(|t| !t.is_zero())
            .unwrap_or(def.tunnel_idle_timeout),
        send_timeout: s
            .duration(d, "send_timeout")
            .filter(|t| !t.is_zero())
            .unwrap_or(def.send_timeout),
    }
}

pub(super) fn access_log(d: &mut Diagnostics, s: &Section<'_, '_>) -> AccessLog {
    s.deny_unknown(d, &["enabled", "path"]);
    AccessLog {
        enabled: s.bool(d, "enabled").unwrap_or(true),
        path: s
            .str(d, "path")
            .filter(|p| *p.get_ref() != "-")
            .map(|p| PathBuf::from(*p.get_ref())),
    }
}
