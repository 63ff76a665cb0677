//! Typed ids: a computer id can never be passed where a snapshot id is expected.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                $name(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

uuid_id!(
    /// A computer (a VM and its disk).
    ComputerId
);
uuid_id!(
    /// A snapshot of a computer.
    SnapshotId
);
uuid_id!(
    /// A tenant: owns API keys, computers and snapshots.
    TenantId
);

/// A host of a control plane: 1 to 63 lowercase letters, digits and dashes, not starting or
/// ending with a dash (it is also a name in the host's certificate).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

/// Why a string is not a host id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHostId(pub String);

impl std::fmt::Display for BadHostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a host id: 1 to 63 lowercase letters, digits and dashes, not starting or ending with a dash",
            self.0
        )
    }
}

impl std::error::Error for BadHostId {}

impl HostId {
    /// Whether `id` is a well-formed host id.
    pub fn is_valid(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 63
            && !id.starts_with('-')
            && !id.ends_with('-')
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostId {
    type Err = BadHostId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match HostId::is_valid(s) {
            true => Ok(HostId(s.to_string())),
            false => Err(BadHostId(s.to_string())),
        }
    }
}

impl TryFrom<String> for HostId {
    type Error = BadHostId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        match HostId::is_valid(&s) {
            true => Ok(HostId(s)),
            false => Err(BadHostId(s)),
        }
    }
}

impl From<HostId> for String {
    fn from(id: HostId) -> String {
        id.0
    }
}

impl AsRef<str> for HostId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_plain_uuid_strings() {
        let id = ComputerId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.0));
        assert_eq!(id.to_string().parse::<ComputerId>().unwrap(), id);
        assert!("not-a-uuid".parse::<SnapshotId>().is_err());
    }

    #[test]
    fn host_ids_are_checked_when_made_and_when_read() {
        assert_eq!("host-a1".parse::<HostId>().unwrap().as_str(), "host-a1");
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            let e = bad.parse::<HostId>().unwrap_err();
            assert!(e.to_string().contains("is not a host id"), "{e}");
        }
        assert!(serde_json::from_str::<HostId>("\"Bad Host\"").is_err());
        assert_eq!(serde_json::to_string(&"b".parse::<HostId>().unwrap()).unwrap(), "\"b\"");
    }
}
