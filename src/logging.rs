//! What the `kvd` binary logs.
//!
//! openraft logs each failed call to a peer it cannot reach: four lines
//! (one of them an error) every [`crate::raft::network::MAX_BACKOFF`], some
//! forty a second for as long as a member is down; and as many for a peer
//! that takes calls but does not answer them in time (paused, or its disk
//! stalled). kvd reports such a peer
//! itself, once when it becomes unreachable, every
//! [`crate::raft::network::REPORT_UNREACHABLE_EVERY`] while it stays so, and
//! once when it answers again; [`PeerNoise`] leaves openraft's lines about
//! it out. Every other line of openraft's is kept.

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// What `kvd` logs unless `RUST_LOG` says otherwise. openraft's core warns
/// of every vote or replication answer that arrives after its term or
/// membership moved on, which happens at every start and election and needs
/// nothing from an operator: those are left out; its errors are kept.
pub const DEFAULT_LOG: &str = "info,openraft=warn,openraft::core::raft_core=error,sled=warn";

/// Leaves out openraft's lines about a call to a peer that did not reach
/// it, and about waiting to try that peer again: a layer that turns such
/// events off for the whole subscriber (kvd writes its log through one).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerNoise;

impl<S: Subscriber> Layer<S> for PeerNoise {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        !is_peer_noise(event)
    }
}

/// How openraft's lines about a call that failed begin, in one of their
/// fields, for the errors kvd counts as a peer it cannot reach (see
/// `PeerConnection::failed` in [`crate::raft::network`]): one not sent or
/// cut off under the call (openraft's `Unreachable`), and one with no answer
/// in time. A field that only holds such text further on (a peer's own
/// message, quoted) does not count.
const NOISE: [&str; 2] =
    ["Unreachable node: kvd::raft::network::CallError: ", "NetworkError: kvd::raft::network::CallError: timed out: "];

/// Whether `event` is openraft's about a peer it cannot reach.
fn is_peer_noise(event: &Event<'_>) -> bool {
    if !event.metadata().target().starts_with("openraft") {
        return false;
    }
    let mut fields = Fields(Vec::new());
    event.record(&mut fields);
    fields.0.iter().any(|(name, value)| {
        // openraft writes a heartbeat's error into its message.
        let value = value.strip_prefix("heartbeat error: ").unwrap_or(value);
        NOISE.iter().any(|noise| value.starts_with(noise))
            || (*name == "message" && value.contains("backoff mode: drain events"))
    })
}

/// An event's fields, each written out.
struct Fields(Vec<(&'static str, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), value.to_string()));
    }
}

/// What a test logs, kept to look at.
#[cfg(test)]
pub(crate) mod captured {
    use std::sync::{Arc, Mutex};

    /// Lines written, shared with the test.
    #[derive(Clone, Default)]
    pub(crate) struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
        }

        /// A subscriber that writes here every line at INFO or above,
        /// but for those `PeerNoise` leaves out if `quiet`.
        pub(crate) fn subscriber(&self, quiet: bool) -> impl tracing::Subscriber {
            use tracing_subscriber::layer::SubscriberExt;
            let out = self.clone();
            let layer = tracing_subscriber::fmt::layer().with_writer(move || out.clone()).with_ansi(false);
            tracing_subscriber::registry()
                .with(tracing_subscriber::filter::LevelFilter::INFO)
                .with(quiet.then_some(super::PeerNoise))
                .with(layer)
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openraft_lines_about_an_unreachable_peer_are_left_out_and_no_others() {
        let lines = captured::Lines::default();
        let subscriber = lines.subscriber(true);
        let unreachable = "Unreachable node: kvd::raft::network::CallError: not sent: tcp connect error";
        tracing::subscriber::with_default(subscriber, || {
            // As openraft 0.9 logs a call that did not reach the peer.
            tracing::warn!(target: "openraft::replication", error = %unreachable, "error replication to target=7");
            tracing::error!(target: "openraft::replication", err = %unreachable, "RPCError");
            tracing::warn!(target: "openraft::replication", "backoff_drain_events backoff mode: drain events");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error: {unreachable}");
            tracing::error!(target: "openraft::core::raft_core", error = %unreachable, "while requesting vote");
            let late = "NetworkError: kvd::raft::network::CallError: timed out: AppendEntries to 7 after 150ms";
            tracing::error!(target: "openraft::replication", err = %late, "RPCError");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error: {late}");
            // Kept: openraft's other lines, and kvd's own about the peer.
            tracing::error!(target: "openraft::replication", error = "io error", "error replication to target=7");
            tracing::error!(target: "openraft::replication", err = "Timeout: after 1s", "RPCError");
            tracing::error!(target: "openraft::replication", err = "NetworkError: CallError: no answer: reset", "RPCError");
            let quoted = format!("NetworkError: kvd::raft::network::CallError: no answer: message: \"{unreachable}\"");
            tracing::error!(target: "openraft::replication", err = %quoted, "RPCError");
            tracing::warn!(target: "kvd::raft::network", "peer unreachable: {unreachable}");
        });
        let text = lines.text();
        let kept: Vec<&str> = text.lines().collect();
        assert_eq!(kept.len(), 5, "{text}");
        assert!(kept[0].contains("io error") && kept[1].contains("Timeout"), "{text}");
        assert!(kept[2].contains("no answer: reset"), "{text}");
        assert!(kept[3].contains("no answer: message"), "a peer's text quoted is kept: {text}");
        assert!(kept[4].contains("kvd::raft::network") && kept[4].contains("peer unreachable"), "{text}");
    }
}
