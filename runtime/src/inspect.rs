//! Looking inside a savepoint or checkpoint without running the job: its
//! metadata in human form ([`describe`]) and one operator's keyed state as
//! JSON lines ([`dump_operator`]), decoded by the state types recorded in
//! the metadata where they are common types (integers, floats, `bool`,
//! `char`, `String`, vectors and pairs of those), else as hex.

use crate::error::{Result, RuntimeError};
use crate::savepoint::RestoreSource;
use crate::schema::hex;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sluice_core::{OperatorUid, StateDescriptor};
use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

/// The metadata of `source` as a person reads it.
pub fn describe(source: &RestoreSource) -> String {
    let m = &source.metadata;
    let mut out = String::new();
    let time = UNIX_EPOCH + Duration::from_millis(m.trigger_time_ms);
    let files: usize = m
        .operators
        .iter()
        .flat_map(|o| &o.subtasks)
        .filter(|s| s.keyed_state.is_some())
        .count();
    let _ = writeln!(out, "{} {} of job {}", m.kind, m.checkpoint_id, m.job_name);
    let _ = writeln!(out, "  location:         {}", source.location);
    let _ = writeln!(
        out,
        "  taken:            {} (took {} ms)",
        humantime::format_rfc3339_millis(time),
        m.duration_ms
    );
    let _ = writeln!(
        out,
        "  written by:       sluice {}, metadata format {}, snapshot format {}",
        if m.sluice_version.is_empty() {
            "?"
        } else {
            &m.sluice_version
        },
        m.format_version,
        m.snapshot_format_version
    );
    let _ = writeln!(out, "  max parallelism:  {}", m.max_parallelism);
    let _ = writeln!(
        out,
        "  state:            {} bytes in {files} files",
        m.state_size()
    );
    let _ = writeln!(out, "operators:");
    for op in &m.operators {
        if let Some(splits) = op.source_splits {
            let _ = writeln!(
                out,
                "  {} (source, {splits} splits, parallelism {})",
                op.uid, op.parallelism
            );
            let mut positions: Vec<_> = op.subtasks.iter().flat_map(|s| &s.splits).collect();
            positions.sort_by_key(|p| p.split);
            for p in positions {
                let _ = writeln!(out, "    split {}: position {}", p.split, p.offset);
            }
            continue;
        }
        let states: Vec<String> = op
            .states
            .iter()
            .map(|d| format!("{} ({})", d.name, crate::state::describe_state(d)))
            .collect();
        let _ = writeln!(
            out,
            "  {} (keyed by {}, parallelism {}; states: {})",
            op.uid,
            op.key_type.as_deref().unwrap_or("?"),
            op.parallelism,
            if states.is_empty() {
                "none".to_string()
            } else {
                states.join(", ")
            }
        );
        for st in &op.subtasks {
            if let Some(f) = &st.keyed_state {
                let _ = writeln!(
                    out,
                    "    subtask {}: key groups {}, {} entries, {} bytes, {}",
                    st.subtask, f.key_groups, f.entries, f.size, f.path
                );
            }
            for c in &st.keyed_changes {
                let _ = writeln!(
                    out,
                    "      + changes: {} entries, {} bytes, {}",
                    c.entries, c.size, c.path
                );
            }
        }
    }
    out
}

fn exact<T: DeserializeOwned + serde::Serialize>(bytes: &[u8]) -> Option<Value> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((v, [])) => serde_json::to_value(v).ok(),
        _ => None,
    }
}

/// Decodes postcard `bytes` of the Rust type `type_name` (as
/// `std::any::type_name` spells it) if it is a common type.
pub fn decode_value(type_name: &str, bytes: &[u8]) -> Option<Value> {
    macro_rules! types {
        ($($t:ty),*) => {
            $(
                if type_name == std::any::type_name::<$t>() {
                    return exact::<$t>(bytes);
                }
                if type_name == std::any::type_name::<Vec<$t>>() {
                    return exact::<Vec<$t>>(bytes);
                }
                if type_name == std::any::type_name::<Option<$t>>() {
                    return exact::<Option<$t>>(bytes);
                }
            )*
        };
    }
    types!(
        u8,
        u16,
        u32,
        u64,
        u128,
        i8,
        i16,
        i32,
        i64,
        i128,
        f32,
        f64,
        bool,
        char,
        String,
        ()
    );
    macro_rules! pairs {
        ($(($a:ty, $b:ty)),*) => {
            $(
                if type_name == std::any::type_name::<($a, $b)>() {
                    return exact::<($a, $b)>(bytes);
                }
            )*
        };
    }
    pairs!(
        (u64, u64),
        (u32, u32),
        (i64, i64),
        (String, u64),
        (u64, String),
        (String, String),
        (u64, f64)
    );
    None
}

fn value_or_hex(type_name: Option<&str>, bytes: &[u8]) -> Value {
    type_name
        .and_then(|t| decode_value(t, bytes))
        .unwrap_or_else(|| json!({ "hex": hex(bytes) }))
}

