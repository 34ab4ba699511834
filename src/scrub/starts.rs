//! Where a credential pattern may start: a sound filter in front of the scrubber's automata.
//!
//! Scanning every byte of a body or an audit line with an automaton of several hundred patterns
//! costs a few nanoseconds a byte, as its first bytes are common letters and digits (so
//! aho-corasick's own prefilters do not help, see `Scrubber::new`). Every pattern is at least
//! `WINDOW` bytes long, so a pattern can start only where the `WINDOW` bytes there are the first
//! `WINDOW` bytes of some pattern, ignoring ASCII case. This table holds a bit per hashed window
//! of every pattern's start; a position whose window's bit is clear cannot start a match, and the
//! automaton is walked, anchored, only from the few positions whose bit is set. A set bit may be
//! a hash collision: the anchored walk decides.

/// The bytes hashed at each position; no pattern is shorter.
pub const WINDOW: usize = 4;

/// log2 of the table's bits: 2^17 bits is 16 KiB, a few collisions with thousands of patterns.
const TABLE_BITS: u32 = 17;

pub struct Starts {
    bits: Box<[u64]>,
}

/// The window at `at`, with ASCII case folded the way both the patterns and the text are: the
/// 0x20 bit set in every byte. Bytes equal ignoring ASCII case stay equal; others may collide,
/// which only makes the filter less selective, never unsound.
fn key(haystack: &[u8], at: usize) -> usize {
    let window: [u8; WINDOW] = haystack[at..at + WINDOW].try_into().expect("WINDOW bytes");
    let folded = u32::from_le_bytes(window) | 0x2020_2020;
    (folded.wrapping_mul(0x9E37_79B1) >> (32 - TABLE_BITS)) as usize
}

impl Starts {
    /// The filter for `patterns`, or `None` if one is shorter than `WINDOW` (then every position
    /// must be searched).
    pub fn new(patterns: &[Vec<u8>]) -> Option<Starts> {
        debug_assert!(patterns.iter().all(|pattern| !pattern.is_empty()), "an empty pattern matches everywhere");
        if patterns.iter().any(|pattern| pattern.len() < WINDOW) {
            return None;
        }
        let mut bits = vec![0u64; 1 << (TABLE_BITS - 6)].into_boxed_slice();
        for pattern in patterns {
            let key = key(pattern, 0);
            bits[key / 64] |= 1 << (key % 64);
        }
        Some(Starts { bits })
    }

    /// The first position at or after `from` where a pattern may start, if any.
    pub fn next(&self, haystack: &[u8], from: usize) -> Option<usize> {
        let last = haystack.len().checked_sub(WINDOW)?;
        (from..=last).find(|&at| self.may_start_at(haystack, at))
    }

    /// Whether a pattern may start at `at`, which has at least `WINDOW` bytes after it.
    pub fn may_start_at(&self, haystack: &[u8], at: usize) -> bool {
        let key = key(haystack, at);
        self.bits[key / 64] & (1 << (key % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_start_is_a_candidate_in_any_case() {
        let patterns = vec![b"sk-Secret-1234".to_vec(), b"736b2d".to_vec(), b"c2stU2Vj".to_vec()];
        let starts = Starts::new(&patterns).unwrap();
        let text = b"xx SK-secret-1234 and 736B2D and c2stu2vj, then plain prose".to_vec();
        let mut found = Vec::new();
        let mut at = 0;
        while let Some(position) = starts.next(&text, at) {
            found.push(position);
            at = position + 1;
        }
        for needle in [&b"SK-secret"[..], b"736B2D", b"c2stu2vj"] {
            let position = text.windows(needle.len()).position(|w| w == needle).unwrap();
            assert!(found.contains(&position), "{:?} at {position} not a candidate: {found:?}", needle);
        }
        // A filter, not a search: far fewer candidates than positions.
        assert!(found.len() < text.len() / 4, "{found:?}");
    }

    #[test]
    fn short_patterns_disable_the_filter_and_short_text_has_no_candidates() {
        assert!(Starts::new(&[b"abc".to_vec()]).is_none());
        let starts = Starts::new(&[b"abcd".to_vec()]).unwrap();
        assert_eq!(starts.next(b"abc", 0), None);
        assert_eq!(starts.next(b"ABCD", 0), Some(0));
        assert_eq!(starts.next(b"xABCD", 2), None);
    }
}
