//! What a secret provider module supplies to the config, and the `providers!` registry that
//! lists them. A provider module owns its fields in a source table (a serde struct), their
//! validation, its rotation capability and its constructor; the registry generates the
//! `ProviderConfig` enum and dispatches to the module a source's `provider` names.
//!
//! The on-disk source table stays flat (`name`, `provider`, `mapping`, ... beside the provider's
//! own fields), so `RawSource` reads each provider field with the type of the provider that
//! declares it, through the same deserializer: a wrong type or an unknown nested field is
//! reported at its own path, like any other field of the config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{SecretProvider, Selector};

/// Where a provider's validation reports its problems; config's problem collector implements it.
pub trait Report {
    /// A problem at the full field path `field`.
    fn problem(&mut self, field: String, message: String);
    /// A path as written in the config, resolved against the config file's directory.
    fn path(&self, written: &str) -> PathBuf;
}

/// One source's validation, as a provider sees it: fields are named below the source (`at`).
pub struct Check<'a> {
    at: &'a str,
    report: &'a mut dyn Report,
}

impl<'a> Check<'a> {
    pub fn new(at: &'a str, report: &'a mut dyn Report) -> Check<'a> {
        Check { at, report }
    }

    /// The source's field path, like `sources[2]`.
    pub fn at(&self) -> &'a str {
        self.at
    }

    /// A problem at `<source>.<field>`.
    pub fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.report.problem(format!("{}.{field}", self.at), message.into());
    }

    /// A path as written, resolved against the config file's directory.
    pub fn path(&self, written: &str) -> PathBuf {
        self.report.path(written)
    }
}

/// A secret provider's side of the config.
pub trait Provider: Sized {
    /// What a source's `provider` field names it.
    const KIND: &'static str;
    /// Whether a mapping entry may take the whole document (`{{.}}`); `false` where every entry
    /// must name one variable or id.
    const WHOLE_VALUE: bool = true;
    /// The provider's fields in a source table, as written: a serde struct of optional fields
    /// that refuses unknown ones.
    type Fields: DeserializeOwned + Serialize;

    /// Checks `fields` and builds the provider's validated config. It may require, complete
    /// (a file's keys) or rewrite (AWS `"<secret-id>#"` entries) the mapping text. `None` when
    /// the source cannot be used; the problems say why.
    fn configure(
        fields: Self::Fields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<Self>;

    /// Why a source of this provider cannot rotate (each reported at `rotation.enabled`); empty
    /// when it can.
    fn rotation_refusals(&self) -> Vec<String> {
        Vec::new()
    }

    /// The runtime provider for the source `source`.
    fn build(&self, source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider>;
}

/// A source's provider-specific fields as read from its table, by canonical name. Every value
/// has the type its provider declares (checked when it was read).
#[derive(Debug, Default)]
pub struct ProviderFields(pub(super) serde_json::Map<String, serde_json::Value>);

impl ProviderFields {
    /// Fields given by name, such as the article's `source` object; `None` values are left out.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<String>)>) -> ProviderFields {
        ProviderFields(pairs.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?.into()))).collect())
    }

    /// Reads the value of the provider field `key` (a key some provider's `Fields` accepts) with
    /// that provider's type, from the source table's own deserializer.
    pub fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        map.next_value_seed(FieldSeed { key, into: &mut self.0 })
    }

    /// The fields of `P`, for its `configure`; fields no provider of this kind reads are left to
    /// the caller.
    pub(super) fn take<P: Provider>(&self) -> Result<P::Fields, String> {
        let own: serde_json::Map<_, _> =
            self.0.iter().filter(|(k, _)| knows::<P::Fields>(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        serde_json::from_value(serde_json::Value::Object(own)).map_err(|e| e.to_string())
    }
}

struct FieldSeed<'k> {
    key: &'k str,
    into: &'k mut serde_json::Map<String, serde_json::Value>,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, value: D) -> Result<(), D::Error> {
        let read = super::read_provider_field(self.key, value)?;
        self.into.extend(read);
        Ok(())
    }
}

/// Reads one field of `F` from `value` (the table's own deserializer, so errors keep their
/// path) and returns it by canonical name.
pub(super) fn read_one<'de, F, D>(key: &str, value: D) -> Result<serde_json::Map<String, serde_json::Value>, D::Error>
where
    F: Deserialize<'de> + Serialize,
    D: Deserializer<'de>,
{
    let partial = F::deserialize(OneEntry { key, value: Some(value) })?;
    match serde_json::to_value(&partial).map_err(de::Error::custom)? {
        serde_json::Value::Object(map) => Ok(map.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        _ => Err(de::Error::custom("a provider's fields must be a struct")),
    }
}

/// Whether `F` has a field (or alias) named `key`: asked by feeding it a table of that one key
/// whose value refuses to be read.
pub(super) fn knows<F: DeserializeOwned>(key: &str) -> bool {
    let probe = F::deserialize(OneEntry::<Refuse> { key, value: Some(Refuse) });
    !matches!(probe, Err(e) if e.to_string().starts_with("unknown field"))
}

/// The field names `F` declares, for an unknown field's "expected one of" list.
pub(super) fn field_names<F: DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = F::deserialize(Names(&mut names));
    names
}

