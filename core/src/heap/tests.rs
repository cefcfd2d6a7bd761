use super::keys::Inline;
use super::*;

fn table() -> HeapTable<u64> {
    HeapTable::new(KeyGroupRange::new(0, 127).unwrap(), "op/sum".into())
}

#[test]
fn short_keys_order_by_their_words_as_by_their_bytes() {
    // Every key of up to 3 bytes over {0, 1, 255}, and long keys that
    // differ only in their last bytes or in length (prefixes, zeros).
    let mut keys: Vec<Vec<u8>> = vec![vec![]];
    for len in 1..=3 {
        let mut next = Vec::new();
        for k in keys.iter().filter(|k| k.len() == len - 1) {
            for b in [0u8, 1, 255] {
                let mut k = k.clone();
                k.push(b);
                next.push(k);
            }
        }
        keys.extend(next);
    }
    for len in [7, 8, 9, 15, 16, 17, 22, 23] {
        for last in [0u8, 1, 255] {
            let mut k = vec![9u8; len];
            k[len - 1] = last;
            keys.push(k.clone());
            keys.push(k[..len - 1].to_vec());
        }
    }
    for a in &keys {
        for b in &keys {
            let (x, y) = (ShortKey::new(a), ShortKey::new(b));
            assert_eq!(
                x.ordered_words().cmp(&y.ordered_words()),
                a.as_slice().cmp(b.as_slice()),
                "{a:?} against {b:?}"
            );
        }
    }
}

#[test]
fn update_inserts_changes_and_removes_with_one_probe() {
    let mut t = table();
    let k = KeyRef::new(b"alpha", 128);
    assert_eq!(t.update(&k, None, |v| v.replace(5)).unwrap(), None);
    assert_eq!(t.update(&k, None, |v| v.replace(7)).unwrap(), Some(5));
    assert_eq!(t.get(&k).unwrap(), Some(&7));
    assert_eq!(t.update(&k, None, |v| v.take()).unwrap(), Some(7));
    assert_eq!(t.get(&k).unwrap(), None);
    assert_eq!(TypedTable::len(&t), 0);
    // An update that leaves an absent key absent stores nothing.
    t.update(&k, None, |_| ()).unwrap();
    assert_eq!(TypedTable::len(&t), 0);
}

#[test]
fn an_entry_of_a_u64_state_is_four_words() {
    // Half a cache line: how many entries stay in cache decides the
    // hot path's speed (the entry load is its hottest instruction).
    assert_eq!(std::mem::size_of::<Key>(), 16);
    assert_eq!(std::mem::size_of::<Entry<u64>>(), 32);
}

#[test]
fn inline_keys_read_back_their_bytes() {
    let mut seen = Vec::new();
    for n in 0..=Inline::MAX {
        for fill in [0u8, 1, 0x80, 0xFF] {
            let key: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37) ^ fill).collect();
            let inline = Inline::new(&key);
            let (b, len) = inline.bytes();
            assert_eq!(&b[..len], &key[..], "{n} bytes");
            let words = (inline.lo, inline.hi.get());
            assert!(
                seen.iter().all(|(k, w)| k == &key || *w != words),
                "{key:?} collides"
            );
            seen.push((key, words));
        }
    }
}

#[test]
fn keys_of_every_length_are_kept_apart_and_read_back() {
    let mut t = table();
    // Lengths around the inline limit, and keys that are prefixes of
    // each other or differ only in their last byte.
    let keys: Vec<Vec<u8>> = (0..=40usize)
        .flat_map(|n| [vec![7u8; n], (0..n as u8).collect::<Vec<u8>>()])
        .chain([vec![7u8; 15].into_iter().chain([8]).collect()])
        .collect();
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    for (i, k) in distinct.iter().enumerate() {
        let r = KeyRef::new(k, 128);
        t.update(&r, None, |v| *v = Some(i as u64)).unwrap();
    }
    assert_eq!(TypedTable::len(&t), distinct.len());
    let mut seen = Vec::new();
    for (i, k) in distinct.iter().enumerate() {
        let r = KeyRef::new(k, 128);
        assert_eq!(t.get(&r).unwrap(), Some(&(i as u64)), "key {k:?}");
        let mut out = Vec::new();
        assert!(TypedTable::get_encoded(&t, r.key_group, k, &mut out).unwrap());
        assert_eq!(out, postcard::to_allocvec(&(i as u64)).unwrap());
        if !seen.contains(&r.key_group) {
            seen.push(r.key_group);
            t.visit_prefix(r.key_group, &[], &mut |key, value| {
                let j = distinct
                    .iter()
                    .position(|d| d == key)
                    .expect("a key that was written");
                assert_eq!(value, postcard::to_allocvec(&(j as u64)).unwrap());
                Ok(())
            })
            .unwrap();
        }
    }
}

