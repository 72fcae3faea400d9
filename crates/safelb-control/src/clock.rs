//! The control plane's one clock. Rollouts, alerts, the monitor, incidents and the store read
//! time here, so a test on tokio's paused clock moves all of them together.
//!
//! [`unix_ms`] is the wall clock shifted by however far tokio's clock is from the real monotonic
//! clock: on a normal runtime that shift is zero and the answer is the system time (no drift
//! from a clock that NTP corrects); on a paused runtime it is the virtual time the test has
//! advanced.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as the control plane sees them.
pub fn unix_ms() -> i64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    (wall + tokio_shift_micros()).div_euclid(1000)
}

/// How far tokio's clock is ahead of the real one, in microseconds (0 outside a paused
/// runtime, give or take the time between two reads).
fn tokio_shift_micros() -> i64 {
    if tokio::runtime::Handle::try_current().is_err() {
        return 0;
    }
    let virtual_now = tokio::time::Instant::now().into_std();
    let real_now = Instant::now();
    match virtual_now.checked_duration_since(real_now) {
        Some(ahead) => ahead.as_micros() as i64,
        None => -(real_now.duration_since(virtual_now).as_micros() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn follows_the_system_clock_on_a_real_runtime() {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((unix_ms() - system).abs() < 50);
    }

    #[tokio::test(start_paused = true)]
    async fn moves_with_a_paused_clock() {
        let before = unix_ms();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let after = unix_ms();
        assert!((after - before - 3_600_000).abs() < 50, "moved {} ms", after - before);
    }
}
