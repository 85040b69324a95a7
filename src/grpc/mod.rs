//! The gRPC services: etcd's v3 services on the client port, one file each,
//! and kvd's peer service on the peer port. Errors become statuses in one
//! place, [`status`].

pub mod auth;
pub mod cluster;
pub mod election;
pub mod endpoints;
pub mod gateway;
pub mod http_access;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod peer;
pub mod status;
pub mod watch;

/// Bytes etcd allows on top of `--max-request-bytes` for gRPC framing; larger
/// messages are refused by the gRPC layer itself.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Answers a message over the size limit as etcd's gRPC layer does:
/// `RESOURCE_EXHAUSTED` (the gRPC status for it), where tonic says
/// `OUT_OF_RANGE`. Only tonic's own size-limit answer is changed; kvd's
/// out-of-range errors (compacted or future revisions) are left alone. The
/// status is in the trailers, or in the headers of a trailers-only answer.
pub fn size_limit_as_resource_exhausted(resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    fix_size_status(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            fix_size_status(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

fn fix_size_status(headers: &mut http::HeaderMap) {
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // The message is percent-encoded on the wire.
            .is_some_and(|m| {
                m.contains("decoded%20message%20length%20too%20large") || m.contains("decoded message length too large")
            });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers
            .insert("grpc-message", http::HeaderValue::from_static("grpc:%20received%20message%20larger%20than%20max"));
    }
}

/// What kvd does not serve yet, by gRPC service or method, for the message
/// of an Unimplemented answer.
const NOT_YET: &[(&str, &str)] = &[("/etcdserverpb.Maintenance/Downgrade", "downgrading the cluster version is")];

/// Gives an Unimplemented answer without a message (the router's answer to
/// a method it does not know) one that names what is not supported. The
/// status of such an answer is in its headers (a trailers-only answer).
pub fn name_unimplemented(path: &str, headers: &mut http::HeaderMap) {
    let unnamed = headers.get("grpc-status").is_some_and(|s| s == "12")
        && headers.get("grpc-message").is_none_or(|m| m.is_empty());
    if !unnamed {
        return;
    }
    let method = path.trim_start_matches('/');
    let message = match NOT_YET.iter().find(|(prefix, _)| path.starts_with(prefix)) {
        Some((_, what)) => format!("{what} not supported by kvd yet ({method})"),
        None => format!("kvd does not serve the method {method}"),
    };
    // grpc-message is percent-encoded on the wire; these messages hold only
    // letters, spaces, dots, slashes, quotes and parentheses.
    let encoded = message.replace('%', "%25").replace(' ', "%20");
    if let Ok(value) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
}
