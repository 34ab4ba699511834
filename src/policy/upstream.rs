//! Where a route sends its calls (scheme, authority, base path) and the URI of one call there.

use std::fmt;

use http::Uri;

#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path prefix on the upstream, without a trailing slash ("" for none).
    pub base_path: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl Upstream {
    /// The URI of a call to `path` (below the base path) with `query`, on this upstream.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut path_and_query = format!("{}{}", self.base_path, path);
        if path_and_query.is_empty() {
            path_and_query.push('/');
        }
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}