/// A table of one entry, `key` = `value`.
struct OneEntry<'k, D> {
    key: &'k str,
    value: Option<D>,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for OneEntry<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, D: Deserializer<'de>> MapAccess<'de> for OneEntry<'_, D> {
    type Error = D::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, D::Error> {
        if self.value.is_none() {
            return Ok(None);
        }
        seed.deserialize(de::value::StrDeserializer::<D::Error>::new(self.key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, D::Error> {
        let value = self.value.take().ok_or_else(|| de::Error::custom("a value was read twice"))?;
        seed.deserialize(value)
    }
}

/// A value that cannot be read: what `knows` gives a field.
struct Refuse;

impl<'de> Deserializer<'de> for Refuse {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("known"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// A deserializer that only notes the field names a struct asks for.
struct Names<'n>(&'n mut &'static [&'static str]);

impl<'de> Deserializer<'de> for Names<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("names noted"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// `'a', 'b' or 'c'`.
pub(super) fn either(kinds: &[&str]) -> String {
    let quoted: Vec<String> = kinds.iter().map(|k| format!("'{k}'")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Lists the providers: declares each module, and generates `ProviderConfig` (one variant per
/// provider config) and the dispatch from a `provider` name or a field name to the module that
/// owns it.
macro_rules! providers {
    ($($variant:ident => $module:ident::$config:ident),* $(,)?) => {
        $(mod $module;)*

        /// A source's validated provider settings: one variant per provider module.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum ProviderConfig {
            $($variant($module::$config),)*
        }

        impl ProviderConfig {
            /// What a source's `provider` field names it.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(ProviderConfig::$variant(_) => <$module::$config as Provider>::KIND,)*
                }
            }

            /// Whether a mapping entry may take the whole document (`{{.}}`).
            pub fn whole_value(&self) -> bool {
                match self {
                    $(ProviderConfig::$variant(_) => <$module::$config as Provider>::WHOLE_VALUE,)*
                }
            }

            /// Why this source cannot rotate; empty when it can.
            pub fn rotation_refusals(&self) -> Vec<String> {
                match self {
                    $(ProviderConfig::$variant(config) => config.rotation_refusals(),)*
                }
            }

            fn build(&self, source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
                match self {
                    $(ProviderConfig::$variant(config) => config.build(source, mapping),)*
                }
            }

            /// Validates the provider part of a source whose `provider` is `kind`: fields of other
            /// providers are reported, then the provider checks its own. `Err` lists the known
            /// providers when `kind` is none of them.
            pub fn configure(
                kind: &str,
                fields: &ProviderFields,
                mapping: &mut Option<BTreeMap<String, String>>,
                check: &mut Check<'_>,
            ) -> Result<Option<ProviderConfig>, String> {
                $(if kind == <$module::$config as Provider>::KIND {
                    type Fields = <$module::$config as Provider>::Fields;
                    for name in provider_field_names() {
                        if fields.0.contains_key(*name) && !knows::<Fields>(name) {
                            check.problem(name, format!("is not used by provider '{kind}'"));
                        }
                    }
                    let own = match fields.take::<$module::$config>() {
                        Ok(own) => own,
                        Err(e) => {
                            check.problem("provider", e);
                            return Ok(None);
                        }
                    };
                    return Ok(<$module::$config>::configure(own, mapping, check).map(ProviderConfig::$variant));
                })*
                Err(format!("expected {}", either(&[$(<$module::$config as Provider>::KIND),*])))
            }
        }

        /// Every provider field name, each once, in the order the providers are listed.
        pub fn provider_field_names() -> &'static [&'static str] {
            static NAMES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
                let mut names: Vec<&'static str> = Vec::new();
                $(for name in field_names::<<$module::$config as Provider>::Fields>() {
                    if !names.contains(name) {
                        names.push(name);
                    }
                })*
                names
            });
            &NAMES
        }

        /// Whether some provider reads a field named `key`.
        pub fn is_provider_field(key: &str) -> bool {
            $(knows::<<$module::$config as Provider>::Fields>(key) ||)* false
        }

        /// Reads the provider field `key` with the type of the first provider that declares it.
        fn read_provider_field<'de, D: serde::Deserializer<'de>>(
            key: &str,
            value: D,
        ) -> Result<serde_json::Map<String, serde_json::Value>, D::Error> {
            $(if knows::<<$module::$config as Provider>::Fields>(key) {
                return read_one::<<$module::$config as Provider>::Fields, D>(key, value);
            })*
            Err(serde::de::Error::custom(format!("unknown provider field `{key}`")))
        }
    };
}

pub(super) use providers;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(alias = "longName")]
        long_name: Option<String>,
        count: Option<u64>,
    }

    #[test]
    fn fields_and_aliases_are_known_by_asking_the_struct() {
        assert!(knows::<Sample>("long_name"));
        assert!(knows::<Sample>("longName"));
        assert!(knows::<Sample>("count"));
        assert!(!knows::<Sample>("other"));
        // serde lists an alias beside its field.
        assert_eq!(field_names::<Sample>(), ["longName", "long_name", "count"]);
    }

    #[test]
    fn one_field_is_read_with_its_type_under_its_canonical_name() {
        let value = serde_json::json!("x");
        let read = read_one::<Sample, _>("longName", value).unwrap();
        assert_eq!(read, serde_json::json!({"long_name": "x"}).as_object().unwrap().clone());
        let err = read_one::<Sample, _>("count", serde_json::json!("many")).unwrap_err();
        assert!(err.to_string().starts_with("invalid type: string \"many\""), "{err}");
    }

    #[test]
    fn kinds_are_listed_in_words() {
        assert_eq!(either(&["a", "b", "c"]), "'a', 'b' or 'c'");
        assert_eq!(either(&["a"]), "'a'");
    }
}
