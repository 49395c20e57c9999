//! Which offsets may be committed while records finish out of order: per
//! partition, everything below the lowest record still in flight.
//!
//! The tracker lives for one assignment generation of the consumer. After
//! a rebalance the consumer reads from the committed offsets again, so
//! what was tracked before says nothing about the records now arriving:
//! it is forgotten, and records of an earlier generation that finish later
//! store nothing (their partition's new reading covers them again).

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub struct Offsets {
    generation: u64,
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    highest: i64,
    stored: Option<i64>,
}

impl Offsets {
    /// A record of assignment `generation` is taken on.
    pub fn begin(&mut self, generation: u64, topic: &str, partition: i32, offset: i64) {
        if generation < self.generation {
            return;
        }
        if generation > self.generation {
            self.partitions.clear();
            self.generation = generation;
        }
        let p = self.partitions.entry((topic.to_owned(), partition)).or_default();
        p.in_flight.insert(offset);
        p.highest = p.highest.max(offset);
    }

    /// Marks a record done. Returns the offset of the last record of the
    /// partition below which everything is done, when it moved.
    pub fn finish(&mut self, generation: u64, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        if generation != self.generation {
            return None;
        }
        let p = self.partitions.get_mut(&(topic.to_owned(), partition))?;
        p.in_flight.remove(&offset);
        let done = match p.in_flight.first() {
            Some(lowest) => lowest - 1,
            None => p.highest,
        };
        if done < 0 || p.stored.is_some_and(|s| s >= done) {
            return None;
        }
        p.stored = Some(done);
        Some(done)
    }

    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_contiguous_prefix_of_done_records_is_committed() {
        let mut o = Offsets::default();
        for off in 0..4 {
            o.begin(0, "t", 0, off);
        }
        assert_eq!(o.finish(0, "t", 0, 2), None, "0 and 1 are still in flight");
        assert_eq!(o.finish(0, "t", 0, 0), Some(0));
        assert_eq!(o.finish(0, "t", 0, 1), Some(2));
        assert_eq!(o.finish(0, "t", 0, 3), Some(3));
        assert_eq!(o.in_flight(), 0);
        o.begin(0, "t", 1, 7);
        assert_eq!(o.finish(0, "t", 1, 7), Some(7));
    }

    #[test]
    fn a_rebalance_forgets_what_was_read_before_it() {
        let mut o = Offsets::default();
        for off in 10..20 {
            o.begin(1, "t", 0, off);
        }
        for off in 10..15 {
            assert_eq!(o.finish(1, "t", 0, off), Some(off));
        }
        // Reassigned and read again from a committed offset of 12: neither
        // the highest offset seen before nor the late finishes of the
        // records read before may be stored for it.
        o.begin(2, "t", 0, 12);
        o.begin(2, "t", 0, 13);
        for off in 15..20 {
            assert_eq!(o.finish(1, "t", 0, off), None);
        }
        assert_eq!(o.finish(2, "t", 0, 12), Some(12));
        assert_eq!(o.finish(2, "t", 0, 13), Some(13));
    }

    #[test]
    fn a_late_finish_of_an_earlier_generation_moves_nothing() {
        let mut o = Offsets::default();
        o.begin(1, "t", 0, 5);
        o.begin(1, "t", 0, 6);
        o.begin(2, "t", 0, 3);
        assert_eq!(o.finish(1, "t", 0, 6), None);
        assert_eq!(o.finish(1, "t", 0, 5), None);
        assert_eq!(o.finish(2, "t", 0, 3), Some(3));
    }
}
