//! Who may use the client port's plain HTTP (the JSON gateway, `/version`,
//! `/health`, `/metrics`), as etcd decides it for its HTTP handler; gRPC
//! calls are not affected, as in etcd.
//!
//! - `--cors`: the origins a browser may call from. Every HTTP answer
//!   carries `Access-Control-Allow-Origin: *` when all origins are allowed
//!   (the default), or the request's `Origin` when it is one listed; with
//!   the methods and headers etcd allows. An `OPTIONS` request (a browser's
//!   preflight) is answered here with 200 and no body.
//! - `--host-whitelist`: on a plain-text listener, a request whose `Host`
//!   names a host not listed is refused with 421 (Misdirected Request), so
//!   that a web page cannot reach a member on 127.0.0.1 through a DNS name
//!   it rebinds there. Requests over TLS are not checked, as in etcd.

use http::HeaderValue;

type Reply = http::Response<tonic::body::Body>;

/// The methods and headers a browser is told it may use.
const ALLOW_METHODS: &str = "POST, GET, OPTIONS, PUT, DELETE";
const ALLOW_HEADERS: &str = "accept, content-type, authorization";

/// A list from a flag: everything, or only what is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    All,
    Only(Vec<String>),
}

impl Allowed {
    /// `*` or an empty flag allows all, as in etcd.
    fn parse(flag: &str) -> Allowed {
        let items: Vec<String> = flag.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if items.is_empty() || items.iter().any(|s| s == "*") {
            Allowed::All
        } else {
            Allowed::Only(items)
        }
    }

    fn allows(&self, item: &str) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(items) => items.iter().any(|i| i.eq_ignore_ascii_case(item)),
        }
    }
}

/// The CORS and host checks of one client listener.
#[derive(Debug, Clone)]
pub struct HttpAccess {
    origins: Allowed,
    hosts: Allowed,
    /// Whether the listener is TLS: then the host is not checked.
    tls: bool,
}

impl HttpAccess {
    /// From the values of `--cors` and `--host-whitelist`; an origin must be
    /// `scheme://host[:port]`, as browsers send it.
    pub fn parse(cors: &str, host_whitelist: &str) -> Result<HttpAccess, String> {
        let origins = Allowed::parse(cors);
        if let Allowed::Only(items) = &origins {
            for origin in items {
                let ok = origin
                    .split_once("://")
                    .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty() && !rest.contains('/'));
                if !ok {
                    return Err(format!("--cors: {origin:?} is not an origin (scheme://host[:port]) or *"));
                }
            }
        }
        Ok(HttpAccess { origins, hosts: Allowed::parse(host_whitelist), tls: false })
    }

    /// The same checks for a listener with or without TLS.
    pub fn on_listener(&self, tls: bool) -> HttpAccess {
        HttpAccess { tls, ..self.clone() }
    }

    /// Checks an HTTP request: the answer to give at once (a refused host,
    /// or a preflight), or else the `Access-Control-Allow-Origin` to put on
    /// the answer, if any.
    pub fn check<B>(&self, req: &http::Request<B>) -> Result<Option<HeaderValue>, Box<Reply>> {
        if !self.tls {
            let host = host_name(req);
            if !self.hosts.allows(&host) {
                return Err(Box::new(misdirected(&host)));
            }
        }
        let origin = if self.origins == Allowed::All {
            Some(HeaderValue::from_static("*"))
        } else {
            req.headers()
                .get(http::header::ORIGIN)
                .filter(|o| o.to_str().is_ok_and(|o| self.origins.allows(o)))
                .cloned()
        };
        if req.method() == http::Method::OPTIONS {
            let mut resp = http::Response::new(tonic::body::Body::empty());
            allow(&mut resp, origin);
            return Err(Box::new(resp));
        }
        Ok(origin)
    }
}

/// Puts the CORS headers for `origin`, if any, on `resp`.
pub fn allow(resp: &mut Reply, origin: Option<HeaderValue>) {
    let Some(origin) = origin else { return };
    let headers = resp.headers_mut();
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
}

/// The host a request names, without its port: from the URI (HTTP/2's
/// `:authority`) or the `Host` header.
fn host_name<B>(req: &http::Request<B>) -> String {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(String::from))
        .unwrap_or_default();
    match authority.parse::<http::uri::Authority>() {
        Ok(a) => a.host().trim_start_matches('[').trim_end_matches(']').to_string(),
        Err(_) => authority,
    }
}

fn misdirected(host: &str) -> Reply {
    let body = format!(
        "kvd received this request, but its Host header ({host:?}) is not one this member serves plain HTTP to.\n\
         Use TLS (any host is accepted over https), or add the host to --host-whitelist.\n\
         The check keeps web pages from reaching the member through a DNS name rebound to its address (CVE-2018-5702).\n"
    );
    let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
    *resp.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, host: &str, origin: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri("/v3/kv/range").header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn all_origins_get_a_star_and_listed_ones_their_own() {
        let all = HttpAccess::parse("*", "*").unwrap();
        assert_eq!(all.check(&req("POST", "x", None)).unwrap(), Some(HeaderValue::from_static("*")));
        let some = HttpAccess::parse("http://a.example, https://b.example:8443", "").unwrap();
        assert_eq!(
            some.check(&req("POST", "x", Some("https://b.example:8443"))).unwrap(),
            Some(HeaderValue::from_static("https://b.example:8443"))
        );
        assert_eq!(some.check(&req("POST", "x", Some("http://evil.example"))).unwrap(), None);
        assert_eq!(some.check(&req("POST", "x", None)).unwrap(), None);
        assert!(HttpAccess::parse("a.example", "*").unwrap_err().contains("not an origin"));
    }

    #[test]
    fn preflight_is_answered_with_the_headers_when_allowed() {
        let some = HttpAccess::parse("http://a.example", "*").unwrap();
        let yes = some.check(&req("OPTIONS", "x", Some("http://a.example"))).unwrap_err();
        assert_eq!(yes.status(), 200);
        assert_eq!(yes.headers()["access-control-allow-methods"], ALLOW_METHODS);
        let no = some.check(&req("OPTIONS", "x", Some("http://b.example"))).unwrap_err();
        assert_eq!(no.status(), 200);
        assert!(no.headers().get("access-control-allow-origin").is_none());
    }

    #[test]
    fn hosts_are_checked_without_their_port_and_only_without_tls() {
        let a = HttpAccess::parse("*", "example.com,127.0.0.1,::1").unwrap();
        assert!(a.check(&req("POST", "example.com:2379", None)).is_ok());
        assert!(a.check(&req("POST", "127.0.0.1", None)).is_ok());
        assert!(a.check(&req("POST", "[::1]:2379", None)).is_ok());
        let refused = a.check(&req("POST", "evil.com:2379", None)).unwrap_err();
        assert_eq!(refused.status(), 421);
        assert!(a.on_listener(true).check(&req("POST", "evil.com", None)).is_ok());
    }
}
