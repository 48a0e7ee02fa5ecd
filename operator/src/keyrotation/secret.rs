//! The content of a schedule's Secret (and JWKS) for a [`Plan`]: the
//! entries of every version the plan lists, newly generated ones added,
//! the current version's entries repeated under `current.*`, and what
//! consumers read: the gateway's key map (`api-key`) or the public keys
//! (`ecdsa-p256`), both of accepted versions only.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;

use super::keys::{self, GATEWAY_MAP_ENTRY, KeyError};
use super::rotation::{self, Plan};
use crate::api::{KeyAlgorithm, KeyRotationSchedule};
use kube::ResourceExt;

/// The Secret's data and, for `ecdsa-p256`, the JWKS document.
#[derive(Debug)]
pub struct Composed {
    pub data: BTreeMap<String, ByteString>,
    pub jwks: Option<String>,
}

/// The Secret holding the schedule's keys.
/// (Named here, the pure module, so that every controller can name it.)
pub fn secret_name(krs: &KeyRotationSchedule) -> String {
    krs.spec.secret_name.clone().unwrap_or_else(|| format!("{}-keys", krs.name_any()))
}

/// The ConfigMap publishing an `ecdsa-p256` schedule's public keys.
pub fn jwks_name(schedule: &str) -> String {
    format!("{schedule}-jwks")
}

