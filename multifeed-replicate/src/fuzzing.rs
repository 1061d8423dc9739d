//! Entry points for fuzzers (`fuzz/` in this crate, cargo-fuzz) and their smoke test; not an
//! API. Built only with the `fuzzing` feature.

use std::time::Duration;

use hypercore_protocol::discovery_key;
use hypercore_protocol::schema::{Data, Extension, NoData, Range, Request, Synchronize};
use hypercore_protocol::Message;
use hypercore_schema::{DataBlock, DataUpgrade, Node, RequestBlock, RequestUpgrade};

use crate::proto::sim::{key, value, FakeFeed, Link, Pair, Wire};
use crate::{ReplicateConfig, DEFAULT_ENCRYPTION_KEY};

/// Decodes `data` as a meta exchange message; one that decodes encodes to bytes that decode to
/// it again.
pub fn meta_decode(data: &[u8]) {
    if let Ok(message) = multifeed_meta::Message::decode(data) {
        let again = multifeed_meta::Message::decode(&message.encode());
        assert_eq!(again.as_ref(), Ok(&message), "a decoded message re-encodes");
    }
}

/// Reads `data` as a script: a seed and a number of honest steps between two simulated cores,
/// then items a hostile peer hands the second core (opens, closes, messages, waits), then the
/// honest run goes on. Panics only if the core does.
pub fn connection_input(data: &[u8]) {
    let mut script = Script { data, at: 0 };
    let seed = script.u64();
    let honest_steps = usize::from(script.byte()) * 4;
    let stores = [
        [(key(1), FakeFeed::full(30))].into_iter().collect(),
        [(key(2), FakeFeed::full(5))].into_iter().collect(),
    ];
    let configs = [
        ReplicateConfig::new(true).max_in_flight(8),
        ReplicateConfig::new(false).max_in_flight(8),
    ];
    let mut pair = Pair::new(configs, stores, Link::default(), seed);
    pair.connect();
    for _ in 0..honest_steps {
        if !pair.step() {
            break;
        }
    }
    for _ in 0..64 {
        if script.done() {
            break;
        }
        let tag = script.byte();
        let dk = match script.byte() % 4 {
            0 => discovery_key(&DEFAULT_ENCRYPTION_KEY),
            1 | 2 => discovery_key(&key(1)),
            n => discovery_key(&key(n.wrapping_add(script.byte()))),
        };
        match tag % 10 {
            0 => pair.inject(1, Wire::Open(dk)),
            1 => pair.inject(1, Wire::Close(dk)),
            2 => pair.wait(1, Duration::from_millis(script.u64() % 120_000)),
            _ => {
                let message = script.message(tag);
                pair.inject(1, Wire::Message(dk, message));
            }
        }
    }
    pair.run(200_000);
}

/// Reads values off the fuzzer's bytes (zeros once they run out).
struct Script<'a> {
    data: &'a [u8],
    at: usize,
}

impl Script<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn byte(&mut self) -> u8 {
        let byte = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        byte
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 0
    }

    /// A small number mostly, any u64 sometimes.
    fn u64(&mut self) -> u64 {
        match self.byte() {
            255 => (0..8).fold(0, |n, _| n << 8 | u64::from(self.byte())),
            small => u64::from(small % 64),
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = usize::from(self.byte() % 64);
        (0..len).map(|_| self.byte()).collect()
    }

    fn message(&mut self, tag: u8) -> Message {
        match tag % 10 {
            3 => Message::Synchronize(Synchronize {
                fork: self.u64(),
                length: self.u64(),
                remote_length: self.u64(),
                can_upgrade: true,
                uploading: true,
                downloading: true,
            }),
            4 => Message::Range(Range {
                drop: self.flag(),
                start: self.u64(),
                length: self.u64(),
            }),
            5 => Message::Request(Request {
                id: self.u64(),
                fork: 0,
                hash: None,
                block: Some(RequestBlock {
                    index: self.u64(),
                    nodes: self.u64(),
                }),
                seek: None,
                upgrade: (self.flag()).then(|| RequestUpgrade {
                    start: self.u64(),
                    length: self.u64(),
                }),
                manifest: false,
                priority: 0,
            }),
            6 | 7 => {
                let request = self.u64();
                let index = self.u64();
                let right = self.flag();
                let nodes = (0..self.byte() % 3)
                    .map(|_| {
                        Node::new(
                            self.u64(),
                            vec![7; usize::from(self.byte() % 40)],
                            self.u64(),
                        )
                    })
                    .collect();
                Message::Data(Data {
                    request,
                    fork: 0,
                    hash: None,
                    block: Some(DataBlock {
                        index,
                        value: if right {
                            value(&key(1), index)
                        } else {
                            self.bytes()
                        },
                        nodes,
                    }),
                    seek: None,
                    upgrade: (self.flag()).then(|| DataUpgrade {
                        start: self.u64(),
                        length: self.u64(),
                        nodes: Vec::new(),
                        additional_nodes: Vec::new(),
                        signature: vec![0; 64],
                    }),
                })
            }
            8 => Message::NoData(NoData {
                request: self.u64(),
            }),
            _ => Message::Extension(Extension {
                name: if self.flag() { "multifeed" } else { "other" }.to_owned(),
                message: self.bytes(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The fuzz entry points on seeded random bytes (what CI runs instead of the fuzzer).
    #[test]
    fn the_fuzz_entry_points_survive_random_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let len = rng.gen_range(0..400);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            super::meta_decode(&data);
            super::connection_input(&data);
        }
    }
}