/// Values whose drops are counted (only the test below makes them).
#[derive(Serialize, serde::Deserialize)]
struct Counted(u64);

static COUNTED_DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted(self.0)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        COUNTED_DROPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_update_that_unwinds_drops_each_value_once() {
    let drops = || COUNTED_DROPS.load(std::sync::atomic::Ordering::SeqCst);
    let mut t: HeapTable<Counted> = HeapTable::new(KeyGroupRange::new(0, 127).unwrap(), "op/counted".into());
    let (a, b) = (KeyRef::new(b"a", 128), KeyRef::new(b"b", 128));
    t.update(&a, None, |v| *v = Some(Counted(1))).unwrap();
    t.update(&b, None, |v| *v = Some(Counted(2))).unwrap();
    assert_eq!(drops(), 0);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.update(&a, None, |v| {
            assert_eq!(v.as_ref().map(|c| c.0), Some(1));
            panic!("a user function fails mid-update")
        })
    }));
    assert!(unwound.is_err());
    // The entry whose update unwound is gone, its value dropped once;
    // the other entry is intact.
    assert_eq!(drops(), 1);
    assert!(t.get(&a).unwrap().is_none());
    assert_eq!(t.get(&b).unwrap().map(|c| c.0), Some(2));
    assert_eq!(TypedTable::len(&t), 1);
    // A value replaced or removed by an update is dropped once.
    t.update(&b, None, |v| *v = Some(Counted(3))).unwrap();
    assert_eq!(drops(), 2);
    t.update(&b, None, |v| v.as_mut().unwrap().0 += 1).unwrap();
    assert_eq!(t.get(&b).unwrap().map(|c| c.0), Some(4));
    assert_eq!(drops(), 2);
    t.update(&b, None, |v| *v = None).unwrap();
    assert_eq!(drops(), 3);
    assert_eq!(TypedTable::len(&t), 0);
    t.update(&a, None, |v| *v = Some(Counted(5))).unwrap();
    drop(t);
    assert_eq!(drops(), 4);
}

#[test]
fn prefetch_is_only_a_hint() {
    // An empty table, present and absent keys, and key groups outside
    // the range: nothing fails, nothing changes.
    let mut t = HeapTable::<u64>::new(KeyGroupRange::new(0, 63).unwrap(), "op/sum".into());
    let key = |i: u64| i.to_le_bytes();
    let inside: Vec<u64> = (0..1000)
        .filter(|i| KeyRef::new(&key(*i), 128).key_group < 64)
        .collect();
    let outside = (0..1000)
        .find(|i| KeyRef::new(&key(*i), 128).key_group >= 64)
        .unwrap();
    t.prefetch(&KeyRef::new(&key(inside[0]), 128));
    for i in &inside[..inside.len() / 2] {
        t.update(&KeyRef::new(&key(*i), 128), None, |v| *v = Some(*i))
            .unwrap();
    }
    for i in inside.iter().chain([&outside]) {
        t.prefetch(&KeyRef::new(&key(*i), 128));
    }
    assert_eq!(TypedTable::len(&t), inside.len() / 2);
    for (n, i) in inside.iter().enumerate() {
        let expected = (n < inside.len() / 2).then_some(i);
        assert_eq!(t.get(&KeyRef::new(&key(*i), 128)).unwrap(), expected);
    }
}