/// A value or list state's value as JSON: an evolvable value from its
/// CBOR (self-describing: any type), a value with a time-to-live as
/// `{"renewed_ms", "value"}`, else by its type name if common.
fn decode_state_value(d: &StateDescriptor, bytes: &[u8]) -> Value {
    let list = d.kind == "list";
    if d.ttl_ms.is_some() && !list {
        if let Ok((renewed, rest)) = postcard::take_from_bytes::<u64>(bytes) {
            let inner = StateDescriptor {
                ttl_ms: None,
                ..d.clone()
            };
            return json!({ "renewed_ms": renewed, "value": decode_state_value(&inner, rest) });
        }
    }
    if d.schema.is_some() && d.ttl_ms.is_none() {
        let json = match list {
            true => postcard::from_bytes::<Vec<&[u8]>>(bytes).ok().and_then(|items| {
                items
                    .into_iter()
                    .map(|c| crate::schema::from_cbor::<Value>(c).ok())
                    .collect::<Option<Vec<Value>>>()
                    .map(Value::Array)
            }),
            false => postcard::from_bytes::<&[u8]>(bytes)
                .ok()
                .and_then(|c| crate::schema::from_cbor::<Value>(c).ok()),
        };
        if let Some(v) = json {
            return v;
        }
    }
    let value_type = match list {
        true => format!("alloc::vec::Vec<{}>", d.value_type),
        false => d.value_type.clone(),
    };
    value_or_hex(Some(&value_type), bytes)
}

/// Calls `line` with one JSON object per keyed-state entry of operator
/// `uid` in `source`: `{"key_group", "key", "state", "value"}` (map state
/// adds `"map_key"`). Returns the number of entries. Every state file is
/// read whole and its checksum verified.
pub async fn dump_operator(
    source: &RestoreSource,
    uid: &str,
    line: &mut (dyn FnMut(Value) + Send),
) -> Result<u64> {
    let uid = OperatorUid(uid.to_string());
    let Some(op) = source.metadata.operator(&uid) else {
        let known: Vec<&str> = source.metadata.operators.iter().map(|o| o.uid.as_str()).collect();
        return Err(RuntimeError::InvalidJob(format!(
            "{} has no operator {uid}; it has: {}",
            source.describe_with_location(),
            known.join(", ")
        )));
    };
    let key_type = op.key_type.clone();
    let states: Vec<StateDescriptor> = op.states.clone();
    let mut n = 0u64;
    // Chains applied: the state as it is at this checkpoint.
    let entries = crate::savepoint::read_keyed_entries(source.storage.as_ref(), &source.base, op).await?;
    for ((name, kg, k), v) in entries {
        let (k, v) = (k.as_slice(), v.as_slice());
        let desc = states.iter().find(|d| d.name == name);
        let mut entry = json!({ "key_group": kg, "state": name });
        match desc.filter(|d| d.kind == "map") {
            Some(d) => {
                // Map entries: u32 LE length of the key, the key, the map key.
                let split = k
                    .get(..4)
                    .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize + 4)
                    .filter(|end| *end <= k.len());
                match split {
                    Some(end) => {
                        entry["key"] = value_or_hex(key_type.as_deref(), &k[4..end]);
                        entry["map_key"] = value_or_hex(d.map_key_type.as_deref(), &k[end..]);
                    }
                    None => entry["key"] = json!({ "hex": hex(k) }),
                }
                entry["value"] = decode_state_value(d, v);
            }
            None => {
                entry["key"] = value_or_hex(key_type.as_deref(), k);
                entry["value"] = match desc {
                    Some(d) => decode_state_value(d, v),
                    None => value_or_hex(None, v),
                };
            }
        }
        line(entry);
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_types_decode_and_others_are_left_alone() {
        let b = postcard::to_allocvec(&123_456u64).unwrap();
        assert_eq!(decode_value("u64", &b), Some(json!(123_456)));
        let b = postcard::to_allocvec(&String::from("hé")).unwrap();
        assert_eq!(decode_value("alloc::string::String", &b), Some(json!("hé")));
        let b = postcard::to_allocvec(&vec![1i32, -2]).unwrap();
        assert_eq!(decode_value("alloc::vec::Vec<i32>", &b), Some(json!([1, -2])));
        assert_eq!(decode_value("my::Type", &b), None);
        // Trailing bytes: not that type.
        assert_eq!(decode_value("u8", &[1, 2]), None);
        assert_eq!(value_or_hex(None, &[0xab, 0x01]), json!({ "hex": "ab01" }));
    }

    #[test]
    fn evolvable_and_ttl_values_dump_as_json() {
        #[derive(Clone, serde::Serialize, serde::Deserialize)]
        struct Account {
            owner: String,
            cents: i64,
        }
        let mut d = StateDescriptor {
            name: "a".into(),
            kind: "value".into(),
            value_type: "my::Account".into(),
            map_key_type: None,
            schema: Some(sluice_core::SchemaId {
                name: "bank.Account".into(),
                version: 3,
            }),
            ttl_ms: None,
        };
        let v = crate::schema::Evolving(Account {
            owner: "ada".into(),
            cents: -5,
        });
        let b = postcard::to_allocvec(&v).unwrap();
        assert_eq!(decode_state_value(&d, &b), json!({ "owner": "ada", "cents": -5 }));
        d.schema = None;
        d.value_type = "u64".into();
        d.ttl_ms = Some(1000);
        let b = postcard::to_allocvec(&crate::ttl::TtlValue {
            renewed_ms: 77,
            value: 9u64,
        })
        .unwrap();
        assert_eq!(
            decode_state_value(&d, &b),
            json!({ "renewed_ms": 77, "value": 9 })
        );
    }
}