/// Composes the Secret from what it holds now (`live`) and the plan.
/// Entries the operator does not write (not `v{N}.…`) are left out: they
/// are not the operator's to apply.
pub fn compose(
    schedule: &str,
    algorithm: KeyAlgorithm,
    clients: &[String],
    live: &BTreeMap<String, ByteString>,
    plan: &Plan,
) -> Result<Composed, KeyError> {
    let listed: BTreeSet<i64> = plan.status.versions.iter().map(|v| v.version).collect();
    let mut data: BTreeMap<String, ByteString> = live
        .iter()
        .filter(|(name, _)| keys::entry_version(name).is_some_and(|v| listed.contains(&v)))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    if plan.revoke_removed_clients {
        keys::revoke_other_clients(&mut data, clients);
    }
    for &version in &plan.generate {
        data.retain(|name, _| keys::entry_version(name) != Some(version));
        data.extend(keys::generate(algorithm, clients, version)?.into_entries());
    }
    let accepted: BTreeSet<i64> = rotation::accepted(&plan.status).into_iter().collect();
    let accepted_data: BTreeMap<String, ByteString> = data
        .iter()
        .filter(|(name, _)| keys::entry_version(name).is_some_and(|v| accepted.contains(&v)))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let jwks = match algorithm {
        KeyAlgorithm::ApiKey => {
            data.insert(GATEWAY_MAP_ENTRY.to_owned(), ByteString(keys::gateway_map(&accepted_data)?.into_bytes()));
            None
        }
        KeyAlgorithm::EcdsaP256 => Some(keys::jwks(schedule, &accepted_data)?),
        KeyAlgorithm::HmacSha256 | KeyAlgorithm::Aes256 => None,
    };
    if let Some(current) = plan.status.current_version {
        let aliases = keys::current_aliases(&data, current);
        data.extend(aliases);
    }
    Ok(Composed { data, jwks })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::{KeyRotationScheduleStatus, KeyVersion, KeyVersionState};

    fn plan(versions: &[(i64, KeyVersionState)], current: i64, generate: &[i64]) -> Plan {
        let status = KeyRotationScheduleStatus {
            current_version: Some(current),
            versions: versions
                .iter()
                .map(|&(version, state)| KeyVersion {
                    version,
                    created_at: Time(Timestamp::UNIX_EPOCH),
                    expires_at: None,
                    state,
                })
                .collect(),
            ..Default::default()
        };
        Plan {
            status,
            generate: generate.iter().copied().collect(),
            revoke_removed_clients: false,
            steps: Vec::new(),
            wake_at: None,
        }
    }

    fn text(data: &BTreeMap<String, ByteString>, entry: &str) -> String {
        String::from_utf8(data[entry].0.clone()).unwrap()
    }

    #[test]
    fn the_gateway_map_holds_accepted_versions_and_current_aliases_the_current_one() {
        use KeyVersionState::*;
        let clients = vec!["billing".to_owned(), "portal".to_owned()];
        let first = compose("api", KeyAlgorithm::ApiKey, &clients, &BTreeMap::new(), &plan(&[(1, Current)], 1, &[1]))
            .unwrap()
            .data;
        // Version 2 pending beside the current 1: both in the map, clients get 1.
        let both =
            compose("api", KeyAlgorithm::ApiKey, &clients, &first, &plan(&[(2, Pending), (1, Current)], 1, &[2]))
                .unwrap()
                .data;
        let v1 = text(&both, "v1.client.billing");
        let v2 = text(&both, "v2.client.billing");
        assert_eq!(v1, text(&first, "v1.client.billing"), "an existing version is never regenerated");
        assert_eq!(text(&both, "current.client.billing"), v1);
        let map = text(&both, GATEWAY_MAP_ENTRY);
        assert!(map.contains(&v1) && map.contains(&v2));
        // Version 1 retired: still in the Secret, no longer in the map.
        let retired =
            compose("api", KeyAlgorithm::ApiKey, &clients, &both, &plan(&[(2, Current), (1, Retired)], 2, &[]))
                .unwrap()
                .data;
        assert_eq!(text(&retired, "v1.client.billing"), v1);
        assert_eq!(text(&retired, "current.client.billing"), v2);
        let map = text(&retired, GATEWAY_MAP_ENTRY);
        assert!(!map.contains(&v1) && map.contains(&v2));
        // Pruned: gone from the Secret.
        let pruned =
            compose("api", KeyAlgorithm::ApiKey, &clients, &retired, &plan(&[(2, Current)], 2, &[])).unwrap().data;
        assert!(!pruned.contains_key("v1.client.billing"));
    }

    #[test]
    fn a_client_change_revokes_removed_clients_in_every_version() {
        use KeyVersionState::*;
        let before = vec!["billing".to_owned(), "portal".to_owned()];
        let data = compose("api", KeyAlgorithm::ApiKey, &before, &BTreeMap::new(), &plan(&[(1, Current)], 1, &[1]))
            .unwrap()
            .data;
        let portal = text(&data, "v1.client.portal");
        let after = vec!["billing".to_owned(), "research".to_owned()];
        let mut next = plan(&[(2, Pending), (1, Current)], 1, &[2]);
        next.revoke_removed_clients = true;
        let data = compose("api", KeyAlgorithm::ApiKey, &after, &data, &next).unwrap().data;
        assert!(!data.contains_key("v1.client.portal") && !data.contains_key("v2.client.portal"));
        assert!(data.contains_key("v2.client.research") && !data.contains_key("v1.client.research"));
        assert!(!text(&data, GATEWAY_MAP_ENTRY).contains(&portal), "a removed client's token is refused at once");
    }

    #[test]
    fn the_jwks_publishes_accepted_public_keys_only() {
        use KeyVersionState::*;
        let one = compose("sig", KeyAlgorithm::EcdsaP256, &[], &BTreeMap::new(), &plan(&[(1, Current)], 1, &[1]))
            .unwrap()
            .data;
        let two =
            compose("sig", KeyAlgorithm::EcdsaP256, &[], &one, &plan(&[(2, Current), (1, Retired)], 2, &[2])).unwrap();
        let jwks = two.jwks.unwrap();
        assert!(jwks.contains("\"kid\":\"sig-v2\"") && !jwks.contains("sig-v1"), "{jwks}");
        assert!(!jwks.contains("PRIVATE") && !jwks.contains("\"d\""), "public members only");
        assert_eq!(text(&two.data, "current.private.pem"), text(&two.data, "v2.private.pem"));
    }
}