/// A view that writes through the visiting default of
/// `append_key_group`.
struct Visiting(Arc<dyn TableView>);

impl TableView for Visiting {
    fn visit_key_group(&self, key_group: u32, visit: &mut KeyValueVisitor<'_>) -> Result<()> {
        self.0.visit_key_group(key_group, visit)
    }

    fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.0.get_encoded(key_group, key, out)
    }
}

/// Asserts that every key group of `t` is written directly exactly as the
/// visiting default writes it, and that there were entries in several.
fn written_as_visited<T: HeapValue>(t: &mut HeapTable<T>) {
    let direct = t.view();
    let visiting = Visiting(direct.clone());
    let mut groups = 0;
    for kg in 0..128 {
        for state in [0, 300] {
            let (mut a, mut b) = (vec![9u8], vec![9u8]);
            let n = direct.append_key_group(kg, state, &mut a).unwrap();
            let m = visiting.append_key_group(kg, state, &mut b).unwrap();
            assert_eq!((n, &a), (m, &b), "key group {kg}, state {state}");
            groups += usize::from(n > 0 && state == 0);
        }
    }
    assert!(groups > 1, "the keys fell into one key group only");
}

#[test]
fn entries_written_directly_are_the_visited_ones_byte_for_byte() {
    // Values whose encodings take a 1-, 2- and 3-byte length, short
    // and long keys, several key groups.
    let mut t = HeapTable::<String>::new(KeyGroupRange::new(0, 127).unwrap(), "op/text".into());
    for (i, len) in [0usize, 5, 126, 127, 128, 300, 16_383, 16_384, 20_000]
        .into_iter()
        .enumerate()
    {
        for key in [format!("k{i}"), format!("a key longer than fifteen bytes {i}")] {
            let value = "x".repeat(len);
            t.update(&KeyRef::new(key.as_bytes(), 128), None, |v| *v = Some(value))
                .unwrap();
        }
    }
    written_as_visited(&mut t);
    // Integers take the path assembled on the stack: keys of every inline
    // length and longer, values of 1 to 10 varint bytes, signed too.
    let keys: Vec<Vec<u8>> = (0..=20u8).map(|n| (0..n).map(|b| b ^ 0x5A).collect()).collect();
    let mut unsigned = HeapTable::<u64>::new(KeyGroupRange::new(0, 127).unwrap(), "op/u64".into());
    let mut signed = HeapTable::<i64>::new(KeyGroupRange::new(0, 127).unwrap(), "op/i64".into());
    let values = [0u64, 1, 127, 128, 16_383, 16_384, 1 << 35, u64::MAX - 1, u64::MAX];
    for (i, key) in keys.iter().enumerate() {
        let v = values[i % values.len()];
        unsigned
            .update(&KeyRef::new(key, 128), None, |x| *x = Some(v))
            .unwrap();
        let w = [i64::MIN, -1, 0, 63, -64, 64, i64::MAX][i % 7];
        signed
            .update(&KeyRef::new(key, 128), None, |x| *x = Some(w))
            .unwrap();
    }
    written_as_visited(&mut unsigned);
    written_as_visited(&mut signed);
}

#[test]
fn an_update_that_takes_a_boxed_value_and_unwinds_leaves_the_table_whole() {
    // A value holding a `Box` taken out by the function before it panics:
    // nothing in the table may still refer to it (run under Miri, this
    // would flag a dangling box moved by the table).
    let mut t: HeapTable<Box<u64>> = HeapTable::new(KeyGroupRange::new(0, 127).unwrap(), "op/box".into());
    let keys: Vec<[u8; 2]> = (0..64u8).map(|i| [i, 7]).collect();
    for (i, k) in keys.iter().enumerate() {
        t.update(&KeyRef::new(k, 128), None, |v| *v = Some(Box::new(i as u64)))
            .unwrap();
    }
    for k in keys.iter().step_by(2) {
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.update(&KeyRef::new(k, 128), None, |v| {
                let taken = v.take();
                drop(taken);
                panic!("a user function fails after taking the value")
            })
        }));
        assert!(unwound.is_err());
    }
    for (i, k) in keys.iter().enumerate() {
        let expected = (i % 2 == 1).then_some(i as u64);
        assert_eq!(t.get(&KeyRef::new(k, 128)).unwrap().map(|b| **b), expected);
    }
    assert_eq!(TypedTable::len(&t), keys.len() / 2);
}

