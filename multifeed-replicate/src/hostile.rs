//! A peer that completes the Noise handshake and then sends whatever plaintext frames a test
//! chooses, unchecked: the harness of the hostile-peer tests (feature `hostile-peer`, for tests
//! only; not part of the API).
//!
//! Frames go through this crate's own encrypted transport, so the honest side sees them exactly
//! as a peer built on `hypercore-protocol` with injection hooks would send them.

use std::io;

use futures::{SinkExt, StreamExt};
use hypercore_handshake::{CipherEvent, CipherTrait};
use hypercore_protocol::schema::Open;
use hypercore_protocol::{discovery_key, Message};

use crate::close::CloseSignal;
use crate::proto::EXTENSION;
use crate::transport::SecureChannel;

/// One end of an encrypted connection that sends raw plaintext frames.
#[derive(Debug)]
pub struct HostilePeer {
    channel: SecureChannel,
    /// Frames that arrived while the handshake completed.
    early: std::collections::VecDeque<Vec<u8>>,
}

impl HostilePeer {
    /// Runs the Noise XX handshake over `io` (as initiator when `initiator`).
    pub async fn handshake<IO>(io: IO, initiator: bool) -> io::Result<Self>
    where
        IO: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
    {
        let mut channel = SecureChannel::new(Box::new(io), initiator, CloseSignal::default())?;
        let mut early = std::collections::VecDeque::new();
        // Polling the stream sends and receives handshake messages until the keys are set.
        while channel.handshake_hash().is_none() {
            match channel.next().await {
                Some(CipherEvent::ErrStuff(err)) => return Err(err),
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(CipherEvent::Message(frame)) => early.push_back(frame),
                Some(CipherEvent::HandshakePayload(_)) => {}
            }
        }
        // The initiator's last handshake message may still be queued.
        channel.flush().await?;
        Ok(Self { channel, early })
    }

    /// Encrypts and sends one plaintext frame as it is.
    pub async fn send_frame(&mut self, frame: Vec<u8>) -> io::Result<()> {
        self.channel.feed(frame).await?;
        futures::future::poll_fn(|cx| self.channel.poll_write_retrying(cx)).await
    }

