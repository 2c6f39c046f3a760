//! Maintenance windows: when an installed update's reboot may happen.

use crate::config::Window;

/// Minutes of the day (UTC) now.
pub fn minute_of_day() -> u32 {
    let t = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    (t.hour() as u32) * 60 + t.minute() as u32
}

/// Minutes from `m` until a window is open (0 inside one, or with no windows).
pub fn minutes_to_window(windows: &[Window], m: u32) -> u32 {
    if windows.is_empty() {
        return 0;
    }
    windows
        .iter()
        .map(|w| {
            if w.contains(m) {
                0
            } else {
                (w.start + 1440 - m) % 1440
            }
        })
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_for_a_window_counts_to_the_nearest_start() {
        let w = |s: &str| Window::parse(s).unwrap();
        assert_eq!(minutes_to_window(&[], 700), 0);
        let ws = [w("02:00-05:00"), w("22:00-23:00")];
        assert_eq!(minutes_to_window(&ws, 3 * 60), 0);
        assert_eq!(minutes_to_window(&ws, 12 * 60), 10 * 60);
        assert_eq!(minutes_to_window(&ws, 23 * 60 + 30), 150);
    }
}
