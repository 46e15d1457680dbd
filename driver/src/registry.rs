//! The local registry (SQLite, `registry.db` in the state directory): the volumes this daemon
//! knows (a cache of the store's records), which mount IDs use each, and the mount process that
//! serves each mounted volume, so that a restarted daemon re-adopts live mounts.
//!
//! Calls are short and synchronous; async callers run them with `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::records::VolumeRecord;
use crate::supervisor::MountProcess;

#[derive(Debug, Clone)]
pub struct Registry {
    db: Arc<Mutex<Connection>>,
}

type Result<T> = std::result::Result<T, rusqlite::Error>;

impl Registry {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS volumes (
                 name TEXT PRIMARY KEY,
                 record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS mounts (
                 volume TEXT NOT NULL,
                 id TEXT NOT NULL,
                 PRIMARY KEY (volume, id)
             );
             CREATE TABLE IF NOT EXISTS processes (
                 volume TEXT PRIMARY KEY,
                 pid INTEGER NOT NULL,
                 started INTEGER NOT NULL,
                 mountpoint TEXT NOT NULL
             );",
        )?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put_volume(&self, record: &VolumeRecord) -> Result<()> {
        let json = serde_json::to_string(record).expect("a record serializes");
        self.db().execute(
            "INSERT OR REPLACE INTO volumes (name, record) VALUES (?1, ?2)",
            params![record.name, json],
        )?;
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>> {
        let json: Option<String> = self
            .db()
            .query_row(
                "SELECT record FROM volumes WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let db = self.db();
        let mut query = db.prepare("SELECT record FROM volumes ORDER BY name")?;
        let rows = query.query_map([], |row| row.get::<_, String>(0))?;
        Ok(rows
            .filter_map(|json| serde_json::from_str(&json.ok()?).ok())
            .collect())
    }

    /// Forgets a volume, its mount IDs and its process.
    pub fn forget_volume(&self, name: &str) -> Result<()> {
        let db = self.db();
        db.execute("DELETE FROM volumes WHERE name = ?1", [name])?;
        db.execute("DELETE FROM mounts WHERE volume = ?1", [name])?;
        db.execute("DELETE FROM processes WHERE volume = ?1", [name])?;
        Ok(())
    }

    /// Records that `id` uses the volume; returns how many IDs do now.
    pub fn add_mount(&self, volume: &str, id: &str) -> Result<usize> {
        let db = self.db();
        db.execute(
            "INSERT OR IGNORE INTO mounts (volume, id) VALUES (?1, ?2)",
            params![volume, id],
        )?;
        count_mounts(&db, volume)
    }

    /// Records that `id` no longer uses the volume; returns how many IDs still do.
    pub fn remove_mount(&self, volume: &str, id: &str) -> Result<usize> {
        let db = self.db();
        db.execute(
            "DELETE FROM mounts WHERE volume = ?1 AND id = ?2",
            params![volume, id],
        )?;
        count_mounts(&db, volume)
    }

    pub fn mount_count(&self, volume: &str) -> Result<usize> {
        count_mounts(&self.db(), volume)
    }

    pub fn set_process(&self, volume: &str, process: &MountProcess) -> Result<()> {
        self.db().execute(
            "INSERT OR REPLACE INTO processes (volume, pid, started, mountpoint)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                volume,
                process.pid,
                process.started,
                process.mountpoint.to_string_lossy()
            ],
        )?;
        Ok(())
    }

    pub fn process(&self, volume: &str) -> Result<Option<MountProcess>> {
        self.db()
            .query_row(
                "SELECT pid, started, mountpoint FROM processes WHERE volume = ?1",
                [volume],
                |row| {
                    Ok(MountProcess {
                        pid: row.get(0)?,
                        started: row.get(1)?,
                        mountpoint: PathBuf::from(row.get::<_, String>(2)?),
                    })
                },
            )
            .optional()
    }

    pub fn clear_process(&self, volume: &str) -> Result<()> {
        self.db()
            .execute("DELETE FROM processes WHERE volume = ?1", [volume])?;
        Ok(())
    }
}

fn count_mounts(db: &Connection, volume: &str) -> Result<usize> {
    db.query_row(
        "SELECT COUNT(*) FROM mounts WHERE volume = ?1",
        [volume],
        |row| row.get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_ids_count_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("registry.db")).unwrap();
        assert_eq!(registry.add_mount("db", "a").unwrap(), 1);
        assert_eq!(registry.add_mount("db", "a").unwrap(), 1);
        assert_eq!(registry.add_mount("db", "b").unwrap(), 2);
        assert_eq!(registry.add_mount("web", "a").unwrap(), 1);
        assert_eq!(registry.remove_mount("db", "a").unwrap(), 1);
        assert_eq!(registry.remove_mount("db", "a").unwrap(), 1);
        assert_eq!(registry.remove_mount("db", "b").unwrap(), 0);
    }

    #[test]
    fn processes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let process = MountProcess {
            pid: 42,
            started: 1234,
            mountpoint: "/var/lib/cairn/mounts/db".into(),
        };
        Registry::open(&path)
            .unwrap()
            .set_process("db", &process)
            .unwrap();
        let again = Registry::open(&path).unwrap();
        assert_eq!(again.process("db").unwrap(), Some(process));
        again.clear_process("db").unwrap();
        assert_eq!(again.process("db").unwrap(), None);
    }
}
