//! Reading typed values out of the spanned TOML tree while collecting every problem.
//!
//! serde stops at the first error; an operator fixing a config wants all of them with their
//! positions. So the tree from `toml::de::DeTable` is walked by hand: each getter reports a
//! wrong type or value against the value's own span and returns `None`, and the caller goes on.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diagnostic::{did_you_mean, Diagnostics, Rule};
use crate::duration::parse_duration;

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A feature that is on by default: absent or `true` keeps its defaults, `false` turns it off,
/// a table tunes it.
pub(crate) enum Switch<'t, 'i> {
    Default,
    Off,
    Table(Section<'t, 'i>),
}

/// A table being read, with the words that name it in messages ("pool `api`").
pub(crate) struct Section<'t, 'i> {
    pub table: &'t DeTable<'i>,
    pub span: Range<usize>,
    pub what: String,
}

impl<'t, 'i> Section<'t, 'i> {
    pub fn new(table: &'t DeTable<'i>, span: Range<usize>, what: impl Into<String>) -> Self {
        Section {
            table,
            span,
            what: what.into(),
        }
    }

    /// Reports every key not in `known`, with the closest known key as a hint.
    pub fn deny_unknown(&self, d: &mut Diagnostics, known: &[&str]) {
        for (key, _) in self.table.iter() {
            let name = key.get_ref().as_ref();
            if known.contains(&name) {
                continue;
            }
            let diag = d.error(
                Rule::UnknownKey,
                key.span(),
                format!("unknown key `{name}` in {}", self.what),
            );
            match did_you_mean(name, known.iter().copied()) {
                Some(s) => diag.hint(format!("did you mean `{s}`?")),
                None => diag.hint(format!("known keys: {}", known.join(", "))),
            };
        }
    }

    pub fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    pub fn key_span(&self, key: &str) -> Range<usize> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map_or(self.span.clone(), |(k, _)| k.span())
    }

    pub fn require(&self, d: &mut Diagnostics, key: &str, example: &str) -> Option<&'t Value<'i>> {
        let v = self.get(key);
        if v.is_none() {
            d.error(
                Rule::MissingKey,
                self.span.clone(),
                format!("{} needs `{key}`", self.what),
            )
            .hint(format!("add e.g. `{key} = {example}`"));
        }
        v
    }

    pub fn str(&self, d: &mut Diagnostics, key: &str) -> Option<Spanned<&'t str>> {
        self.get(key)
            .and_then(|v| as_str(d, v, &format!("`{key}` in {}", self.what)))
    }

    pub fn bool(&self, d: &mut Diagnostics, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                wrong_type(d, v.span(), &format!("`{key}` in {}", self.what), "a boolean", other);
                None
            }
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn uint(&self, d: &mut Diagnostics, key: &str, max: u64) -> Option<u64> {
        self.get(key)
            .and_then(|v| as_uint(d, v, &format!("`{key}` in {}", self.what), max))
    }

    /// A number (integer or float) within `min..=max`.
    pub fn float(&self, d: &mut Diagnostics, key: &str, min: f64, max: f64) -> Option<f64> {
        let v = self.get(key)?;
        let what = format!("`{key}` in {}", self.what);
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .ok()
                .map(|n| n as f64),
            other => {
                wrong_type(d, v.span(), &what, "a number", other);
                return None;
            }
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                d.error(
                    Rule::InvalidValue,
                    v.span(),
                    format!("{what} must be a number from {min} to {max}"),
                );
                None
            }
        }
    }

    /// An offset date-time (`2026-12-24T00:00:00Z`) as seconds since the Unix epoch.
    pub fn datetime(&self, d: &mut Diagnostics, key: &str) -> Option<i64> {
        let v = self.get(key)?;
        let what = format!("`{key}` in {}", self.what);
        let DeValue::Datetime(dt) = v.get_ref() else {
            wrong_type(d, v.span(), &what, "a date-time like 2026-12-24T00:00:00Z", v.get_ref());
            return None;
        };
        let (Some(date), Some(time), Some(offset)) = (dt.date, dt.time, dt.offset) else {
            d.error(
                Rule::InvalidValue,
                v.span(),
                format!("{what} needs a date, a time and an offset (e.g. 2026-12-24T00:00:00Z)"),
            );
            return None;
        };
        let offset_minutes = match offset {
            toml_datetime::Offset::Z => 0,
            toml_datetime::Offset::Custom { minutes } => minutes as i64,
        };
        let days = days_from_civil(date.year as i64, date.month as i64, date.day as i64);
        Some(
            days * 86_400 + time.hour as i64 * 3600 + time.minute as i64 * 60 + time.second as i64
                - offset_minutes * 60,
        )
    }

    pub fn duration(&self, d: &mut Diagnostics, key: &str) -> Option<Duration> {
        let s = self.str(d, key)?;
        match parse_duration(s.get_ref()) {
            Ok(dur) => Some(dur),
            Err(msg) => {
                d.error(
                    Rule::InvalidDuration,
                    s.span(),
                    format!("`{key}` in {}: {msg}", self.what),
                )
                .hint("durations look like \"250ms\", \"2s\", \"1m30s\"");
                None
            }
        }
    }

    pub fn addr(&self, d: &mut Diagnostics, key: &str) -> Option<Spanned<SocketAddr>> {
        let s = self.str(d, key)?;
        parse_addr(d, &s, &format!("`{key}` in {}", self.what))
    }

    /// A feature written `key = false` or `key = { ... }` (see [`Switch`]).
    pub fn switch(&self, d: &mut Diagnostics, key: &str) -> Switch<'t, 'i> {
        let Some(v) = self.get(key) else {
            return Switch::Default;
        };
        let what = format!("`{key}` of {}", self.what);
        match v.get_ref() {
            DeValue::Boolean(true) => Switch::Default,
            DeValue::Boolean(false) => Switch::Off,
            DeValue::Table(t) => Switch::Table(Section::new(t, v.span(), what)),
            other => {
                wrong_type(d, v.span(), &what, "`false` or a table", other);
                Switch::Default
            }
        }
    }

    /// A sub-table, written either as `[a.b]` or inline `b = { ... }`.
    pub fn section(&self, d: &mut Diagnostics, key: &str) -> Option<Section<'t, 'i>> {
        let v = self.get(key)?;
        let what = format!("`{key}` of {}", self.what);
        as_section(d, v, what)
    }
}

