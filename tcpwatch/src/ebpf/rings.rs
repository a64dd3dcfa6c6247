//! The event ring buffers: how many (one per CPU group, up to the four the object has) and
//! how big.
/// Ring buffers in the object; CPU c writes to ring c % ring_count().
pub(super) const RINGS: [&str; 4] = ["EVENTS_0", "EVENTS_1", "EVENTS_2", "EVENTS_3"];

/// One ring per CPU up to the four the object has.
pub fn ring_count() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1) as u32;
    cpus.clamp(1, RINGS.len() as u32)
}

/// Bytes per ring: the total split evenly, a power of two, at least 64 KiB.
pub fn ring_size(total: u32, rings: u32) -> u32 {
    let each = (total / rings.max(1)).max(64 << 10);
    if each.is_power_of_two() {
        each
    } else {
        each.next_power_of_two() >> 1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ring_sizes_are_powers_of_two() {
        use super::ring_size;
        assert_eq!(ring_size(16 << 20, 2), 8 << 20);
        assert_eq!(ring_size(16 << 20, 3), 4 << 20);
        assert_eq!(ring_size(1 << 20, 4), 256 << 10);
        assert_eq!(ring_size(64 << 10, 4), 64 << 10);
    }
}
