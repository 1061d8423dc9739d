//! Value encodings: how typed values become entry bytes.

use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// How a multifeed encodes values given to [`Feed::append_value`](crate::Feed::append_value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValueEncoding {
    /// Raw bytes, stored as given.
    #[default]
    Binary,
    /// UTF-8 text; reading an entry that is not valid UTF-8 is an error.
    Utf8,
    /// JSON documents (serde).
    Json,
}

impl ValueEncoding {
    /// The encoding's name, as JS multifeed spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Utf8 => "utf-8",
            Self::Json => "json",
        }
    }
}

/// A typed value, as read and written through a [`ValueEncoding`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// Raw bytes (binary encoding).
    Binary(Vec<u8>),
    /// Text (utf-8 encoding).
    Text(String),
    /// A JSON document (json encoding).
    Json(serde_json::Value),
}

impl Value {
    /// A JSON value from anything serde can serialize.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_value(value)
            .map(Self::Json)
            .map_err(Error::Encode)
    }

    /// Deserializes a JSON value into `T`.
    pub fn to_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        match self {
            Self::Json(value) => T::deserialize(value).map_err(Error::Encode),
            other => Err(Error::EncodingMismatch {
                expected: ValueEncoding::Json.name(),
                found: other.kind(),
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Binary(_) => ValueEncoding::Binary.name(),
            Self::Text(_) => ValueEncoding::Utf8.name(),
            Self::Json(_) => ValueEncoding::Json.name(),
        }
    }
}

impl From<Vec<u8>> for Value {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Binary(bytes)
    }
}

impl From<&[u8]> for Value {
    fn from(bytes: &[u8]) -> Self {
        Self::Binary(bytes.to_vec())
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Value {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<serde_json::Value> for Value {
    fn from(value: serde_json::Value) -> Self {
        Self::Json(value)
    }
}

impl ValueEncoding {
    /// Encodes `value`, which must be of this encoding's kind.
    pub fn encode(self, value: &Value) -> Result<Vec<u8>, Error> {
        match (self, value) {
            (Self::Binary, Value::Binary(bytes)) => Ok(bytes.clone()),
            (Self::Utf8, Value::Text(text)) => Ok(text.as_bytes().to_vec()),
            (Self::Json, Value::Json(json)) => serde_json::to_vec(json).map_err(Error::Encode),
            (expected, found) => Err(Error::EncodingMismatch {
                expected: expected.name(),
                found: found.kind(),
            }),
        }
    }

    /// Decodes entry bytes; `key` and `index` only label the error.
    pub(crate) fn decode(self, bytes: Vec<u8>, key: &[u8; 32], index: u64) -> Result<Value, Error> {
        let fail = |reason: String| Error::Decode {
            key: *key,
            index,
            encoding: self.name(),
            reason,
        };
        match self {
            Self::Binary => Ok(Value::Binary(bytes)),
            Self::Utf8 => String::from_utf8(bytes)
                .map(Value::Text)
                .map_err(|e| fail(e.to_string())),
            Self::Json => serde_json::from_slice(&bytes)
                .map(Value::Json)
                .map_err(|e| fail(e.to_string())),
        }
    }
}
