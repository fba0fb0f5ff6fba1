//! The byte form of a [`UserState`], used by sled and (later) the changelog.
//!
//! Layout: a version byte, then `max_ts`, then each aggregator as a tag byte and its
//! data. Integers are LEB128 varints (signed ones zig-zagged, bucket ids delta-coded);
//! sums are raw little-endian f64 so that a round trip is bit-exact.

use super::{AggState, DistinctBucket, UserState, WindowBucket};

const VERSION: u8 = 1;
const TAG_WINDOW: u8 = 1;
const TAG_DISTINCT: u8 = 2;
const TAG_LAST: u8 = 3;
const TAG_LIFETIME: u8 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt user state at byte {at}: {what}")]
pub struct StateDecodeError {
    pub at: usize,
    pub what: &'static str,
}

pub fn encode_user_state(state: &UserState, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_i64(out, state.max_ts);
    put_u64(out, state.aggs.len() as u64);
    for agg in &state.aggs {
        match agg {
            AggState::Window(buckets) => {
                out.push(TAG_WINDOW);
                put_u64(out, buckets.len() as u64);
                let mut prev = 0i64;
                for b in buckets {
                    put_i64(out, b.id.wrapping_sub(prev));
                    prev = b.id;
                    put_u64(out, u64::from(b.count));
                    out.extend_from_slice(&b.sum.to_le_bytes());
                }
            }
            AggState::Distinct(buckets) => {
                out.push(TAG_DISTINCT);
                put_u64(out, buckets.len() as u64);
                let mut prev = 0i64;
                for b in buckets {
                    put_i64(out, b.id.wrapping_sub(prev));
                    prev = b.id;
                    put_u64(out, b.values.len() as u64);
                    for v in &b.values {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            AggState::Last(ts) => {
                out.push(TAG_LAST);
                put_i64(out, *ts);
            }
            AggState::Lifetime(n) => {
                out.push(TAG_LIFETIME);
                put_u64(out, *n);
            }
        }
    }
}

pub fn decode_user_state(bytes: &[u8]) -> Result<UserState, StateDecodeError> {
    let mut r = Reader { bytes, at: 0 };
    if r.byte()? != VERSION {
        return Err(r.error("unknown state version"));
    }
    let max_ts = r.i64()?;
    let n = r.len()?;
    let mut aggs = Vec::with_capacity(n);
    for _ in 0..n {
        let agg = match r.byte()? {
            TAG_WINDOW => {
                let len = r.len()?;
                let mut buckets = Vec::with_capacity(len);
                let mut prev = 0i64;
                for _ in 0..len {
                    let id = prev.wrapping_add(r.i64()?);
                    prev = id;
                    let count = u32::try_from(r.u64()?)
                        .map_err(|_| r.error("bucket count overflows u32"))?;
                    let sum = f64::from_le_bytes(r.array()?);
                    buckets.push(WindowBucket { id, count, sum });
                }
                AggState::Window(buckets)
            }
            TAG_DISTINCT => {
                let len = r.len()?;
                let mut buckets = Vec::with_capacity(len);
                let mut prev = 0i64;
                for _ in 0..len {
                    let id = prev.wrapping_add(r.i64()?);
                    prev = id;
                    let n = r.len()?;
                    let mut values = Vec::with_capacity(n);
                    for _ in 0..n {
                        values.push(u64::from_le_bytes(r.array()?));
                    }
                    buckets.push(DistinctBucket { id, values });
                }
                AggState::Distinct(buckets)
            }
            TAG_LAST => AggState::Last(r.i64()?),
            TAG_LIFETIME => AggState::Lifetime(r.u64()?),
            _ => return Err(r.error("unknown aggregator tag")),
        };
        aggs.push(agg);
    }
    if r.at != bytes.len() {
        return Err(r.error("trailing bytes"));
    }
    Ok(UserState { max_ts, aggs })
}

pub(crate) fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn error(&self, what: &'static str) -> StateDecodeError {
        StateDecodeError { at: self.at, what }
    }

    fn byte(&mut self) -> Result<u8, StateDecodeError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| self.error("unexpected end"))?;
        self.at += 1;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, StateDecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.error("varint too long"))
    }

    fn i64(&mut self) -> Result<i64, StateDecodeError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A length, bounded by the bytes left so that corrupt input cannot allocate wildly.
    fn len(&mut self) -> Result<usize, StateDecodeError> {
        let n = self.u64()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(self.error("length exceeds input"));
        }
        Ok(n as usize)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateDecodeError> {
        let end = self.at + N;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| self.error("unexpected end"))?;
        self.at = end;
        Ok(slice.try_into().expect("length checked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NO_TS;

    #[test]
    fn round_trip_is_exact() {
        let state = UserState {
            max_ts: 1_767_225_703_544,
            aggs: vec![
                AggState::Window(vec![
                    WindowBucket {
                        id: 29_453_761,
                        count: 3,
                        sum: 0.1 + 0.2,
                    },
                    WindowBucket {
                        id: 29_453_790,
                        count: 1,
                        sum: 48.76,
                    },
                ]),
                AggState::Distinct(vec![DistinctBucket {
                    id: 20_454,
                    values: vec![1, u64::MAX],
                }]),
                AggState::Last(NO_TS),
                AggState::Last(1_767_225_703_000),
                AggState::Lifetime(12345),
            ],
        };
        let mut bytes = Vec::new();
        encode_user_state(&state, &mut bytes);
        assert_eq!(decode_user_state(&bytes).unwrap(), state);
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        encode_user_state(
            &UserState {
                max_ts: 5,
                aggs: vec![AggState::Lifetime(1)],
            },
            &mut bytes,
        );
        for cut in 0..bytes.len() {
            assert!(decode_user_state(&bytes[..cut]).is_err());
        }
        assert!(decode_user_state(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
