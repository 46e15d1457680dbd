//! `cairn ls` and `cairn report [VOLUME] [FLAG]`: what the daemon knows of its volumes, in the
//! style of Dokku's reports: a block of aligned `Name: value` lines per volume, one bare value
//! for a flag such as `--volume-dirty-bytes` (for scripts), or JSON with `--format json`.

use std::path::PathBuf;

use cairn_driver::client::call;
use cairn_driver::config::DEFAULT_SOCKET;
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The daemon's plugin socket.
    #[arg(long, env = "CAIRN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A volume (default: every volume).
    pub volume: Option<String>,
    /// Print only this fact of the volume, bare: --volume-dirty-bytes, --volume-lease, ...
    #[arg(allow_hyphen_values = true, requires = "volume")]
    pub flag: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The daemon's plugin socket.
    #[arg(long, env = "CAIRN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// The facts of one volume, in report order: (flag name, value).
fn facts(volume: &Value) -> Vec<(&'static str, Value)> {
    let status = &volume["Status"];
    let option = |name: &str, default: &str| {
        status["options"][name]
            .as_str()
            .map_or_else(|| json!(default), |v| json!(v))
    };
    let or = |value: &Value, default: Value| {
        if value.is_null() {
            default
        } else {
            value.clone()
        }
    };
    vec![
        ("name", volume["Name"].clone()),
        ("store", status["store"].clone()),
        ("mountpoint", volume["Mountpoint"].clone()),
        ("created-at", volume["CreatedAt"].clone()),
        ("access", option("access", "exclusive")),
        ("store-defaults", from_store_defaults(status)),
        ("host", status["host"].clone()),
        ("lease", or(&status["lease"], json!("none"))),
        ("mounted", status["mounted"].clone()),
        ("mount-ids", or(&status["mounts"], json!(0))),
        ("cache-bytes", or(&status["cache_bytes"], json!(0))),
        ("cache-limit", option("cache_size", "10G")),
        ("dirty-bytes", or(&status["pending_bytes"], json!(0))),
        ("dirty-changes", or(&status["pending_changes"], json!(0))),
        (
            "oldest-dirty-seconds",
            or(&status["oldest_pending_seconds"], json!(0)),
        ),
        ("uploaded-bytes", or(&status["uploaded_bytes"], json!(0))),
        ("upload-rate", or(&status["upload_rate"], json!(0))),
        ("last-error", or(&status["last_error"], json!("none"))),
    ]
}

/// Which options the volume took from its store's defaults (config.toml), or "none".
fn from_store_defaults(status: &Value) -> Value {
    match status["options_from_store_defaults"].as_array() {
        Some(names) if !names.is_empty() => {
            let names: Vec<String> = names.iter().map(shown).collect();
            json!(names.join(", "))
        }
        _ => json!("none"),
    }
}

/// A value as a report shows it (strings without quotes).
fn shown(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn label(flag: &str) -> String {
    format!("Volume {}", flag.replace('-', " "))
}

/// The Dokku-style block of one volume.
fn block(volume: &Value) -> String {
    let facts = facts(volume);
    let width = facts
        .iter()
        .map(|(f, _)| label(f).len() + 1)
        .max()
        .unwrap_or(0);
    let mut text = format!("=====> {} volume information\n", shown(&volume["Name"]));
    for (flag, value) in &facts {
        let key = format!("{}:", label(flag));
        text.push_str(&format!("       {key:<width$} {}\n", shown(value)));
    }
    text
}

fn as_json(volume: &Value) -> Value {
    let facts: Map<String, Value> = facts(volume)
        .into_iter()
        .map(|(flag, value)| (flag.replace('-', "_"), value))
        .collect();
    Value::Object(facts)
}

async fn volumes(socket: &std::path::Path, name: Option<&str>) -> Result<Vec<Value>, String> {
    let names: Vec<String> = match name {
        Some(name) => vec![name.to_string()],
        None => call(socket, "/VolumeDriver.List", &json!({})).await?["Volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["Name"].as_str().map(String::from))
            .collect(),
    };
    let mut described = Vec::new();
    for name in names {
        let answer = call(socket, "/VolumeDriver.Get", &json!({ "Name": name })).await?;
        described.push(answer["Volume"].clone());
    }
    Ok(described)
}

/// The report to print, or why there is none.
pub async fn report(args: &ReportArgs) -> Result<String, String> {
    let volumes = volumes(&args.socket, args.volume.as_deref()).await?;
    if let Some(flag) = &args.flag {
        let wanted = flag.strip_prefix("--volume-").unwrap_or(flag);
        let volume = volumes.first().ok_or("no such volume")?;
        let facts = facts(volume);
        let value = facts.iter().find(|(f, _)| *f == wanted).ok_or_else(|| {
            let known: Vec<String> = facts.iter().map(|(f, _)| format!("--volume-{f}")).collect();
            format!("unknown flag {flag}; the flags are {}", known.join(", "))
        })?;
        return Ok(match args.format {
            Format::Text => format!("{}\n", shown(&value.1)),
            Format::Json => format!("{}\n", value.1),
        });
    }
    Ok(match args.format {
        Format::Text => volumes.iter().map(block).collect::<Vec<_>>().join("\n"),
        Format::Json => {
            let all: Vec<Value> = volumes.iter().map(as_json).collect();
            format!("{}\n", serde_json::to_string_pretty(&all).expect("JSON"))
        }
    })
}

/// The listing to print, or why there is none.
pub async fn ls(args: &LsArgs) -> Result<String, String> {
    let volumes = volumes(&args.socket, None).await?;
    if args.format == Format::Json {
        let all: Vec<Value> = volumes.iter().map(as_json).collect();
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&all).expect("JSON")
        ));
    }
    let columns = ["name", "access", "mounted", "dirty-bytes", "store"];
    let mut rows = vec![columns.map(|c| c.replace('-', " ").to_uppercase()).to_vec()];
    for volume in &volumes {
        let facts = facts(volume);
        rows.push(
            columns
                .iter()
                .map(|c| {
                    facts
                        .iter()
                        .find(|(f, _)| f == c)
                        .map_or_else(String::new, |(_, v)| shown(v))
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let lines: Vec<String> = rows
        .iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect();
    Ok(format!("{}\n", lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Value {
        json!({
            "Name": "db",
            "Mountpoint": "/var/lib/cairn/mounts/db",
            "CreatedAt": "2026-11-23T17:00:00Z",
            "Status": {
                "store": "s3://b/vols/db/", "options": {"store": "s3", "cache_size": "1G"},
                "host": "web-1", "mounted": true, "mounts": 2, "cache_bytes": 4096,
                "pending_bytes": 12, "pending_changes": 1, "last_error": null
            }
        })
    }

    #[test]
    fn a_block_aligns_its_facts() {
        let text = block(&volume());
        assert!(text.starts_with("=====> db volume information\n"), "{text}");
        assert!(
            text.contains("\n       Volume dirty bytes:          12\n"),
            "{text}"
        );
        assert!(
            text.contains("\n       Volume access:               exclusive\n"),
            "{text}"
        );
        assert!(
            text.contains("\n       Volume last error:           none\n"),
            "{text}"
        );
        assert!(
            text.contains("\n       Volume store defaults:       none\n"),
            "{text}"
        );
    }

    #[test]
    fn json_names_facts_with_underscores() {
        let json = as_json(&volume());
        assert_eq!(json["dirty_bytes"], 12);
        assert_eq!(json["cache_limit"], "1G");
        assert_eq!(json["lease"], "none");
    }
}
