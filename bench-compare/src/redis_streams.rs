//! Redis Streams: XADD (one by one, or pipelined), XREADGROUP + XACK.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use redis::AsyncConnectionConfig;
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::drive::{Publisher, Receiver};

const GROUP: &str = "bench";
/// Entries per XREADGROUP: Ferry's bench subscription has `maxInFlight: 4096`.
const READ_COUNT: usize = 4096;

async fn connect(addr: SocketAddr) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    // No response timeout: XREADGROUP blocks, and fsync-per-write replies can be slow.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting")
}

/// Creates stream `bench:<n>` with a consumer group reading from its start; [`teardown`]
/// deletes it.
pub async fn setup(addr: SocketAddr, n: u64) -> anyhow::Result<(RedisPublisher, RedisReceiver)> {
    let key = format!("bench:{n}");
    let mut consumer = connect(addr).await?;
    let producer = connect(addr).await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut consumer)
        .await
        .context("creating the group")?;
    Ok((
        RedisPublisher {
            conn: producer,
            key: key.clone(),
        },
        RedisReceiver {
            conn: consumer,
            key,
        },
    ))
}

/// Deletes the scenario's stream.
pub async fn teardown(p: &RedisPublisher) -> anyhow::Result<()> {
    let mut conn = p.conn.clone();
    redis::cmd("DEL")
        .arg(&p.key)
        .query_async::<()>(&mut conn)
        .await
        .context("deleting the stream")?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct RedisPublisher {
    conn: MultiplexedConnection,
    key: String,
}

impl Publisher for RedisPublisher {
    async fn publish(&self, payload: Bytes) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("XADD")
            .arg(&self.key)
            .arg("*")
            .arg("d")
            .arg(payload.as_ref())
            .query_async::<Value>(&mut conn)
            .await?;
        Ok(())
    }

    /// One pipeline of XADDs: one write, one wait for all replies.
    async fn publish_batch(&self, payloads: Vec<Bytes>) -> anyhow::Result<u64> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in &payloads {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("*")
                .arg("d")
                .arg(p.as_ref());
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        Ok(replies
            .iter()
            .filter(|v| !matches!(v, Value::ServerError(_)))
            .count() as u64)
    }
}

#[derive(Debug)]
pub struct RedisReceiver {
    conn: MultiplexedConnection,
    key: String,
}

impl Receiver for RedisReceiver {
    async fn receive(&mut self, wait: Duration, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("c1")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        let entries = parse_read(reply)?;
        if entries.is_empty() {
            return Ok(());
        }
        let ids: Vec<&String> = entries.iter().map(|(id, _)| id).collect();
        redis::cmd("XACK")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&ids)
            .query_async::<u64>(&mut self.conn)
            .await?;
        out.extend(entries.into_iter().map(|(_, p)| p));
        Ok(())
    }
}

/// Entry ids and `d` fields of an XREADGROUP reply on one stream (RESP2 or RESP3; nil
/// when BLOCK timed out).
pub fn parse_read(reply: Value) -> anyhow::Result<Vec<(String, Bytes)>> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => Ok(kv.pop()),
                other => bail!("unexpected stream in reply: {other:?}"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Value::Map(streams) => streams.into_iter().map(|(_, v)| Some(v)).collect(),
        other => bail!("unexpected XREADGROUP reply: {other:?}"),
    };
    let mut out = Vec::new();
    for entries in streams.into_iter().flatten() {
        let Value::Array(entries) = entries else {
            bail!("unexpected entries: {entries:?}");
        };
        for e in entries {
            let Value::Array(mut e) = e else {
                bail!("unexpected entry: {e:?}");
            };
            let (Some(fields), Some(Value::BulkString(id))) = (e.pop(), e.into_iter().next())
            else {
                bail!("entry without id and fields");
            };
            let id = String::from_utf8(id).context("entry id")?;
            let Value::Array(fields) = fields else {
                // A deleted entry still pending: nothing to deliver.
                continue;
            };
            let payload = fields.chunks(2).find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k == b"d" => {
                    Some(Bytes::copy_from_slice(v))
                }
                _ => None,
            });
            out.push((id, payload.unwrap_or_default()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn parses_xreadgroup_replies() {
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        let entry = |id: &[u8], p: &[u8]| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk(b"d"), bulk(p)])])
        };
        let entries = Value::Array(vec![entry(b"1-0", b"one"), entry(b"1-1", b"two")]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk(b"bench:1"), entries.clone()])]);
        let got = parse_read(resp2).unwrap();
        assert_eq!(
            got,
            vec![
                ("1-0".to_string(), Bytes::from_static(b"one")),
                ("1-1".to_string(), Bytes::from_static(b"two"))
            ]
        );
        let resp3 = Value::Map(vec![(bulk(b"bench:1"), entries)]);
        assert_eq!(parse_read(resp3).unwrap().len(), 2);
        assert!(parse_read(Value::Int(3)).is_err());
    }
}
