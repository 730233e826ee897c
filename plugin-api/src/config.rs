//! Decoding the manifest's `[config]` table with errors that say which field is wrong and
//! what was expected: ``config field `output.quality`: expected u8, found string "high"``.
//!
//! `rmp_serde`'s own errors name neither the field nor, for a missing or unknown field, the
//! place in the table. So the decoder is wrapped ([`Wrapped`]) in a deserializer that keeps
//! the path of map keys and sequence indices it is inside, and that hands the plugin's
//! types an error type of its own ([`ConfigError`]), so a type mismatch is reported by
//! `serde` as structured parts ("expected", "found") rather than a finished sentence.
//!
//! The underlying deserializer has its own error type, so a [`ConfigError`] raised deep
//! inside travels up through it as text; the structured error is kept in the [`Track`]
//! meanwhile and taken back at the next wrapped layer up.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess};
use serde::de::{VariantAccess, Visitor};

/// Decodes MessagePack `bytes` into `T`, naming the field on error.
pub(crate) fn decode<T: de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let mut inner = rmp_serde::Deserializer::from_read_ref(bytes);
    let track = Track::default();
    T::deserialize(Wrapped {
        de: &mut inner,
        track: &track,
        key: None,
    })
}

/// A config decoding error: where (the field path) and what.
#[derive(Debug)]
pub(crate) struct ConfigError {
    /// The dotted path of the field (`output.quality`, `modes[1]`), once known.
    path: Option<String>,
    /// A field named by serde itself: the missing or unknown one, below `path`.
    field: Option<String>,
    /// What was wrong.
    message: String,
}

impl ConfigError {
    fn new(message: String) -> Self {
        ConfigError {
            path: None,
            field: None,
            message,
        }
    }

    /// Places the error at `path` unless it already has a place.
    fn at(mut self, path: &[Segment]) -> Self {
        if self.path.is_none() {
            let mut text = String::new();
            for segment in path {
                segment.append_to(&mut text);
            }
            if let Some(field) = self.field.take() {
                Segment::Key(field).append_to(&mut text);
            }
            self.path = Some(text);
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match (&self.path, &self.field) {
            (Some(path), _) if !path.is_empty() => Some(path.as_str()),
            (None, Some(field)) => Some(field.as_str()),
            _ => None,
        };
        match path {
            Some(path) => write!(f, "config field `{path}`: {}", self.message),
            None => write!(f, "invalid plugin config: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl de::Error for ConfigError {
    fn custom<M: fmt::Display>(message: M) -> Self {
        ConfigError::new(message.to_string())
    }

    fn invalid_type(found: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        ConfigError::new(format!("expected {expected}, found {found}"))
    }

    fn invalid_value(found: de::Unexpected<'_>, expected: &dyn de::Expected) -> Self {
        ConfigError::new(format!("expected {expected}, found {found}"))
    }

    fn invalid_length(len: usize, expected: &dyn de::Expected) -> Self {
        ConfigError::new(format!("expected {expected}, found {len} elements"))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let message = match expected {
            [] => "unknown field; this table takes no fields".to_string(),
            _ => format!("unknown field; expected one of: {}", expected.join(", ")),
        };
        ConfigError {
            path: None,
            field: Some(field.to_string()),
            message,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        ConfigError {
            path: None,
            field: Some(field.to_string()),
            message: "required field is missing".into(),
        }
    }
}

/// One step of a field path.
enum Segment {
    /// A map key (a struct field).
    Key(String),
    /// A position in a sequence.
    Index(usize),
}

impl Segment {
    fn append_to(&self, text: &mut String) {
        match self {
            Segment::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Segment::Index(i) => text.push_str(&format!("[{i}]")),
        }
    }
}

/// Where the decoder is, and an error on its way up through the underlying deserializer.
#[derive(Default)]
struct Track {
    path: RefCell<Vec<Segment>>,
    failure: RefCell<Option<ConfigError>>,
}

impl Track {
    /// An error of the underlying deserializer as a [`ConfigError`]: the one raised below
    /// if there is one, else its own message at the current path.
    fn lift<E: fmt::Display>(&self, err: E) -> ConfigError {
        match self.failure.borrow_mut().take() {
            Some(failure) => failure,
            None => ConfigError::new(err.to_string()).at(&self.path.borrow()),
        }
    }

    /// A [`ConfigError`] to pass up through the underlying deserializer: kept here, placed
    /// at the current path, and handed on as that deserializer's error type.
    fn lower<E: de::Error>(&self, err: ConfigError) -> E {
        let err = err.at(&self.path.borrow());
        let text = E::custom(&err);
        *self.failure.borrow_mut() = Some(err);
        text
    }

    /// Runs `f` with `segment` appended to the path.
    fn within<R>(&self, segment: Segment, f: impl FnOnce() -> R) -> R {
        self.path.borrow_mut().push(segment);
        let result = f();
        self.path.borrow_mut().pop();
        result
    }
}

/// A deserializer whose errors are [`ConfigError`]s placed at their field. With `key`, it
/// decodes a map key and records its text there.
struct Wrapped<'t, D> {
    de: D,
    track: &'t Track,
    key: Option<&'t RefCell<Option<String>>>,
}

/// The visitor [`Wrapped`] hands the underlying deserializer: it calls the plugin's visitor
/// with [`ConfigError`] as the error type, and wraps what it passes on.
struct WrapVisitor<'t, V> {
    visitor: V,
    track: &'t Track,
    key: Option<&'t RefCell<Option<String>>>,
}

/// A seed whose deserializer gets wrapped.
struct WrapSeed<'t, S> {
    seed: S,
    track: &'t Track,
    key: Option<&'t RefCell<Option<String>>>,
}

struct WrapMap<'t, A> {
    map: A,
    track: &'t Track,
    key: RefCell<Option<String>>,
}

struct WrapSeq<'t, A> {
    seq: A,
    track: &'t Track,
    index: usize,
}

