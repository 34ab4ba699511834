//! Agent identity: reads the agent key from the request, hashes it, and finds the agent.
//!
//! Only SHA-256 hashes of agent keys are stored. Lookup buckets on the first 8 bytes of the
//! hash and confirms the full hash with a constant-time comparison; the bucket choice can only
//! reveal timing about a hash prefix, which gives no help in finding a key.

use std::collections::HashMap;

use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AgentConfig, AgentKeySpec};
use crate::error::ProxyError;

/// Agent keys are `kw_` followed by 43 base62 characters (about 256 bits).
pub const KEY_PREFIX: &str = "kw_";
const KEY_RANDOM_CHARS: usize = 43;
const MAX_KEY_LEN: usize = 512;

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random agent key from the OS random source.
pub fn generate_key() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let random: String = (0..KEY_RANDOM_CHARS).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{KEY_PREFIX}{random}")
}

/// Where a route expects the key, in words for a 401 message.
pub fn describe_places(places: &[AgentKeySpec]) -> String {
    let each: Vec<String> = places
        .iter()
        .map(|spec| match spec.schemes.as_slice() {
            [] => format!("header '{}'", spec.header),
            [one] => format!("header '{}: {one} <key>'", spec.header),
            many => format!("header '{}: <{}> <key>'", spec.header, many.join("|")),
        })
        .collect();
    each.join(" or ")
}

/// Reads the agent key from any of the route's places, or from `Proxy-Authorization: Bearer
/// <key>`. Every place that is present must hold the same key: two different keys, a key sent
/// twice in one header, an empty key, or a key with whitespace is refused.
pub fn extract_key<'h>(places: &[AgentKeySpec], headers: &'h HeaderMap, route: &str) -> Result<&'h str, ProxyError> {
    let malformed = |reason| ProxyError::MalformedAgentKey { route: route.to_string(), reason };
    let bearer = ["Bearer".to_string()];
    let proxy =
        (!places.iter().any(|p| p.header == PROXY_AUTHORIZATION)).then_some((&PROXY_AUTHORIZATION, &bearer[..]));
    let mut found: Option<&'h str> = None;
    for (header, schemes) in places.iter().map(|p| (&p.header, p.schemes.as_slice())).chain(proxy) {
        let Some(value) = single_value(headers, header).map_err(malformed)? else { continue };
        let key = parse_credential(value, schemes).map_err(malformed)?;
        match found {
            Some(earlier) if earlier != key => return Err(malformed("two different agent keys were sent")),
            _ => found = Some(key),
        }
    }
    found.ok_or_else(|| ProxyError::MissingAgentKey { route: route.to_string(), expected: describe_places(places) })
}

fn single_value<'h>(headers: &'h HeaderMap, name: &http::HeaderName) -> Result<Option<&'h str>, &'static str> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err("the key header was sent more than once");
    }
    first.to_str().map(Some).map_err(|_| "the key header is not visible ASCII")
}

/// The scheme of an AWS SigV4 `Authorization` header. On a route that accepts it, the agent key
/// is the access key id the agent signed with (`Credential=<key>/<date>/<region>/<service>/...`):
/// an agent using an AWS SDK sets its agent key as the access key id and any secret key. The
/// agent's signature is not checked (keyward does not know that secret); it is removed with the
/// header and keyward signs the outbound request itself.
pub const SIGV4_SCHEME: &str = "AWS4-HMAC-SHA256";

/// The access key id in the parameters of a SigV4 `Authorization` header.
fn sigv4_access_key(params: &str) -> Result<&str, &'static str> {
    let credential = params
        .split(',')
        .find_map(|param| param.trim().strip_prefix("Credential="))
        .ok_or("a SigV4 Authorization header without Credential=")?;
    Ok(credential.split('/').next().unwrap_or(credential))
}

fn parse_credential<'h>(value: &'h str, schemes: &[String]) -> Result<&'h str, &'static str> {
    let key = if schemes.is_empty() {
        value
    } else {
        let (scheme, key) = value.split_once(' ').ok_or("expected '<scheme> <key>'")?;
        if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            return Err("unexpected auth scheme for this route");
        }
        if scheme.eq_ignore_ascii_case(SIGV4_SCHEME) { sigv4_access_key(key)? } else { key }
    };
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("the key is too long");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the key contains whitespace or control characters");
    }
    Ok(key)
}

