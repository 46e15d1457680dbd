//! The inode table: which names the mount has seen, where they sit in the tree, and what is
//! known of each (attributes, the store's version, when it was last checked).
//!
//! A plain data structure under one lock, with no I/O: the filesystem logic fills it from the
//! store and consults it. It is generic over the open state `F` of a file's contents, which it
//! only holds: it depends on nothing above it. An inode's key in the store is derived from its parent chain, so a
//! directory rename moves a whole subtree by changing one entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::attrs::{Attrs, Kind, S_IFDIR};
use crate::store::ETag;

pub const ROOT: u64 = 1;

/// What the store holds for an inode, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub etag: ETag,
    pub size: u64,
}

#[derive(Debug)]
pub struct Inode<F> {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub attrs: Attrs,
    pub ctime: SystemTime,
    /// Size for files and symlinks (the file's open state, if any, is authoritative).
    pub size: u64,
    /// The object (file, symlink) or marker (directory) in the store; None if there is none.
    pub remote: Option<Remote>,
    /// When the store was last asked about this inode.
    pub checked: Instant,
    /// Kernel lookups not yet forgotten.
    pub lookups: u64,
    /// A symlink's target, once read.
    pub target: Option<String>,
    /// The open state of a file's contents, while it is open or changed.
    pub file: Option<Arc<F>>,
    /// A directory whose children this mount has listed in full (at least once).
    pub listed: bool,
    /// When it last did (or made the directory itself).
    pub listed_at: Option<Instant>,
    /// How many names that listing held.
    pub listed_names: usize,
    /// The names, and kinds, the listing at `listed_at` held, when it installed only the name
    /// it was made for (a relist on a miss); none when every name listed is a child here.
    pub listed_kinds: Option<Arc<HashMap<String, Kind>>>,
}

impl<F> Inode<F> {
    pub fn kind(&self) -> Kind {
        self.attrs.kind()
    }

    /// A directory's listing made `at` held these `names`, of which only the one it was made
    /// for (if any) became a child here: the rest answer lookups for the TTL.
    pub fn keep_listing(&mut self, names: Arc<HashMap<String, Kind>>, at: Instant) {
        self.listed_at = Some(at);
        self.listed_names = names.len();
        self.listed_kinds = Some(names);
    }
}

#[derive(Debug)]
pub struct Namespace<F> {
    inodes: HashMap<u64, Inode<F>>,
    children: HashMap<u64, BTreeMap<String, u64>>,
    /// Names known to be absent, and since when.
    absent: HashMap<(u64, String), Instant>,
    next_ino: u64,
}

