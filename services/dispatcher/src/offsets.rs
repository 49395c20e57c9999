//! Which offsets may be committed while records finish out of order: per
//! partition, everything below the lowest record still in flight.

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub struct Offsets {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    highest: i64,
    stored: Option<i64>,
}

impl Offsets {
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.partitions.entry((topic.to_owned(), partition)).or_default();
        p.in_flight.insert(offset);
        p.highest = p.highest.max(offset);
    }

    /// Marks a record done. Returns the offset of the last record of the
    /// partition below which everything is done, when it moved.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
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
            o.begin("t", 0, off);
        }
        assert_eq!(o.finish("t", 0, 2), None, "0 and 1 are still in flight");
        assert_eq!(o.finish("t", 0, 0), Some(0));
        assert_eq!(o.finish("t", 0, 1), Some(2));
        assert_eq!(o.finish("t", 0, 3), Some(3));
        assert_eq!(o.in_flight(), 0);
        o.begin("t", 1, 7);
        assert_eq!(o.finish("t", 1, 7), Some(7));
    }
}
