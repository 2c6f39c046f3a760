//! Priority: how urgent a device's message is, which decides its place in the drain order
//! and what it may evict when the spool is full (alarms first and never evicted, then
//! vitals, then routine).
//!
//! A topic's priority is policy: its device's class names the topic filters of its alarms
//! and its vitals ([`Priorities`]); everything else is routine.

use super::TopicFilter;

/// Priority classes, most urgent first; the discriminant is a spool key's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Alarm = 0,
    Vital = 1,
    Routine = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Alarm, Priority::Vital, Priority::Routine];

    pub fn from_byte(b: u8) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| *p as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Alarm => "alarm",
            Priority::Vital => "vital",
            Priority::Routine => "routine",
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One device's alarm and vital topics, expanded from its class.
#[derive(Debug, Clone, Default)]
pub struct Priorities {
    pub alarm: Vec<TopicFilter>,
    pub vital: Vec<TopicFilter>,
}

impl Priorities {
    /// The priority of `topic`: alarm if an alarm filter matches, else vital if a vital
    /// one does, else routine.
    pub fn of(&self, topic: &str) -> Priority {
        if self.alarm.iter().any(|f| f.matches(topic)) {
            Priority::Alarm
        } else if self.vital.iter().any(|f| f.matches(topic)) {
            Priority::Vital
        } else {
            Priority::Routine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(list: &[&str]) -> Vec<TopicFilter> {
        list.iter()
            .map(|f| TopicFilter::parse(f).unwrap())
            .collect()
    }

    #[test]
    fn alarm_wins_over_vital_and_the_rest_is_routine() {
        let p = Priorities {
            alarm: filters(&["ward/pump-1/alarm/#"]),
            vital: filters(&["ward/pump-1/#"]),
        };
        assert_eq!(p.of("ward/pump-1/alarm/occlusion"), Priority::Alarm);
        assert_eq!(p.of("ward/pump-1/rate"), Priority::Vital);
        assert_eq!(p.of("ward/pump-2/rate"), Priority::Routine);
        assert_eq!(
            Priorities::default().of("ward/pump-1/alarm/x"),
            Priority::Routine
        );
    }

    #[test]
    fn the_key_byte_is_the_drain_order() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_byte(p as u8), Some(p));
        }
        assert!(Priority::Alarm < Priority::Vital && Priority::Vital < Priority::Routine);
        assert_eq!(Priority::from_byte(3), None);
    }
}
