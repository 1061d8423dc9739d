//! Splits protomux batch frames that mix several channels into one frame per channel.
//!
//! A batch frame is `00 00 <channel> (<len> <message>)*`, where a `00` byte followed by another
//! channel id switches channels. `hypercore-protocol` 0.7.2 misreads that separator, so such
//! frames are re-cut here into single-channel batches, which it decodes correctly.

/// The frames to hand on for one frame: itself, or one batch per channel segment, each cut to
/// at most `max_bytes` (a single larger message stays whole).
pub(crate) fn split_channels(frame: Vec<u8>, max_bytes: usize) -> Vec<Vec<u8>> {
    if frame.len() <= max_bytes && !frame.starts_with(&[0, 0]) {
        return vec![frame];
    }
    match segments(&frame, max_bytes) {
        Some(segments) if segments.len() > 1 => segments,
        _ => vec![frame],
    }
}

fn segments(frame: &[u8], max_bytes: usize) -> Option<Vec<Vec<u8>>> {
    let rest = frame.strip_prefix(&[0, 0])?;
    let (mut channel, mut rest) = varint(rest)?;
    let mut out = Vec::new();
    let mut current = header(channel);
    let mut has_message = false;
    while let Some(&first) = rest.first() {
        if first == 0 {
            // Channel switch: 00 <channel>.
            let (next, after) = varint(&rest[1..])?;
            if has_message {
                out.push(std::mem::replace(&mut current, header(next)));
            } else {
                current = header(next);
            }
            channel = next;
            has_message = false;
            rest = after;
            continue;
        }
        let (len, after) = varint(rest)?;
        let len = usize::try_from(len).ok()?;
        let message = after.get(..len)?;
        let prefix_len = rest.len() - after.len();
        if has_message && current.len() + prefix_len + len > max_bytes {
            out.push(std::mem::replace(&mut current, header(channel)));
        }
        current.extend_from_slice(&rest[..prefix_len]);
        current.extend_from_slice(message);
        has_message = true;
        rest = &after[len..];
    }
    let _ = channel;
    if has_message {
        out.push(current);
    }
    Some(out)
}

fn header(channel: u64) -> Vec<u8> {
    let mut out = vec![0, 0];
    put_varint(&mut out, channel);
    out
}

/// Encodes a compact-encoding uint, as protomux writes channel ids.
pub(crate) fn put_varint(out: &mut Vec<u8>, value: u64) {
    if value < 0xfd {
        out.push(value as u8);
    } else if let Ok(v) = u16::try_from(value) {
        out.push(0xfd);
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        out.push(0xfe);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        out.push(0xff);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Decodes a compact-encoding uint.
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    match first {
        0..=0xfc => Some((u64::from(first), rest)),
        0xfd => Some((
            u64::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?)),
            &rest[2..],
        )),
        0xfe => Some((
            u64::from(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)),
            &rest[4..],
        )),
        0xff => Some((
            u64::from_le_bytes(rest.get(..8)?.try_into().ok()?),
            &rest[8..],
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_channel_batches_pass_through() {
        let frame = vec![0, 0, 1, 2, 9, 9, 1, 7];
        assert_eq!(split_channels(frame.clone(), 1 << 20), vec![frame]);
    }

    #[test]
    fn multi_channel_batches_are_split() {
        // channel 1: [9 9]; switch to channel 2: [7]; switch to channel 300: [5 5 5]
        let mut frame = vec![0, 0, 1, 2, 9, 9, 0, 2, 1, 7, 0, 0xfd];
        frame.extend_from_slice(&300u16.to_le_bytes());
        frame.extend_from_slice(&[3, 5, 5, 5]);
        let split = split_channels(frame, 1 << 20);
        let mut third = vec![0, 0, 0xfd];
        third.extend_from_slice(&300u16.to_le_bytes());
        third.extend_from_slice(&[3, 5, 5, 5]);
        assert_eq!(
            split,
            vec![vec![0, 0, 1, 2, 9, 9], vec![0, 0, 2, 1, 7], third]
        );
    }

    #[test]
    fn large_batches_are_cut_by_size() {
        let mut frame = vec![0, 0, 1];
        for _ in 0..4 {
            frame.extend_from_slice(&[3, 8, 8, 8]);
        }
        let split = split_channels(frame, 12);
        assert_eq!(split, vec![vec![0, 0, 1, 3, 8, 8, 8, 3, 8, 8, 8]; 2]);
    }

    #[test]
    fn malformed_frames_pass_through_unchanged() {
        for frame in [vec![0, 0], vec![0, 0, 1, 5, 1], vec![1, 2, 3], vec![]] {
            assert_eq!(split_channels(frame.clone(), 1 << 20), vec![frame]);
        }
    }
}