#[test]
fn updates_and_removals_match_a_model() {
    use std::collections::BTreeMap;
    let mut t = table();
    let mut model: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for step in 0..20_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Short and long keys, few enough that most updates hit one.
        let n = (x % 300) as usize;
        let key: Vec<u8> = if n % 3 == 0 {
            format!("a long key number {n:04}").into_bytes()
        } else {
            (n as u64).to_le_bytes().to_vec()
        };
        let r = KeyRef::new(&key, 128);
        let expected = model.get(&key).copied();
        let remove = (x >> 20) % 4 == 0;
        let before = t
            .update(&r, None, |v| {
                let before = *v;
                *v = if remove { None } else { Some(v.unwrap_or(0) + step) };
                before
            })
            .unwrap();
        assert_eq!(before, expected, "step {step}");
        if remove {
            model.remove(&key);
        } else {
            *model.entry(key).or_insert(0) += step;
        }
    }
    assert_eq!(TypedTable::len(&t), model.len());
    for (k, v) in &model {
        assert_eq!(t.get(&KeyRef::new(k, 128)).unwrap(), Some(v));
    }
}

fn same_as_postcard<K: Serialize + 'static>(k: K) {
    let mut fast = vec![9u8];
    append_canonical(&k, &mut fast).unwrap();
    let mut expected = vec![9u8];
    expected.extend(postcard::to_allocvec(&k).unwrap());
    assert_eq!(fast, expected, "{}", std::any::type_name::<K>());
}

#[test]
fn integers_are_encoded_exactly_as_postcard_does() {
    let mut edges: Vec<u64> = vec![0, 1, 127, 128, 255, 256, 16_383, 16_384, u64::MAX, u64::MAX - 1];
    edges.extend((0..64).map(|b| 1u64 << b));
    edges.extend((0..64).map(|b| (1u64 << b) - 1));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        edges.push(x >> (x % 64));
    }
    for v in edges {
        same_as_postcard(v);
        same_as_postcard(v as u32);
        same_as_postcard(v as u16);
        same_as_postcard(v as i64);
        same_as_postcard(v as i32);
    }
    for v in [i64::MIN, -1, i64::MAX] {
        same_as_postcard(v);
    }
    for v in [i32::MIN, -1, i32::MAX] {
        same_as_postcard(v);
    }
    // Other types go through postcard itself.
    same_as_postcard(("key".to_string(), 7u8));
    same_as_postcard(vec![1u64, 300]);
}

#[test]
fn keys_of_15_and_16_bytes_are_both_found() {
    let mut t = table();
    let a = [7u8; 15];
    let b = [7u8; 16];
    t.update(&KeyRef::new(&a, 128), None, |v| *v = Some(15)).unwrap();
    t.update(&KeyRef::new(&b, 128), None, |v| *v = Some(16)).unwrap();
    assert_eq!(t.get(&KeyRef::new(&a, 128)).unwrap(), Some(&15));
    assert_eq!(t.get(&KeyRef::new(&b, 128)).unwrap(), Some(&16));
    assert_eq!(TypedTable::len(&t), 2);
}

#[test]
fn long_keys_are_kept_and_compared_whole() {
    let mut t = table();
    let a = vec![1u8; 40];
    let mut b = a.clone();
    b[39] = 2;
    t.update(&KeyRef::new(&a, 128), None, |v| *v = Some(1)).unwrap();
    t.update(&KeyRef::new(&b, 128), None, |v| *v = Some(2)).unwrap();
    assert_eq!(t.get(&KeyRef::new(&a, 128)).unwrap(), Some(&1));
    assert_eq!(t.get(&KeyRef::new(&b, 128)).unwrap(), Some(&2));
    let mut out = Vec::new();
    let kg = KeyRef::new(&b, 128).key_group;
    assert!(t.get_encoded(kg, &b, &mut out).unwrap());
    assert_eq!(out, postcard::to_allocvec(&2u64).unwrap());
}

