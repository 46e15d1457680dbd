//! Planning a multipart upload: which parts of a file go up, and which are copied inside the
//! store from a partial file's base version (neighbouring untouched parts become one copy).

use std::ops::Range;

use crate::cache::Partial;

/// The largest part S3 takes (a copied part may be this large).
const MAX_PART: u64 = 5 << 30;

/// The parts of a multipart upload of `size` bytes: ranges of `part_size`, and for a partial
/// file, whether each is copied from its base version inside the store. Neighbouring parts the
/// file holds no byte of become one copied part (up to [`MAX_PART`]), so a small change to a
/// large file takes a few requests, not one per part.
pub(super) fn plan_parts(
    size: u64,
    part_size: u64,
    partial: Option<&Partial>,
) -> Vec<(Range<u64>, bool)> {
    let mut plan: Vec<(Range<u64>, bool)> = Vec::new();
    for start in (0..size).step_by(part_size as usize) {
        let range = start..(start + part_size).min(size);
        let copied = partial.is_some_and(|p| p.from_base(range.clone()) == [range.clone()]);
        match plan.last_mut() {
            Some((last, true)) if copied && range.end - last.start <= MAX_PART => {
                last.end = range.end;
            }
            _ => plan.push((range, copied)),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use crate::cache::RangeSet;

    use super::*;

    use crate::store::ETag;

    const MIB: u64 = 1 << 20;

    #[test]
    fn unchanged_neighbouring_parts_are_copied_as_one() {
        let mut changed = RangeSet::default();
        changed.insert(20 * MIB..20 * MIB + 16);
        let partial = Partial {
            etag: ETag("\"base\"".into()),
            base_end: 64 * MIB,
            changed,
        };
        let plan = plan_parts(70 * MIB, 8 * MIB, Some(&partial));
        assert_eq!(
            plan,
            [
                (0..16 * MIB, true),
                (16 * MIB..24 * MIB, false),
                (24 * MIB..64 * MIB, true),
                (64 * MIB..70 * MIB, false),
            ]
        );
        let whole = plan_parts(20 * MIB, 8 * MIB, None);
        assert_eq!(
            whole,
            [
                (0..8 * MIB, false),
                (8 * MIB..16 * MIB, false),
                (16 * MIB..20 * MIB, false)
            ]
        );
    }
}