struct WrapEnum<'t, A> {
    access: A,
    track: &'t Track,
}

struct WrapVariant<'t, A> {
    access: A,
    track: &'t Track,
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, ConfigError> {
                let track = self.track;
                let visitor = WrapVisitor { visitor, track, key: self.key };
                self.de.$method($($arg,)* visitor).map_err(|e| track.lift(e))
            }
        )*
    };
}

/// Decodes a number or boolean with `deserialize_any`: `rmp_serde` rejects a value of
/// another type on its own, with a message that names neither type ("wrong msgpack marker
/// FixStr(3)"); given whatever the value is, the plugin's visitor says what it expected.
/// MessagePack describes itself, so `deserialize_any` always works.
macro_rules! via_any {
    ($($method:ident;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
                self.deserialize_any(visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Wrapped<'_, D> {
    type Error = ConfigError;

    via_any! {
        deserialize_bool;
        deserialize_i8;
        deserialize_i16;
        deserialize_i32;
        deserialize_i64;
        deserialize_u8;
        deserialize_u16;
        deserialize_u32;
        deserialize_u64;
        deserialize_f32;
        deserialize_f64;
    }

    forward_deserialize! {
        deserialize_any();
        deserialize_i128();
        deserialize_u128();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.visitor.$method::<ConfigError>(v).map_err(|e| self.track.lower(e))
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> WrapVisitor<'_, V> {
    fn record_key(&self, key: impl fmt::Display) {
        if let Some(cell) = self.key {
            *cell.borrow_mut() = Some(key.to_string());
        }
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for WrapVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V::Value, E> {
        self.record_key(v);
        self.visitor
            .visit_i64::<ConfigError>(v)
            .map_err(|e| self.track.lower(e))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V::Value, E> {
        self.record_key(v);
        self.visitor
            .visit_u64::<ConfigError>(v)
            .map_err(|e| self.track.lower(e))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.record_key(v);
        self.visitor
            .visit_str::<ConfigError>(v)
            .map_err(|e| self.track.lower(e))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.record_key(v);
        self.visitor
            .visit_borrowed_str::<ConfigError>(v)
            .map_err(|e| self.track.lower(e))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.record_key(&v);
        self.visitor
            .visit_string::<ConfigError>(v)
            .map_err(|e| self.track.lower(e))
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor
            .visit_none::<ConfigError>()
            .map_err(|e| self.track.lower(e))
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor
            .visit_unit::<ConfigError>()
            .map_err(|e| self.track.lower(e))
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let track = self.track;
        self.visitor
            .visit_some(Wrapped {
                de,
                track,
                key: None,
            })
            .map_err(|e| track.lower(e))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        let track = self.track;
        self.visitor
            .visit_newtype_struct(Wrapped {
                de,
                track,
                key: None,
            })
            .map_err(|e| track.lower(e))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let track = self.track;
        self.visitor
            .visit_seq(WrapSeq {
                seq,
                track,
                index: 0,
            })
            .map_err(|e| track.lower(e))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let track = self.track;
        self.visitor
            .visit_map(WrapMap {
                map,
                track,
                key: RefCell::new(None),
            })
            .map_err(|e| track.lower(e))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, access: A) -> Result<V::Value, A::Error> {
        let track = self.track;
        self.visitor
            .visit_enum(WrapEnum { access, track })
            .map_err(|e| track.lower(e))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for WrapSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
        let track = self.track;
        self.seed
            .deserialize(Wrapped {
                de,
                track,
                key: self.key,
            })
            .map_err(|e| track.lower(e))
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WrapMap<'_, A> {
    type Error = ConfigError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConfigError> {
        *self.key.borrow_mut() = None;
        let track = self.track;
        let seed = WrapSeed {
            seed,
            track,
            key: Some(&self.key),
        };
        self.map.next_key_seed(seed).map_err(|e| track.lift(e))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, ConfigError> {
        let track = self.track;
        let key = self.key.borrow_mut().take().unwrap_or_else(|| "?".into());
        let map = &mut self.map;
        track.within(Segment::Key(key), || {
            let seed = WrapSeed {
                seed,
                track,
                key: None,
            };
            map.next_value_seed(seed).map_err(|e| track.lift(e))
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for WrapSeq<'_, A> {
    type Error = ConfigError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, ConfigError> {
        let track = self.track;
        let seq = &mut self.seq;
        let result = track.within(Segment::Index(self.index), || {
            let seed = WrapSeed {
                seed,
                track,
                key: None,
            };
            seq.next_element_seed(seed).map_err(|e| track.lift(e))
        });
        self.index += 1;
        result
    }

    fn size_hint(&self) -> Option<usize> {
        self.seq.size_hint()
    }
}

impl<'de, 't, A: EnumAccess<'de>> EnumAccess<'de> for WrapEnum<'t, A> {
    type Error = ConfigError;
    type Variant = WrapVariant<'t, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), ConfigError> {
        let track = self.track;
        let seed = WrapSeed {
            seed,
            track,
            key: None,
        };
        match self.access.variant_seed(seed) {
            Ok((value, access)) => Ok((value, WrapVariant { access, track })),
            Err(e) => Err(track.lift(e)),
        }
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for WrapVariant<'_, A> {
    type Error = ConfigError;

    fn unit_variant(self) -> Result<(), ConfigError> {
        let track = self.track;
        self.access.unit_variant().map_err(|e| track.lift(e))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, ConfigError> {
        let track = self.track;
        let seed = WrapSeed {
            seed,
            track,
            key: None,
        };
        self.access
            .newtype_variant_seed(seed)
            .map_err(|e| track.lift(e))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        let track = self.track;
        let visitor = WrapVisitor {
            visitor,
            track,
            key: None,
        };
        self.access
            .tuple_variant(len, visitor)
            .map_err(|e| track.lift(e))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        let track = self.track;
        let visitor = WrapVisitor {
            visitor,
            track,
            key: None,
        };
        self.access
            .struct_variant(fields, visitor)
            .map_err(|e| track.lift(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::ser::{SerializeMap, SerializeSeq};
    use serde::{Deserialize, Serialize, Serializer};

    /// A config value, as TOML would give it.
    enum V {
        Int(i64),
        Str(&'static str),
        Bool(bool),
        List(Vec<V>),
        Map(Vec<(&'static str, V)>),
    }

    impl Serialize for V {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                V::Int(i) => s.serialize_i64(*i),
                V::Str(t) => s.serialize_str(t),
                V::Bool(b) => s.serialize_bool(*b),
                V::List(items) => {
                    let mut seq = s.serialize_seq(Some(items.len()))?;
                    for item in items {
                        seq.serialize_element(item)?;
                    }
                    seq.end()
                }
                V::Map(entries) => {
                    let mut map = s.serialize_map(Some(entries.len()))?;
                    for (k, v) in entries {
                        map.serialize_entry(k, v)?;
                    }
                    map.end()
                }
            }
        }
    }

    fn map(entries: Vec<(&'static str, V)>) -> Vec<u8> {
        rmp_serde::to_vec_named(&V::Map(entries)).unwrap()
    }

    fn error(entries: Vec<(&'static str, V)>) -> String {
        decode::<Config>(&map(entries)).unwrap_err().to_string()
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Output {
        format: String,
        quality: u8,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Best,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Config {
        size: u32,
        #[serde(default)]
        modes: Vec<Mode>,
        output: Option<Output>,
        #[serde(default)]
        tags: std::collections::BTreeMap<String, u16>,
    }

    fn output(quality: V) -> V {
        V::Map(vec![("format", V::Str("png")), ("quality", quality)])
    }

    #[test]
    fn a_valid_config_decodes() {
        let config: Config = decode(&map(vec![
            ("size", V::Int(7)),
            ("modes", V::List(vec![V::Str("fast"), V::Str("best")])),
            ("output", output(V::Int(90))),
            ("tags", V::Map(vec![("a", V::Int(1))])),
        ]))
        .unwrap();
        assert_eq!(config.size, 7);
        assert_eq!(config.modes, [Mode::Fast, Mode::Best]);
        assert_eq!(config.output.unwrap().quality, 90);
        assert_eq!(config.tags["a"], 1);
    }

    #[test]
    fn a_wrong_type_names_the_field_and_both_types() {
        assert_eq!(
            error(vec![("size", V::Str("big"))]),
            "config field `size`: expected u32, found string \"big\""
        );
        assert_eq!(
            error(vec![
                ("size", V::Int(1)),
                ("output", output(V::Str("high")))
            ]),
            "config field `output.quality`: expected u8, found string \"high\""
        );
        assert_eq!(
            error(vec![("size", V::Int(1)), ("output", output(V::Int(300)))]),
            "config field `output.quality`: expected u8, found integer `300`"
        );
        assert_eq!(
            error(vec![
                ("size", V::Int(1)),
                ("tags", V::Map(vec![("b", V::Bool(true))]))
            ]),
            "config field `tags.b`: expected u16, found boolean `true`"
        );
    }

    #[test]
    fn positions_in_arrays_are_named() {
        let message = error(vec![
            ("size", V::Int(1)),
            ("modes", V::List(vec![V::Str("fast"), V::Str("slow")])),
        ]);
        assert!(
            message.starts_with("config field `modes[1]`: unknown variant `slow`"),
            "{message}"
        );
        assert_eq!(
            error(vec![("size", V::Int(1)), ("modes", V::Str("fast"))]),
            "config field `modes`: expected a sequence, found string \"fast\""
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        assert_eq!(
            error(vec![("modes", V::List(vec![]))]),
            "config field `size`: required field is missing"
        );
        assert_eq!(
            error(vec![
                ("size", V::Int(1)),
                ("output", V::Map(vec![("quality", V::Int(1))]))
            ]),
            "config field `output.format`: required field is missing"
        );
        assert_eq!(
            error(vec![("size", V::Int(1)), ("sise", V::Int(2))]),
            "config field `sise`: unknown field; expected one of: size, modes, output, tags"
        );
    }

    #[test]
    fn an_error_with_no_field_says_so() {
        let bytes = rmp_serde::to_vec_named(&V::Str("x")).unwrap();
        assert_eq!(
            decode::<u32>(&bytes).unwrap_err().to_string(),
            "invalid plugin config: expected u32, found string \"x\""
        );
    }
}