#[test]
fn views_are_unchanged_by_later_writes() {
    let mut t = table();
    let k = KeyRef::new(b"k", 128);
    t.update(&k, None, |v| *v = Some(1)).unwrap();
    let view = t.view();
    t.update(&k, None, |v| *v = Some(2)).unwrap();
    t.update(&KeyRef::new(b"other", 128), None, |v| *v = Some(3))
        .unwrap();
    let mut out = Vec::new();
    assert!(view.get_encoded(k.key_group, b"k", &mut out).unwrap());
    assert_eq!(out, postcard::to_allocvec(&1u64).unwrap());
    let mut seen = Vec::new();
    for g in 0..128 {
        view.visit_key_group(g, &mut |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(seen, vec![(b"k".to_vec(), postcard::to_allocvec(&1u64).unwrap())]);
}

#[test]
fn tracking_records_a_key_once_per_epoch_and_every_deletion() {
    let mut t = table();
    let mut log = ChangeLog::default();
    let k = KeyRef::new(b"k", 128);
    for epoch in [1, 1, 1, 2] {
        t.update(
            &k,
            Some(Tracking {
                epoch,
                state: 3,
                log: &mut log,
            }),
            |v| *v.get_or_insert(0) += 1,
        )
        .unwrap();
    }
    assert_eq!(log.len(), 2, "first write of epoch 1 and of epoch 2");
    t.update(
        &k,
        Some(Tracking {
            epoch: 2,
            state: 3,
            log: &mut log,
        }),
        |v| *v = None,
    )
    .unwrap();
    assert_eq!(log.len(), 3, "a deletion is always recorded");
    assert!(log
        .short
        .iter()
        .all(|(g, s, key)| *g == k.key_group && *s == 3 && key.as_slice() == b"k"));
}

#[test]
fn a_log_past_its_limit_stops_recording_and_says_so() {
    let mut log = ChangeLog::with_limit(2);
    log.mark(0, 0, b"a");
    log.mark(0, 0, b"b");
    assert!(!log.overflowed());
    log.mark(0, 0, b"c");
    assert!(log.overflowed());
    assert_eq!(log.len(), 2);
}

#[test]
fn undecodable_bytes_are_refused_with_the_state_named() {
    let mut t = table();
    // A u64 varint that never ends.
    let err = t.put_encoded(0, b"k", &[0xff; 11], 0).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("op/sum") && msg.contains("u64"), "{msg}");
    assert_eq!(TypedTable::len(&t), 0);
}

#[test]
fn out_of_range_key_groups_are_errors() {
    let mut t: HeapTable<u64> = HeapTable::new(KeyGroupRange::new(10, 19).unwrap(), "op/s".into());
    let k = KeyRef {
        bytes: b"k",
        hash: 3,
        key_group: 3,
    };
    assert!(t.update(&k, None, |v| *v = Some(1)).is_err());
    assert!(t.get(&k).is_err());
    assert!(t.view().visit_key_group(25, &mut |_, _| Ok(())).is_err());
}

#[test]
fn many_keys_of_one_key_group_spread_over_buckets() {
    // Keys of one key group share their hash's low bits; the table must
    // still find each of them (and quickly: this inserts 20 000).
    let mut t: HeapTable<u64> = HeapTable::new(KeyGroupRange::all(128), "op/s".into());
    let mut inserted = Vec::new();
    let mut i = 0u64;
    while inserted.len() < 20_000 {
        let bytes = i.to_be_bytes();
        let k = KeyRef::new(&bytes, 128);
        if k.key_group == 5 {
            t.update(&k, None, |v| *v = Some(i)).unwrap();
            inserted.push(i);
        }
        i += 1;
    }
    assert_eq!(TypedTable::len(&t), 20_000);
    for i in inserted {
        let bytes = i.to_be_bytes();
        assert_eq!(t.get(&KeyRef::new(&bytes, 128)).unwrap(), Some(&i));
    }
}
