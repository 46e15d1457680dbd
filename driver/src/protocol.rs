//! The JSON bodies of Docker's VolumeDriver protocol (plugin API v1.2), as Docker sends and
//! expects them. Field names are Docker's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::volumes::{Scope, VolumeInfo};

/// The media type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateRequest {
    pub name: String,
    /// Docker sends `null` when no `-o` was given.
    #[serde(default)]
    pub opts: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NameRequest {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MountRequest {
    pub name: String,
    #[serde(rename = "ID")]
    pub id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateResponse {
    pub implements: Vec<&'static str>,
}

/// The answer to Create, Remove and Unmount; also every error.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ErrResponse {
    pub err: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MountpointResponse {
    pub mountpoint: String,
    pub err: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Volume {
    pub name: String,
    pub mountpoint: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<String, Value>,
}

impl From<VolumeInfo> for Volume {
    fn from(info: VolumeInfo) -> Self {
        Self {
            name: info.name,
            mountpoint: info.mountpoint.to_string_lossy().into_owned(),
            created_at: info.created_at,
            status: info.status,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetResponse {
    pub volume: Volume,
    pub err: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListResponse {
    pub volumes: Vec<Volume>,
    pub err: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CapabilitiesResponse {
    pub capabilities: Capabilities,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Capabilities {
    pub scope: &'static str,
}

impl From<Scope> for CapabilitiesResponse {
    fn from(scope: Scope) -> Self {
        let scope = match scope {
            Scope::Local => "local",
            Scope::Global => "global",
        };
        Self {
            capabilities: Capabilities { scope },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_dockers_field_names() {
        let create: CreateRequest =
            serde_json::from_str(r#"{"Name":"db","Opts":{"cache_size":"1G"}}"#).unwrap();
        assert_eq!(create.name, "db");
        assert_eq!(create.opts.unwrap()["cache_size"], "1G");
        let bare: CreateRequest = serde_json::from_str(r#"{"Name":"db","Opts":null}"#).unwrap();
        assert!(bare.opts.is_none());
        let mount: MountRequest = serde_json::from_str(r#"{"Name":"db","ID":"abc"}"#).unwrap();
        assert_eq!((mount.name.as_str(), mount.id.as_str()), ("db", "abc"));
    }

    #[test]
    fn answers_use_dockers_field_names() {
        let answer = serde_json::to_value(CapabilitiesResponse::from(Scope::Global)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"Capabilities": {"Scope": "global"}})
        );
        let list = ListResponse {
            volumes: vec![Volume {
                name: "db".into(),
                mountpoint: "/m/db".into(),
                created_at: "2026-11-23T17:00:00Z".into(),
                status: BTreeMap::new(),
            }],
            err: String::new(),
        };
        assert_eq!(
            serde_json::to_value(list).unwrap(),
            serde_json::json!({"Volumes": [{"Name": "db", "Mountpoint": "/m/db",
                "CreatedAt": "2026-11-23T17:00:00Z"}], "Err": ""})
        );
    }
}
