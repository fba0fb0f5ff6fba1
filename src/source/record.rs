//! One input record as the source hands it to its partition's task.

use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders, Timestamp};

/// An input record copied out of librdkafka's buffer: its key and payload share one
/// allocation, and the topic (the partition task knows it) is not copied.
/// rdkafka's `detach` makes three allocations per record (key, payload, topic name),
/// on the one thread that feeds every partition.
#[derive(Debug, Clone)]
pub struct InputRecord {
    offset: i64,
    timestamp: Timestamp,
    /// Key bytes first, then the payload's.
    bytes: Box<[u8]>,
    /// The key's length; `None`: no key.
    key_len: Option<u32>,
    has_payload: bool,
    headers: Option<OwnedHeaders>,
    /// Wall clock when the source took it from the consumer (µs).
    polled_us: i64,
}

impl InputRecord {
    /// Copies `message` out of the consumer's buffer; `polled_us` is the wall clock
    /// when the source took it (one reading per batch).
    pub fn copy_of(message: &BorrowedMessage<'_>, polled_us: i64) -> InputRecord {
        let key = message.key();
        let payload = message.payload();
        let (k, p) = (key.unwrap_or_default(), payload.unwrap_or_default());
        let mut bytes = Vec::with_capacity(k.len() + p.len());
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(p);
        InputRecord {
            offset: message.offset(),
            timestamp: message.timestamp(),
            bytes: bytes.into_boxed_slice(),
            // Kafka keys are at most a record's size, which is far below 4 GiB.
            key_len: key.map(|k| k.len() as u32),
            has_payload: payload.is_some(),
            headers: message.headers().map(|h| h.detach()),
            polled_us,
        }
    }

    /// A record built in memory, for tests.
    pub fn new(
        offset: i64,
        timestamp: Timestamp,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> InputRecord {
        let (k, p) = (key.unwrap_or_default(), payload.unwrap_or_default());
        InputRecord {
            offset,
            timestamp,
            bytes: [k, p].concat().into_boxed_slice(),
            key_len: key.map(|k| k.len() as u32),
            has_payload: payload.is_some(),
            headers,
            polled_us: 0,
        }
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }

    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.map(|n| &self.bytes[..n as usize])
    }

    pub fn payload(&self) -> Option<&[u8]> {
        let start = self.key_len.unwrap_or(0) as usize;
        self.has_payload.then(|| &self.bytes[start..])
    }

    pub fn headers(&self) -> Option<&OwnedHeaders> {
        self.headers.as_ref()
    }

    pub fn polled_us(&self) -> i64 {
        self.polled_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_payload_are_split_where_they_were_joined() {
        let r = InputRecord::new(7, Timestamp::CreateTime(5), Some(b"u1"), Some(b"{}"), None);
        assert_eq!(
            (r.offset(), r.key(), r.payload()),
            (7, Some(&b"u1"[..]), Some(&b"{}"[..]))
        );
        assert_eq!(r.timestamp().to_millis(), Some(5));
        let keyless = InputRecord::new(0, Timestamp::NotAvailable, None, Some(b"x"), None);
        assert_eq!((keyless.key(), keyless.payload()), (None, Some(&b"x"[..])));
        let empty_key = InputRecord::new(0, Timestamp::NotAvailable, Some(b""), None, None);
        assert_eq!(
            (empty_key.key(), empty_key.payload()),
            (Some(&b""[..]), None)
        );
    }
}
