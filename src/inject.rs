//! Puts a resolved credential on the outbound request: a templated header, a query parameter, or
//! HTTP basic auth. Header values are marked sensitive; intermediate strings are zeroized.

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::config::{InjectSpec, Template, TemplatePart};
use crate::error::ProxyError;

fn render(template: &Template, secret: &SecretString) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for part in &template.parts {
        match part {
            TemplatePart::Literal(text) => out.push_str(text),
            TemplatePart::Secret => out.push_str(secret.expose_secret()),
        }
    }
    out
}

fn sensitive_header(value: &str) -> Result<HeaderValue, ProxyError> {
    let mut header = HeaderValue::from_str(value)
        .map_err(|_| ProxyError::Internal("the credential cannot be sent as a header value"))?;
    header.set_sensitive(true);
    Ok(header)
}

/// Applies `spec` to the outbound headers and query. Any same-named header or query parameter
/// the agent sent is replaced, so an agent cannot override or append to the injected credential.
pub fn apply(
    spec: &InjectSpec,
    secret: &SecretString,
    headers: &mut HeaderMap,
    query: &mut Option<String>,
) -> Result<(), ProxyError> {
    match spec {
        InjectSpec::Header { name, value } => {
            headers.insert(name.clone(), sensitive_header(&render(value, secret))?);
        }
        InjectSpec::Basic { username, password } => {
            let pair = Zeroizing::new(format!("{}:{}", *render(username, secret), *render(password, secret)));
            let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
            let value = Zeroizing::new(format!("Basic {}", *encoded));
            headers.insert(AUTHORIZATION, sensitive_header(&value)?);
        }
        InjectSpec::Query { name, value } => {
            let rendered = render(value, secret);
            let mut kept: Vec<&str> = query
                .as_deref()
                .unwrap_or("")
                .split('&')
                .filter(|pair| !pair.is_empty())
                .filter(|pair| !pair.split(';').any(|part| names_parameter(part, name)))
                .collect();
            let encoded = Zeroizing::new(format!("{name}={}", utf8_percent_encode(&rendered, NON_ALPHANUMERIC)));
            kept.push(&encoded);
            *query = Some(kept.join("&"));
        }
        // The credential kind signs the request instead (`credentials::sigv4`).
        InjectSpec::Signed => {}
    }
    Ok(())
}

/// Whether a query pair sets parameter `name` in any spelling an upstream might accept:
/// percent-encoded, another letter case, or with a `[..]` array suffix.
pub(crate) fn names_parameter(pair: &str, name: &str) -> bool {
    let key = pair.split('=').next().unwrap_or(pair);
    let decoded = percent_decode_str(key).decode_utf8_lossy();
    let base = decoded.split('[').next().unwrap_or(&decoded).trim();
    base.eq_ignore_ascii_case(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(parts: &[Option<&str>]) -> Template {
        Template {
            parts: parts
                .iter()
                .map(|p| match p {
                    Some(text) => TemplatePart::Literal(text.to_string()),
                    None => TemplatePart::Secret,
                })
                .collect(),
        }
    }

    #[test]
    fn header_injection_replaces_and_is_sensitive() {
        let spec = InjectSpec::Header { name: AUTHORIZATION, value: template(&[Some("Bearer "), None]) };
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer agent-supplied"));
        apply(&spec, &SecretString::from("sk-real"), &mut headers, &mut None).unwrap();
        let value = headers.get(AUTHORIZATION).unwrap();
        assert_eq!(value, "Bearer sk-real");
        assert!(value.is_sensitive());
        assert_eq!(headers.get_all(AUTHORIZATION).iter().count(), 1);
        assert!(!format!("{headers:?}").contains("sk-real"));
    }

    #[test]
    fn basic_auth_encodes_both_parts() {
        let spec = InjectSpec::Basic { username: template(&[Some("x-access-token")]), password: template(&[None]) };
        let mut headers = HeaderMap::new();
        apply(&spec, &SecretString::from("ghp_x"), &mut headers, &mut None).unwrap();
        assert_eq!(headers.get(AUTHORIZATION).unwrap(), "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX3g=");
    }

    #[test]
    fn query_injection_replaces_agent_supplied_parameter() {
        let spec = InjectSpec::Query { name: "key".into(), value: template(&[None]) };
        let mut query = Some("a=1&key=mine&%6bey=sneaky&KEY=upper&key[]=arr&c=3;key=semi&b=2".to_string());
        apply(&spec, &SecretString::from("s/e c"), &mut HeaderMap::new(), &mut query).unwrap();
        assert_eq!(query.unwrap(), "a=1&b=2&key=s%2Fe%20c");
        let mut none = None;
        apply(&spec, &SecretString::from("v"), &mut HeaderMap::new(), &mut none).unwrap();
        assert_eq!(none.unwrap(), "key=v");
    }

    #[test]
    fn a_credential_that_is_not_a_header_value_fails_without_echoing_it() {
        let spec = InjectSpec::Header { name: AUTHORIZATION, value: template(&[None]) };
        let err = apply(&spec, &SecretString::from("bad\nvalue"), &mut HeaderMap::new(), &mut None).unwrap_err();
        assert!(!err.message().contains("bad"));
    }
}