/// Agents by key hash. Disabled agents are left out, so their keys are unknown.
#[derive(Debug, Default)]
pub struct AgentDirectory {
    agents: Vec<AgentConfig>,
    buckets: HashMap<u64, Vec<usize>>,
    /// Agents identified by `peer_uid` alone.
    by_uid: HashMap<u32, usize>,
}

impl AgentDirectory {
    pub fn new(agents: &[AgentConfig]) -> AgentDirectory {
        let agents: Vec<AgentConfig> = agents.iter().filter(|a| !a.disabled).cloned().collect();
        let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut by_uid = HashMap::new();
        for (i, agent) in agents.iter().enumerate() {
            match (&agent.key_sha256, agent.peer_uid) {
                (Some(hash), _) => buckets.entry(bucket(hash)).or_default().push(i),
                (None, Some(uid)) => {
                    by_uid.insert(uid, i);
                }
                (None, None) => {}
            }
        }
        AgentDirectory { agents, buckets, by_uid }
    }

    /// The agent identified by a Unix-socket peer's uid alone (one without a key).
    pub fn identify_uid(&self, uid: u32) -> Option<&AgentConfig> {
        self.by_uid.get(&uid).map(|i| &self.agents[*i])
    }

    pub fn identify(&self, key: &str, route: &str) -> Result<&AgentConfig, ProxyError> {
        let hash = hash_key(key);
        self.buckets
            .get(&bucket(&hash))
            .into_iter()
            .flatten()
            .map(|i| &self.agents[*i])
            .find(|agent| agent.key_sha256.is_some_and(|k| bool::from(k.ct_eq(&hash))))
            .ok_or_else(|| ProxyError::UnknownAgentKey { route: route.to_string() })
    }
}