pub(crate) fn as_section<'t, 'i>(d: &mut Diagnostics, v: &'t Value<'i>, what: String) -> Option<Section<'t, 'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(Section::new(t, v.span(), what)),
        other => {
            wrong_type(d, v.span(), &what, "a table", other);
            None
        }
    }
}

pub(crate) fn as_str<'t>(d: &mut Diagnostics, v: &'t Value<'_>, what: &str) -> Option<Spanned<&'t str>> {
    match v.get_ref() {
        DeValue::String(s) => Some(Spanned::new(v.span(), s.as_ref())),
        other => {
            wrong_type(d, v.span(), what, "a string", other);
            None
        }
    }
}

pub(crate) fn as_uint(d: &mut Diagnostics, v: &Value<'_>, what: &str, max: u64) -> Option<u64> {
    let parsed = match v.get_ref() {
        DeValue::Integer(i) => u64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok(),
        other => {
            wrong_type(d, v.span(), what, "a whole number", other);
            return None;
        }
    };
    match parsed {
        Some(n) if n <= max => Some(n),
        _ => {
            d.error(
                Rule::InvalidValue,
                v.span(),
                format!("{what} must be a whole number from 0 to {max}"),
            );
            None
        }
    }
}

pub(crate) fn as_array<'t, 'i>(d: &mut Diagnostics, v: &'t Value<'i>, what: &str) -> Option<&'t [Value<'i>]> {
    match v.get_ref() {
        DeValue::Array(a) => Some(a),
        other => {
            wrong_type(d, v.span(), what, "an array", other);
            None
        }
    }
}

pub(crate) fn parse_addr(d: &mut Diagnostics, s: &Spanned<&str>, what: &str) -> Option<Spanned<SocketAddr>> {
    match s.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(Spanned::new(s.span(), a)),
        Err(_) => {
            let text = *s.get_ref();
            let diag = d.error(
                Rule::InvalidAddress,
                s.span(),
                format!("{what}: `{text}` is not an IP:port address"),
            );
            match text.rsplit_once(':') {
                Some((host, port)) if host.parse::<IpAddr>().is_err() && port.parse::<u16>().is_ok() => diag.hint(
                    "host names are not resolved: write an IP address, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
                ),
                _ => diag.hint("write it as IP:port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""),
            };
            None
        }
    }
}

pub(crate) fn wrong_type(d: &mut Diagnostics, span: Range<usize>, what: &str, expected: &str, got: &DeValue<'_>) {
    d.error(
        Rule::WrongType,
        span,
        format!("{what} must be {expected}, not {}", got.type_str()),
    );
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
