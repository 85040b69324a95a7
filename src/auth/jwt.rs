//! JSON Web Tokens, as etcd's `--auth-token jwt,pub-key=…,priv-key=…,
//! sign-method=…,ttl=…`: a member that has the private key signs a token
//! naming the user and the auth revision it was issued at; every member
//! with the public key verifies it on its own, with no state shared.
//! Unlike simple tokens, a JWT lapses at its expiry however much it is used,
//! and one issued before an auth change is answered "revision of auth store
//! is old", on which clients authenticate again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// etcd's default lifetime of a JWT.
const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// The claims of a token: etcd's names.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// The keys and settings of `--auth-token jwt,...`.
pub struct Jwt {
    algorithm: Algorithm,
    /// Absent on a member given only the public key: it verifies tokens
    /// but cannot issue them.
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt").field("algorithm", &self.algorithm).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl Jwt {
    /// Reads the options after `jwt,` (`pub-key=PATH,priv-key=PATH,
    /// sign-method=RS256|…,ttl=5m`) and loads the keys.
    pub fn parse(options: &str) -> Result<Jwt, String> {
        let (mut public, mut private, mut method, mut ttl) = (None, None, None, DEFAULT_TTL);
        for option in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) =
                option.split_once('=').ok_or_else(|| format!("--auth-token jwt: {option:?} is not name=value"))?;
            match name {
                "pub-key" => public = Some(value.to_string()),
                "priv-key" => private = Some(value.to_string()),
                "sign-method" => method = Some(value.to_string()),
                "ttl" => {
                    ttl =
                        humantime::parse_duration(value).map_err(|e| format!("--auth-token jwt: ttl {value:?}: {e}"))?
                }
                other => return Err(format!("--auth-token jwt: unknown option {other:?}")),
            }
        }
        let method = method.ok_or("--auth-token jwt needs sign-method=…")?;
        let algorithm = match method.as_str() {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(format!("--auth-token jwt: sign-method {other:?} is not one kvd supports (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)")),
        };
        let read = |what: &str, path: &str| {
            std::fs::read(path).map_err(|e| format!("--auth-token jwt: reading {what} {path}: {e}"))
        };
        let public = public.ok_or("--auth-token jwt needs pub-key=…")?;
        let public_pem = read("pub-key", &public)?;
        let bad = |what: &str, path: &str, e: jsonwebtoken::errors::Error| {
            format!("--auth-token jwt: {what} {path} is not a {method} key in PEM: {e}")
        };
        let decoding = match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&public_pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&public_pem),
            _ => DecodingKey::from_rsa_pem(&public_pem),
        }
        .map_err(|e| bad("pub-key", &public, e))?;
        let encoding = match &private {
            None => None,
            Some(path) => {
                let pem = read("priv-key", path)?;
                Some(
                    match algorithm {
                        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                        _ => EncodingKey::from_rsa_pem(&pem),
                    }
                    .map_err(|e| bad("priv-key", path, e))?,
                )
            }
        };
        let jwt = Jwt { algorithm, encoding, decoding, ttl };
        // A pair that does not match would issue tokens no member takes.
        if jwt.encoding.is_some() {
            let probe = jwt.sign("kvd-key-check", 0).map_err(|e| format!("--auth-token jwt: signing: {e}"))?;
            if jwt.verify(&probe).is_none() {
                return Err(format!("--auth-token jwt: pub-key {public} does not verify what priv-key signs"));
            }
        }
        Ok(jwt)
    }

    /// A token for `user`, issued at auth revision `revision`.
    pub fn sign(&self, user: &str, revision: u64) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
        self.sign_until(user, revision, (now + self.ttl).as_secs())
    }

    /// A token for `user` that expires at `exp` (seconds since the epoch).
    fn sign_until(&self, user: &str, revision: u64, exp: u64) -> Result<String, String> {
        let encoding = self
            .encoding
            .as_ref()
            .ok_or("this member has no --auth-token priv-key: it verifies tokens but cannot issue them")?;
        let claims = Claims { username: user.to_string(), revision, exp };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding).map_err(|e| e.to_string())
    }

    /// The user and auth revision of a token this member's key verifies and
    /// that has not expired.
    pub fn verify(&self, token: &str) -> Option<(String, u64)> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        Some((data.claims.username, data.claims.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &std::path::Path, name: &str) -> (String, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let (public, private) = (dir.join(format!("{name}.pub")), dir.join(format!("{name}.key")));
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        std::fs::write(&private, pair.serialize_pem()).unwrap();
        (public.display().to_string(), private.display().to_string())
    }

    #[test]
    fn tokens_verify_with_the_key_pair_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = keys(dir.path(), "a");
        let (other_public, _) = keys(dir.path(), "b");
        let jwt = Jwt::parse(&format!("pub-key={public},priv-key={private},sign-method=ES256,ttl=1h")).unwrap();
        let token = jwt.sign("alice", 7).unwrap();
        assert_eq!(jwt.verify(&token), Some(("alice".to_string(), 7)));
        assert_eq!(jwt.verify("nope"), None);
        // A member with only the public key verifies, and cannot issue.
        let verifier = Jwt::parse(&format!("pub-key={public},sign-method=ES256")).unwrap();
        assert_eq!(verifier.verify(&token), Some(("alice".to_string(), 7)));
        assert!(verifier.sign("alice", 7).unwrap_err().contains("cannot issue"));
        // Another key does not take it.
        let stranger = Jwt::parse(&format!("pub-key={other_public},sign-method=ES256")).unwrap();
        assert_eq!(stranger.verify(&token), None);
        // A lapsed token is refused.
        let past = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 1;
        let lapsed = jwt.sign_until("alice", 7, past).unwrap();
        assert_eq!(jwt.verify(&lapsed), None);
        // Bad settings are named.
        assert!(Jwt::parse(&format!("pub-key={public},sign-method=HS256")).unwrap_err().contains("sign-method"));
        assert!(Jwt::parse(&format!("pub-key={other_public},priv-key={private},sign-method=ES256"))
            .unwrap_err()
            .contains("does not verify"));
        assert!(Jwt::parse("sign-method=ES256").unwrap_err().contains("pub-key"));
    }
}