fn bucket(hash: &[u8; 32]) -> u64 {
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// A short, non-reversible fingerprint of a presented key, so audit can group unknown-key probes.
pub fn fingerprint(key: &str) -> String {
    hex::encode(&hash_key(key)[..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn spec(header: &str, schemes: &[&str]) -> AgentKeySpec {
        AgentKeySpec {
            header: http::HeaderName::from_bytes(header.as_bytes()).unwrap(),
            schemes: schemes.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_differ() {
        let a = generate_key();
        assert!(a.starts_with("kw_"));
        assert_eq!(a.len(), 3 + 43);
        assert!(a[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, generate_key());
    }

    #[test]
    fn extraction_cases() {
        let bearer = spec("authorization", &["Bearer"]);
        let github = spec("authorization", &["Bearer", "token"]);
        let xkey = spec("x-api-key", &[]);
        let ok = |s: &AgentKeySpec, h: &[(&str, &str)]| {
            extract_key(std::slice::from_ref(s), &headers(h), "r").map(str::to_string)
        };
        assert_eq!(ok(&bearer, &[("authorization", "Bearer kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&bearer, &[("authorization", "bearer kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&github, &[("authorization", "token kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&xkey, &[("x-api-key", "kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&xkey, &[("proxy-authorization", "Bearer kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&xkey, &[("x-api-key", "kw_a"), ("proxy-authorization", "Bearer kw_a")]).unwrap(), "kw_a");

        let code = |s: &AgentKeySpec, h: &[(&str, &str)]| ok(s, h).unwrap_err().code();
        assert_eq!(code(&bearer, &[]), "missing_agent_key");
        // A key in the wrong route's format: x-api-key on a Bearer route.
        assert_eq!(code(&bearer, &[("x-api-key", "kw_a")]), "missing_agent_key");
        assert_eq!(code(&bearer, &[("authorization", "token kw_a")]), "malformed_agent_key");
        assert_eq!(code(&bearer, &[("authorization", "kw_a")]), "malformed_agent_key");
        assert_eq!(code(&bearer, &[("authorization", "Bearer ")]), "malformed_agent_key");
        assert_eq!(code(&bearer, &[("authorization", "Bearer kw a")]), "malformed_agent_key");
        assert_eq!(code(&bearer, &[("authorization", "Bearer  kw_a")]), "malformed_agent_key");
        assert_eq!(code(&xkey, &[("x-api-key", "kw_a"), ("x-api-key", "kw_a")]), "malformed_agent_key");
        assert_eq!(
            code(&xkey, &[("x-api-key", "kw_a"), ("proxy-authorization", "Bearer kw_b")]),
            "malformed_agent_key"
        );
    }

    #[test]
    fn a_sigv4_authorization_carries_the_key_as_its_access_key_id() {
        let sigv4 = spec("authorization", &[SIGV4_SCHEME]);
        let get = |value: &str| {
            extract_key(std::slice::from_ref(&sigv4), &headers(&[("authorization", value)]), "r")
                .map(str::to_string)
                .map_err(|e| e.code())
        };
        let signed = "AWS4-HMAC-SHA256 Credential=kw_a/20260101/us-east-1/bedrock/aws4_request, \
                      SignedHeaders=content-type;host;x-amz-date, Signature=0123abcd";
        assert_eq!(get(signed).unwrap(), "kw_a");
        assert_eq!(get("AWS4-HMAC-SHA256 SignedHeaders=host,Credential=kw_b/x").unwrap(), "kw_b");
        for bad in [
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=/20260101/us-east-1/bedrock/aws4_request",
            "Bearer kw_a",
        ] {
            assert_eq!(get(bad).unwrap_err(), "malformed_agent_key", "{bad}");
        }
    }

    #[test]
    fn several_places_must_agree() {
        // The Anthropic route: the SDK's api_key (Bearer) or `x-api-key`, or both.
        let places = [spec("x-api-key", &[]), spec("authorization", &["Bearer"])];
        let ok = |h: &[(&str, &str)]| extract_key(&places, &headers(h), "r").map(str::to_string);
        assert_eq!(ok(&[("x-api-key", "kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&[("authorization", "Bearer kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&[("authorization", "Bearer kw_a"), ("x-api-key", "kw_a")]).unwrap(), "kw_a");
        assert_eq!(ok(&[("x-api-key", "kw_a"), ("proxy-authorization", "Bearer kw_a")]).unwrap(), "kw_a");

        let code = |h: &[(&str, &str)]| ok(h).unwrap_err().code();
        assert_eq!(code(&[]), "missing_agent_key");
        assert_eq!(code(&[("api-key", "kw_a")]), "missing_agent_key");
        assert_eq!(code(&[("authorization", "Bearer kw_a"), ("x-api-key", "kw_b")]), "malformed_agent_key");
        assert_eq!(code(&[("x-api-key", "kw_a"), ("proxy-authorization", "Bearer kw_b")]), "malformed_agent_key");
        // A present place that does not parse is refused, even when another place holds a key.
        assert_eq!(code(&[("authorization", "Basic eA=="), ("x-api-key", "kw_a")]), "malformed_agent_key");
        let missing = extract_key(&places, &headers(&[]), "r").unwrap_err();
        let ProxyError::MissingAgentKey { expected, .. } = missing else { panic!("{missing:?}") };
        assert_eq!(expected, "header 'x-api-key' or header 'authorization: Bearer <key>'");
    }

    #[test]
    fn directory_finds_by_hash_and_skips_disabled() {
        let agent = |id: &str, key: &str, disabled| AgentConfig {
            id: id.into(),
            role: "worker".into(),
            key_sha256: Some(hash_key(key)),
            peer_uid: None,
            disabled,
        };
        let dir = AgentDirectory::new(&[agent("a", "kw_a", false), agent("b", "kw_b", true)]);
        assert_eq!(dir.identify("kw_a", "r").unwrap().id, "a");
        assert_eq!(dir.identify("kw_b", "r").unwrap_err().code(), "unknown_agent_key");
        assert_eq!(dir.identify("kw_c", "r").unwrap_err().code(), "unknown_agent_key");
        assert_eq!(dir.agents.len(), 1, "disabled agents are not loaded");
    }
}
