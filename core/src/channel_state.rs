//! The channel-state file format: the records in flight that an unaligned
//! checkpoint stores for one task subtask (Flink's channel state).
//!
//! ```text
//! file   = magic "SLCS" 0x00 version:u8 input_len:u64 input output
//! input  = postcard(Vec<T>)                  -- records on the task's inputs
//! output = postcard(Vec<(channel:u32, Vec<T>)>) -- records queued per output channel
//! ```
//!
//! Integers are little-endian. The whole file's CRC-32 is in the metadata
//! ([`crate::ChannelStateHandle::crc32`]) and is verified before anything is
//! decoded; record counts are checked against the metadata too.

use crate::metadata::ChannelStateHandle;
use crate::{Error, Result};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The magic and version at the start of a channel-state file.
const MAGIC: &[u8; 6] = b"SLCS\x00\x02";

/// Encodes a channel-state file from the input records and the already
/// encoded output part (postcard of `Vec<(channel, Vec<T>)>`).
pub fn encode<T: Serialize>(input: &[T], output: &[u8]) -> Result<Bytes> {
    let blob = postcard::to_allocvec(input).map_err(|e| Error::Serialization {
        what: "input channel state".into(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + blob.len() + output.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(&blob);
    out.extend_from_slice(output);
    Ok(out.into())
}

/// Encodes the output part: the records queued per output channel.
pub fn encode_output<T: Serialize>(per_channel: &[(u32, Vec<T>)]) -> Result<Vec<u8>> {
    postcard::to_allocvec(per_channel).map_err(|e| Error::Serialization {
        what: "output channel state".into(),
        reason: e.to_string(),
    })
}

/// Splits a verified file into its input and output parts.
fn parts<'a>(handle: &ChannelStateHandle, bytes: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    let path = &handle.path;
    crate::format::verify_snapshot_file(path, bytes, handle.crc32)?;
    let body = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| Error::corrupt(path, "not a channel-state file (bad magic or version)"))?;
    let (len, body) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| Error::corrupt(path, "truncated header"))?;
    let len = u64::from_le_bytes(*len);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= body.len())
        .ok_or_else(|| Error::corrupt(path, format!("input part of {len} bytes in a shorter file")))?;
    Ok(body.split_at(len))
}

/// The input records of a channel-state file, checked against `handle`
/// (CRC, magic, record count).
pub fn decode_input<X: DeserializeOwned>(handle: &ChannelStateHandle, bytes: &[u8]) -> Result<Vec<X>> {
    let (input, _) = parts(handle, bytes)?;
    let records: Vec<X> = postcard::from_bytes(input).map_err(|e| {
        Error::corrupt(
            &handle.path,
            format!("input channel state does not decode as this task's records: {e}"),
        )
    })?;
    if records.len() as u64 != handle.input_records {
        return Err(Error::corrupt(
            &handle.path,
            format!(
                "{} input records, the metadata says {}",
                records.len(),
                handle.input_records
            ),
        ));
    }
    Ok(records)
}

/// The output records per channel of a channel-state file, checked against
/// `handle` (CRC, magic, record count).
pub fn decode_output<X: DeserializeOwned>(
    handle: &ChannelStateHandle,
    bytes: &[u8],
) -> Result<Vec<(u32, Vec<X>)>> {
    let (_, output) = parts(handle, bytes)?;
    let per_channel: Vec<(u32, Vec<X>)> = postcard::from_bytes(output).map_err(|e| {
        Error::corrupt(
            &handle.path,
            format!("output channel state does not decode as this task's records: {e}"),
        )
    })?;
    let count: u64 = per_channel.iter().map(|(_, v)| v.len() as u64).sum();
    if count != handle.output_records {
        return Err(Error::corrupt(
            &handle.path,
            format!(
                "{count} output records, the metadata says {}",
                handle.output_records
            ),
        ));
    }
    Ok(per_channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(bytes: &[u8], input: u64, output: u64) -> ChannelStateHandle {
        ChannelStateHandle {
            task_uid: "t".into(),
            task_name: "t".into(),
            subtask: 0,
            parallelism: 1,
            path: "chk-1/channel-0-0.cst".into(),
            size: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
            input_records: input,
            output_records: output,
        }
    }

    #[test]
    fn input_and_output_records_round_trip_and_counts_are_checked() {
        let output = encode_output(&[(0u32, vec![7u64, 8]), (2, vec![9])]).unwrap();
        let file = encode(&[1u64, 2, 3], &output).unwrap();
        let h = handle(&file, 3, 3);
        assert_eq!(decode_input::<u64>(&h, &file).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            decode_output::<u64>(&h, &file).unwrap(),
            vec![(0, vec![7, 8]), (2, vec![9])]
        );
        let wrong = handle(&file, 4, 3);
        assert!(decode_input::<u64>(&wrong, &file).unwrap_err().is_corrupt());
        let wrong = handle(&file, 3, 2);
        assert!(decode_output::<u64>(&wrong, &file).unwrap_err().is_corrupt());
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_corrupt() {
        let output = encode_output(&[(1u32, vec![5u64])]).unwrap();
        let file = encode(&[1u64, 2], &output).unwrap();
        let h = handle(&file, 2, 1);
        for at in 0..file.len() {
            let mut bad = file.to_vec();
            bad[at] ^= 0x10;
            assert!(
                decode_input::<u64>(&h, &bad).unwrap_err().is_corrupt(),
                "flip at {at}"
            );
        }
        for len in 0..file.len() {
            assert!(
                decode_output::<u64>(&h, &file[..len]).unwrap_err().is_corrupt(),
                "cut at {len}"
            );
        }
    }
}
