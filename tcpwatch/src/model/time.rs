//! Wall-clock rendering of CLOCK_MONOTONIC timestamps: the offset is read once by the
//! session and passed in, so nothing here reads a clock.

/// Converts CLOCK_MONOTONIC nanoseconds into wall-clock time for human output.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime − monotonic, in ns.
    pub offset_ns: i128,
    /// Seconds east of UTC for the local time zone.
    pub utc_offset_s: i64,
}

impl Clock {
    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// `HH:MM:SS.uuuuuu` local time.
    pub fn hms(&self, mono_ns: u64) -> String {
        let wall = self.wall_ns(mono_ns) + self.utc_offset_s as i128 * 1_000_000_000;
        let secs = wall.div_euclid(1_000_000_000);
        let us = wall.rem_euclid(1_000_000_000) / 1000;
        let day = secs.rem_euclid(86_400);
        format!(
            "{:02}:{:02}:{:02}.{:06}",
            day / 3600,
            day % 3600 / 60,
            day % 60,
            us
        )
    }

    /// `HH:MM:SS` local time of a Unix time in ns.
    pub fn hms_of_wall(&self, wall_ns: i64) -> String {
        let mono = (wall_ns as i128 - self.offset_ns).max(0) as u64;
        let s = self.hms(mono);
        s.split('.').next().unwrap_or(&s).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats_local_time() {
        let c = Clock {
            offset_ns: 3_600_000_000_000,
            utc_offset_s: 0,
        };
        assert_eq!(c.hms(1_500_000), "01:00:00.001500");
    }
}