    /// Sends frames until one fails (the honest side hung up); returns how many went out.
    pub async fn send_frames(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        let mut sent = 0;
        for frame in frames {
            if self.send_frame(frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// The next plaintext frame from the honest side.
    pub async fn next_frame(&mut self) -> io::Result<Vec<u8>> {
        if let Some(frame) = self.early.pop_front() {
            return Ok(frame);
        }
        loop {
            match self.channel.next().await {
                Some(CipherEvent::Message(frame)) => return Ok(frame),
                Some(CipherEvent::ErrStuff(err)) => return Err(err),
                Some(CipherEvent::HandshakePayload(_)) => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    /// The messages of the next frame, with their channel ids (Open and Close are skipped).
    pub async fn next_messages(&mut self) -> io::Result<Vec<(u64, Message)>> {
        let frame = self.next_frame().await?;
        // Batches of several channels are split as the guard splits them.
        let mut out = Vec::new();
        for part in crate::transport::split_channels(frame, usize::MAX) {
            out.extend(decode_frame(&part)?);
        }
        Ok(out)
    }

    /// Reads frames until the honest side opens the channel of `key`.
    pub async fn wait_open(&mut self, key: &[u8; 32]) -> io::Result<()> {
        let dk = discovery_key(key);
        loop {
            let frame = self.next_frame().await?;
            if frame.starts_with(&[0, 1]) && frame.windows(32).any(|w| w == dk) {
                return Ok(());
            }
        }
    }

    /// An Open of channel `channel` for `key`, with the capability that proves we know it.
    pub fn open_frame(&self, channel: u64, key: &[u8; 32]) -> io::Result<Vec<u8>> {
        let hash = self
            .channel
            .handshake_hash()
            .ok_or(io::ErrorKind::NotConnected)?;
        let open = Open {
            channel,
            protocol: "hypercore/alpha".to_owned(),
            discovery_key: discovery_key(key).to_vec(),
            capability: Some(capability(self.channel.is_initiator(), key, &hash)?),
        };
        let mut frame = vec![0, 1];
        frame.extend(encode(&Message::Open(open))?);
        Ok(frame)
    }
}

/// A single-message frame: `<channel> <type> <body>`.
pub fn message_frame(channel: u64, message: &Message) -> io::Result<Vec<u8>> {
    let mut frame = Vec::new();
    put_uint(&mut frame, channel);
    frame.extend(encode(message)?);
    Ok(frame)
}

/// A batch frame of one channel: `00 00 <channel> (<length> <message>)*`.
pub fn batch_frame(channel: u64, messages: &[Message]) -> io::Result<Vec<u8>> {
    let mut frame = vec![0, 0];
    put_uint(&mut frame, channel);
    for message in messages {
        let body = encode(message)?;
        put_uint(&mut frame, body.len() as u64);
        frame.extend(body);
    }
    Ok(frame)
}

/// A frame carrying a multifeed meta message on the root channel `channel`.
pub fn meta_frame(channel: u64, message: &multifeed_meta::Message) -> io::Result<Vec<u8>> {
    message_frame(
        channel,
        &Message::Extension(hypercore_protocol::schema::Extension {
            name: EXTENSION.to_owned(),
            message: message.encode(),
        }),
    )
}

/// Decodes a frame from the honest side (which never mixes channels in one batch).
pub fn decode_frame(frame: &[u8]) -> io::Result<Vec<(u64, Message)>> {
    use compact_encoding::CompactEncoding;
    let bad = |e: compact_encoding::EncodingError| {
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    };
    let mut out = Vec::new();
    if frame.starts_with(&[0, 1]) || frame.starts_with(&[0, 3]) {
        return Ok(out);
    }
    if let Some(rest) = frame.strip_prefix(&[0, 0]) {
        let (channel, mut rest) = u64::decode(rest).map_err(bad)?;
        while !rest.is_empty() {
            let (len, after) = u64::decode(rest).map_err(bad)?;
            let len = len as usize;
            let body = after.get(..len).ok_or(io::ErrorKind::InvalidData)?;
            let (message, _) = Message::decode(body).map_err(bad)?;
            out.push((channel, message));
            rest = &after[len..];
        }
        return Ok(out);
    }
    let (channel, rest) = u64::decode(frame).map_err(bad)?;
    let (message, _) = Message::decode(rest).map_err(bad)?;
    out.push((channel, message));
    Ok(out)
}

/// Appends a compact-encoding uint.
pub fn put_uint(out: &mut Vec<u8>, value: u64) {
    crate::transport::put_varint(out, value);
}

/// The Hypercore 10 channel capability: BLAKE2b-256 keyed by the handshake hash over the
/// side's namespace and the key (hypercore-protocol keeps its own private).
fn capability(initiator: bool, key: &[u8; 32], handshake_hash: &[u8]) -> io::Result<Vec<u8>> {
    use blake2::digest::{FixedOutput, Update};
    const INITIATOR: [u8; 32] = [
        0x51, 0x81, 0x2A, 0x2A, 0x35, 0x9B, 0x50, 0x36, 0x95, 0x36, 0x77, 0x5D, 0xF8, 0x9E, 0x18,
        0xE4, 0x77, 0x40, 0xF3, 0xDB, 0x72, 0xAC, 0x0A, 0xE7, 0x0B, 0x29, 0x59, 0x4C, 0x19, 0x4D,
        0xC3, 0x16,
    ];
    const RESPONDER: [u8; 32] = [
        0x04, 0x38, 0x49, 0x2D, 0x02, 0x97, 0x0C, 0xC1, 0x35, 0x28, 0xAC, 0x02, 0x62, 0xBC, 0xA0,
        0x07, 0x4E, 0x09, 0x26, 0x26, 0x02, 0x56, 0x86, 0x5A, 0xCC, 0xC0, 0xBF, 0x15, 0xBD, 0x79,
        0x12, 0x7D,
    ];
    let mut mac = blake2::Blake2bMac::<blake2::digest::consts::U32>::new_with_salt_and_personal(
        handshake_hash,
        &[],
        &[],
    )
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a handshake hash is not a BLAKE2b key",
        )
    })?;
    mac.update(if initiator { &INITIATOR } else { &RESPONDER });
    mac.update(key);
    Ok(mac.finalize_fixed().to_vec())
}

fn encode(message: &Message) -> io::Result<Vec<u8>> {
    use compact_encoding::CompactEncoding;
    message
        .to_encoded_bytes()
        .map(|bytes| bytes.to_vec())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}
