//! How the heap tables hold keys: [`ShortKey`] (up to 23 bytes inline,
//! for change logs and byte maps) and the typed tables' two-word entry
//! keys ([`Inline`] up to 15 bytes, else boxed), with the probes that
//! compare a record's key bytes against them.

use std::num::NonZeroU64;

/// A key of up to 23 bytes, inline: its length in the last byte. Hashing
/// and comparing it are three word operations (no `memcmp` call).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct ShortKey([u8; 24]);

impl ShortKey {
    /// The longest key kept inline.
    pub const MAX: usize = 23;

    /// `key` inline; `key` must be at most [`Self::MAX`] bytes long.
    #[inline]
    pub fn new(key: &[u8]) -> Self {
        let mut b = [0u8; 24];
        b[..key.len()].copy_from_slice(key);
        b[23] = key.len() as u8;
        ShortKey(b)
    }

    /// The key's 24 bytes as three 8-byte chunks.
    #[inline]
    fn chunks(&self) -> [[u8; 8]; 3] {
        let c = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[i..i + 8]);
            b
        };
        [c(0), c(8), c(16)]
    }

    /// The key as three words (for comparison and hashing).
    #[inline]
    pub fn words(&self) -> [u64; 3] {
        self.chunks().map(u64::from_ne_bytes)
    }

    /// The key's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.0[..usize::from(self.0[23])]
    }

    /// Three integers that order keys as their bytes do (the padding is
    /// zeros and the length comes last, so a key sorts before the longer
    /// keys it is a prefix of): sorting by them needs no `memcmp`.
    #[inline]
    pub fn ordered_words(&self) -> [u64; 3] {
        self.chunks().map(u64::from_be_bytes)
    }
}

impl PartialEq for ShortKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for ShortKey {}

impl std::hash::Hash for ShortKey {
    /// A folded multiply per word, chained, so that every key bit
    /// reaches the low bits a hash table indexes by. (Fx's multiply only
    /// carries upwards: keys differing in their high bytes alone, such as
    /// big-endian integers, collided, and a million of them took a second
    /// to insert.)
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        #[inline]
        fn fold(x: u64, y: u64) -> u64 {
            let p = u128::from(x) * u128::from(y);
            (p as u64) ^ ((p >> 64) as u64)
        }
        let [a, b, c] = self.words();
        let h = fold(a ^ 0x243F_6A88_85A3_08D3, 0x1319_8A2E_0370_7344);
        let h = fold(h ^ b, 0xA409_3822_299F_31D0);
        state.write_u64(fold(h ^ c, 0x082E_FA98_EC4E_6C89));
    }
}

/// A key of up to 15 bytes inline, as two words: the bytes, zero-padded,
/// with the length plus one in the last byte. That byte is never zero, so
/// neither is the second word, and its zero is the niche [`Key`] uses for
/// its discriminant: a `Key` is two words, an entry of a `u64` state 32
/// bytes (half a cache line; how many entries stay in cache decides the
/// hot path's speed). Comparing is two word compares.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(super) struct Inline {
    pub(super) lo: u64,
    pub(super) hi: NonZeroU64,
}

impl Inline {
    pub(super) const MAX: usize = 15;

    /// `key` inline; `key` must be at most [`Self::MAX`] bytes long.
    /// The words are read from `key` directly: copying it into a zeroed
    /// buffer and reading that back as words stalled on store-to-load
    /// forwarding (a tenth of the keyed operator's time).
    #[inline]
    pub(super) fn new(key: &[u8]) -> Self {
        let (lo, hi) = key.split_at(key.len().min(8));
        let len = (key.len() as u64 + 1) << 56;
        Inline {
            lo: le_word(lo),
            // Never zero: its last byte is not.
            hi: NonZeroU64::new(le_word(hi) | len).unwrap_or(NonZeroU64::MAX),
        }
    }

    /// The key's bytes (the first `len` of the array).
    #[inline]
    pub(super) fn bytes(&self) -> ([u8; 16], usize) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.lo.to_le_bytes());
        b[8..].copy_from_slice(&self.hi.get().to_le_bytes());
        let len = usize::from(b[15].saturating_sub(1)).min(Self::MAX);
        (b, len)
    }
}

/// Up to 8 bytes as a little-endian word, zero-padded: two overlapping
/// loads (or three byte loads), no loop and no buffer.
#[inline]
fn le_word(b: &[u8]) -> u64 {
    let n = b.len();
    let word4 = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[i..i + 4]);
        u64::from(u32::from_le_bytes(w))
    };
    if n >= 4 {
        // The two 4-byte halves overlap when n < 8; the overlap's bytes
        // are the same in both, so OR-ing them is exact.
        word4(0) | (word4(n - 4) << (8 * (n - 4)))
    } else if n > 0 {
        u64::from(b[0]) | (u64::from(b[n / 2]) << (8 * (n / 2))) | (u64::from(b[n - 1]) << (8 * (n - 1)))
    } else {
        0
    }
}

/// An entry's key: inline up to 15 bytes, else boxed twice (a thin
/// pointer, so that `Key` stays two words; longer keys pay a second
/// indirection when compared).
#[derive(Clone)]
pub(super) enum Key {
    Short(Inline),
    Long(Box<Box<[u8]>>),
}

/// A key's bytes, borrowed or (for an inline key) copied out.
pub(super) enum KeyBytes<'a> {
    Inline([u8; 16], usize),
    Long(&'a [u8]),
}

impl std::ops::Deref for KeyBytes<'_> {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            KeyBytes::Inline(b, len) => &b[..*len],
            KeyBytes::Long(b) => b,
        }
    }
}

impl Key {
    #[inline]
    pub(super) fn bytes(&self) -> KeyBytes<'_> {
        match self {
            Key::Short(k) => {
                let (b, len) = k.bytes();
                KeyBytes::Inline(b, len)
            }
            Key::Long(k) => KeyBytes::Long(k),
        }
    }
}

/// A probe for `bytes`: a long key is compared in place, not copied.
pub(super) enum Probe<'a> {
    Short(Inline),
    Long(&'a [u8]),
}

impl<'a> Probe<'a> {
    #[inline]
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        if bytes.len() <= Inline::MAX {
            Probe::Short(Inline::new(bytes))
        } else {
            Probe::Long(bytes)
        }
    }

    #[inline]
    pub(super) fn matches(&self, key: &Key) -> bool {
        match (key, self) {
            (Key::Short(a), Probe::Short(b)) => a == b,
            (Key::Long(a), Probe::Long(b)) => a[..] == **b,
            _ => false,
        }
    }

    #[inline]
    pub(super) fn to_key(&self) -> Key {
        match self {
            Probe::Short(k) => Key::Short(*k),
            Probe::Long(b) => Key::Long(Box::new((*b).into())),
        }
    }
}