impl<F> Namespace<F> {
    pub fn new(root_attrs: Attrs) -> Self {
        let root = Inode {
            ino: ROOT,
            parent: ROOT,
            name: String::new(),
            attrs: Attrs {
                mode: S_IFDIR | (root_attrs.mode & 0o7777),
                ..root_attrs
            },
            ctime: SystemTime::now(),
            size: 0,
            remote: None,
            checked: Instant::now(),
            lookups: 1,
            target: None,
            file: None,
            listed: false,
            listed_at: None,
            listed_names: 0,
            listed_kinds: None,
        };
        Self {
            inodes: HashMap::from([(ROOT, root)]),
            children: HashMap::from([(ROOT, BTreeMap::new())]),
            absent: HashMap::new(),
            next_ino: ROOT + 1,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode<F>> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode<F>> {
        self.inodes.get_mut(&ino)
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&parent)?.get(name).copied()
    }

    pub fn children(&self, parent: u64) -> impl Iterator<Item = (&String, u64)> {
        self.children
            .get(&parent)
            .into_iter()
            .flat_map(|c| c.iter().map(|(n, i)| (n, *i)))
    }

    /// The store key of an inode: its path inside the volume ("" for the root).
    pub fn key(&self, ino: u64) -> Option<String> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let inode = self.inodes.get(&at)?;
            parts.push(inode.name.as_str());
            at = inode.parent;
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// The prefix under which a directory's children live ("" for the root, else "path/").
    pub fn dir_prefix(&self, ino: u64) -> Option<String> {
        let key = self.key(ino)?;
        Some(if key.is_empty() {
            key
        } else {
            format!("{key}/")
        })
    }

    /// The inode at `key` ("a/b"), if the mount knows every name on the way.
    pub fn find(&self, key: &str) -> Option<u64> {
        key.split('/')
            .filter(|part| !part.is_empty())
            .try_fold(ROOT, |at, part| self.child(at, part))
    }

    pub fn mark_absent(&mut self, parent: u64, name: &str) {
        self.absent
            .insert((parent, name.to_string()), Instant::now());
    }

    /// Whether `name` was found absent within `ttl`.
    pub fn known_absent(&self, parent: u64, name: &str, ttl: std::time::Duration) -> bool {
        self.absent
            .get(&(parent, name.to_string()))
            .is_some_and(|at| at.elapsed() < ttl)
    }

    /// Adds an inode under `parent`, or updates the one already there (keeping its number
    /// when its kind is unchanged). Returns the inode number.
    pub fn upsert(
        &mut self,
        parent: u64,
        name: &str,
        attrs: Attrs,
        size: u64,
        remote: Option<Remote>,
    ) -> u64 {
        self.absent.remove(&(parent, name.to_string()));
        if let Some(ino) = self.child(parent, name) {
            let inode = self
                .inodes
                .get_mut(&ino)
                .expect("children name live inodes");
            if inode.kind() == attrs.kind() {
                inode.attrs = attrs;
                inode.size = size;
                inode.remote = remote;
                inode.checked = Instant::now();
                return ino;
            }
            self.detach(ino);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let inode = Inode {
            ino,
            parent,
            name: name.to_string(),
            attrs,
            ctime: SystemTime::now(),
            size,
            remote,
            checked: Instant::now(),
            lookups: 0,
            target: None,
            file: None,
            listed: false,
            listed_at: None,
            listed_names: 0,
            listed_kinds: None,
        };
        if attrs.kind() == Kind::Dir {
            self.children.insert(ino, BTreeMap::new());
        }
        self.inodes.insert(ino, inode);
        self.children
            .entry(parent)
            .or_default()
            .insert(name.to_string(), ino);
        ino
    }

    /// Takes an inode (and its subtree) out of the tree. Inode numbers the kernel still holds
    /// stay valid until forgotten; they no longer have a name.
    pub fn detach(&mut self, ino: u64) {
        let Some(inode) = self.inodes.get(&ino) else {
            return;
        };
        let (parent, name) = (inode.parent, inode.name.clone());
        if let Some(siblings) = self.children.get_mut(&parent)
            && siblings.get(&name) == Some(&ino)
        {
            siblings.remove(&name);
        }
        let mut stack = vec![ino];
        while let Some(at) = stack.pop() {
            if let Some(kids) = self.children.remove(&at) {
                stack.extend(kids.values().copied());
            }
            if let Some(node) = self.inodes.get_mut(&at) {
                node.parent = 0;
            }
        }
        self.absent.insert((parent, name), Instant::now());
    }

    /// Whether an inode still has a place in the tree.
    pub fn attached(&self, ino: u64) -> bool {
        let mut at = ino;
        while at != ROOT {
            match self.inodes.get(&at) {
                Some(inode) if inode.parent != 0 => at = inode.parent,
                _ => return false,
            }
        }
        true
    }

    /// Moves `ino` to `new_parent` under `new_name`, detaching whatever was there.
    pub fn move_to(&mut self, ino: u64, new_parent: u64, new_name: &str) {
        if let Some(existing) = self.child(new_parent, new_name)
            && existing != ino
        {
            self.detach(existing);
        }
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        let (old_parent, old_name) = (inode.parent, std::mem::take(&mut inode.name));
        inode.parent = new_parent;
        inode.name = new_name.to_string();
        inode.ctime = SystemTime::now();
        if let Some(siblings) = self.children.get_mut(&old_parent) {
            siblings.remove(&old_name);
        }
        self.children
            .entry(new_parent)
            .or_default()
            .insert(new_name.to_string(), ino);
        self.absent.remove(&(new_parent, new_name.to_string()));
        self.absent.insert((old_parent, old_name), Instant::now());
    }

    /// The kernel forgot `count` lookups of `ino`; a detached inode nobody holds is dropped.
    pub fn forget(&mut self, ino: u64, count: u64) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(count);
        if inode.lookups == 0 && inode.parent == 0 && inode.file.is_none() && ino != ROOT {
            self.inodes.remove(&ino);
        }
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::S_IFREG;
    use std::time::UNIX_EPOCH;

    fn attrs(mode: u32) -> Attrs {
        Attrs {
            mode,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            atime: None,
            rdev: 0,
        }
    }

    #[test]
    fn keys_follow_the_tree_through_moves() {
        let mut ns = Namespace::<()>::new(attrs(S_IFDIR | 0o755));
        let a = ns.upsert(ROOT, "a", attrs(S_IFDIR | 0o755), 0, None);
        let f = ns.upsert(a, "f.txt", attrs(S_IFREG | 0o644), 3, None);
        assert_eq!(ns.key(f).unwrap(), "a/f.txt");
        assert_eq!(ns.dir_prefix(a).unwrap(), "a/");
        assert_eq!(ns.dir_prefix(ROOT).unwrap(), "");
        ns.move_to(a, ROOT, "b");
        assert_eq!(ns.key(f).unwrap(), "b/f.txt");
        assert_eq!(ns.child(ROOT, "a"), None);
        assert!(ns.known_absent(ROOT, "a", std::time::Duration::from_secs(5)));
        ns.detach(a);
        assert!(!ns.attached(f));
    }

    #[test]
    fn a_new_kind_under_a_name_gets_a_new_inode() {
        let mut ns = Namespace::<()>::new(attrs(S_IFDIR | 0o755));
        let f = ns.upsert(ROOT, "x", attrs(S_IFREG | 0o644), 0, None);
        assert_eq!(ns.upsert(ROOT, "x", attrs(S_IFREG | 0o600), 5, None), f);
        let d = ns.upsert(ROOT, "x", attrs(S_IFDIR | 0o755), 0, None);
        assert_ne!(d, f);
        assert!(!ns.attached(f));
    }
}
