//! A map from a `u64` key to a large value whose growth never moves the values through a
//! rehash.
//!
//! A hash table holding the values inline moves every one of them into freshly faulted pages
//! when it grows, and rehashes the whole table in place when removals have left it full of
//! tombstones. With 65 536 timelines of ~900 bytes, or 300 k TIME_WAIT entries, that was a
//! 200–780 ms stall of the thread that drains the rings on this VM, and the rings overflowed
//! (see `BENCHMARKS.md`). Here the table holds only the key and a slot number; the values live
//! in a vector that grows by `realloc` (pages remapped, not copied, once it is large) and
//! reuses freed slots.
use rustc_hash::FxHashMap as HashMap;

pub struct SlabMap<V> {
    index: HashMap<u64, u32>,
    slots: Vec<Option<(u64, V)>>,
    free: Vec<u32>,
    /// Slots never given back (what `with_slots` reserved).
    floor: usize,
}

/// Below this many slots a map never shrinks.
const SHRINK_MIN: usize = 4096;

impl<V> Default for SlabMap<V> {
    fn default() -> Self {
        SlabMap {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            floor: 0,
        }
    }
}

impl<V> SlabMap<V> {
    /// Room for `n` values allocated up front (address space only: pages are touched as
    /// values arrive), so a bounded map never reallocates.
    pub fn with_slots(n: usize) -> Self {
        SlabMap {
            index: HashMap::default(),
            slots: Vec::with_capacity(n),
            free: Vec::new(),
            floor: n,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, key: &u64) -> Option<&V> {
        let i = *self.index.get(key)?;
        self.slots[i as usize].as_ref().map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &u64) -> Option<&mut V> {
        let i = *self.index.get(key)?;
        self.slots[i as usize].as_mut().map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &u64) -> bool {
        self.index.contains_key(key)
    }

    /// The value of `key`, made by `make` when there is none.
    pub fn get_or_insert_with(&mut self, key: u64, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.place(key, make());
                self.index.insert(key, i);
                i
            }
        };
        &mut self.slots[i as usize]
            .as_mut()
            .expect("indexed slot is full")
            .1
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if let Some(&i) = self.index.get(&key)
            && let Some(slot) = self.slots[i as usize].as_mut()
        {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        let i = self.place(key, value);
        self.index.insert(key, i);
        None
    }

    pub fn remove(&mut self, key: &u64) -> Option<V> {
        let i = self.index.remove(key)?;
        self.free.push(i);
        let v = self.slots[i as usize].take().map(|(_, v)| v);
        self.maybe_shrink();
        v
    }

    /// After a peak (a TIME_WAIT pile-up that drained), gives the memory back: when fewer
    /// than a quarter of the slots are full, the values move into a vector twice their
    /// number. Each value moves once per halving, so removals stay O(1) amortised.
    fn maybe_shrink(&mut self) {
        let live = self.index.len();
        let slots = self.slots.len();
        if slots <= SHRINK_MIN.max(self.floor) || live * 4 >= slots {
            return;
        }
        let mut packed = Vec::with_capacity((live * 2).max(self.floor));
        for (k, v) in self.slots.drain(..).flatten() {
            self.index.insert(k, packed.len() as u32);
            packed.push(Some((k, v)));
        }
        self.slots = packed;
        self.free = Vec::new();
        self.index.shrink_to_fit();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.slots
            .iter()
            .filter_map(|s| s.as_ref().map(|(k, v)| (k, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().filter_map(|s| s.as_ref().map(|(_, v)| v))
    }

    /// Slots allocated, full or free (for memory bounds).
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }

    /// Bytes per slot of the value vector and per entry of the index, for memory bounds.
    pub const fn slot_bytes() -> usize {
        std::mem::size_of::<Option<(u64, V)>>()
    }

    pub fn index_capacity(&self) -> usize {
        self.index.capacity()
    }

    fn place(&mut self, key: u64, value: V) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((key, value));
                i
            }
            None => {
                self.slots.push(Some((key, value)));
                (self.slots.len() - 1) as u32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map_and_reuses_freed_slots() {
        let mut m: SlabMap<String> = SlabMap::default();
        assert!(m.is_empty());
        assert_eq!(m.insert(7, "a".into()), None);
        assert_eq!(m.insert(9, "b".into()), None);
        assert_eq!(m.insert(7, "c".into()), Some("a".into()));
        assert_eq!(m.get(&7).map(String::as_str), Some("c"));
        m.get_mut(&9).unwrap().push('!');
        assert_eq!(m.get(&9).map(String::as_str), Some("b!"));
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove(&7), Some("c".into()));
        assert_eq!(m.remove(&7), None);
        assert!(!m.contains_key(&7) && m.get(&7).is_none());
        // The freed slot is taken again: the vector does not grow.
        let cap = m.slots.len();
        m.get_or_insert_with(11, || "d".into()).push('?');
        assert_eq!(m.slots.len(), cap);
        assert_eq!(m.get_or_insert_with(11, || unreachable!()).as_str(), "d?");
        let mut all: Vec<(u64, &str)> = m.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.sort();
        assert_eq!(all, vec![(9, "b!"), (11, "d?")]);
        assert_eq!(m.values().count(), 2);
    }

    #[test]
    fn memory_comes_back_after_a_peak() {
        let mut m: SlabMap<[u64; 16]> = SlabMap::default();
        for k in 0..100_000u64 {
            m.insert(k, [k; 16]);
        }
        let peak = m.capacity();
        assert!(peak >= 100_000);
        // Drain to 1000: the slots shrink with it, every value still there.
        for k in 1000..100_000u64 {
            m.remove(&k);
        }
        assert_eq!(m.len(), 1000);
        assert!(m.capacity() < peak / 8, "{} of {peak}", m.capacity());
        for k in 0..1000u64 {
            assert_eq!(m.get(&k), Some(&[k; 16]));
        }
        // And it grows again as before.
        for k in 5000..6000u64 {
            m.insert(k, [k; 16]);
        }
        assert_eq!(m.len(), 2000);
        assert_eq!(m.get(&5500), Some(&[5500; 16]));
    }

    #[test]
    fn a_reserved_map_keeps_its_reservation() {
        let mut m: SlabMap<u64> = SlabMap::with_slots(10_000);
        for k in 0..10_000u64 {
            m.insert(k, k);
        }
        for k in 10..10_000u64 {
            m.remove(&k);
        }
        assert!(m.capacity() >= 10_000);
    }
}
