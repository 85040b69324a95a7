//! The JSON of a response header, as etcd's gateway writes it: the four
//! fields etcd's header has, 64-bit integers as strings, zeros left out.
//! kvd's `auth_revision` is left out: etcd's JSON has no such field, and
//! decoders that refuse unknown fields (Go's protojson, by default) would
//! refuse every answer that carried it. gRPC clients get it, and skip it if
//! they do not know it.

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ResponseHeader;

impl Serialize for ResponseHeader {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = [
            ("cluster_id", self.cluster_id.to_string(), self.cluster_id != 0),
            ("member_id", self.member_id.to_string(), self.member_id != 0),
            ("revision", self.revision.to_string(), self.revision != 0),
            ("raft_term", self.raft_term.to_string(), self.raft_term != 0),
        ];
        let mut map = serializer.serialize_map(Some(fields.iter().filter(|f| f.2).count()))?;
        for (name, value, _) in fields.iter().filter(|f| f.2) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// A 64-bit integer as JSON gives it: a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Int<T> {
    Number(T),
    Text(String),
}

impl<T: std::str::FromStr> Int<T> {
    fn get<E: serde::de::Error>(self) -> Result<T, E> {
        match self {
            Int::Number(n) => Ok(n),
            Int::Text(s) => s.parse().map_err(|_| E::custom(format!("not an integer: {s:?}"))),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Fields {
    cluster_id: Option<Int<u64>>,
    #[serde(alias = "clusterId")]
    cluster_id_camel: Option<Int<u64>>,
    member_id: Option<Int<u64>>,
    #[serde(alias = "memberId")]
    member_id_camel: Option<Int<u64>>,
    revision: Option<Int<i64>>,
    raft_term: Option<Int<u64>>,
    #[serde(alias = "raftTerm")]
    raft_term_camel: Option<Int<u64>>,
}

impl<'de> Deserialize<'de> for ResponseHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let f = Option::<Fields>::deserialize(deserializer)?.unwrap_or_default();
        let int = |a: Option<Int<u64>>, b: Option<Int<u64>>| a.or(b).map_or(Ok(0), Int::get::<D::Error>);
        Ok(ResponseHeader {
            cluster_id: int(f.cluster_id, f.cluster_id_camel)?,
            member_id: int(f.member_id, f.member_id_camel)?,
            revision: f.revision.map_or(Ok(0), Int::get)?,
            raft_term: int(f.raft_term, f.raft_term_camel)?,
            auth_revision: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_etcds_without_the_auth_revision() {
        let h = ResponseHeader { cluster_id: 7, member_id: 0, revision: 3, raft_term: 2, auth_revision: 9 };
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(text, r#"{"cluster_id":"7","revision":"3","raft_term":"2"}"#);
        let back: ResponseHeader = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ResponseHeader { auth_revision: 0, ..h });
        let camel: ResponseHeader = serde_json::from_str(r#"{"clusterId":7,"raftTerm":"2","x":1}"#).unwrap();
        assert_eq!((camel.cluster_id, camel.raft_term), (7, 2));
        assert!(serde_json::from_str::<ResponseHeader>(r#"{"revision":"x"}"#).is_err());
        assert_eq!(serde_json::from_str::<ResponseHeader>("null").unwrap(), ResponseHeader::default());
    }
}
