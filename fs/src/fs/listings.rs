//! Listings of small directory trees, made with one flat listing of the store.
//!
//! Reading a directory lists the store. Where everything below the directory (at every depth)
//! fits in one page (1,000 keys), one listing without a delimiter answers for the directory and
//! for each directory inside it: `ls -lR`, `find`, `du` or `rm -rf` of a source tree then cost
//! a request instead of one per directory. The pages of the inner directories are kept
//! here for the metadata TTL, with the pending changes as they stood before the listing, so that
//! a later read of one of them sees what it would have seen had it listed the store then.
//! Recording a change under a directory drops its kept page: a change made and uploaded after
//! the listing would otherwise be missing from both the page and the change log.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::attrs::Kind;
use crate::store::{ListEntry, ListPage};

/// A directory's page from a flat listing of a tree above it.
#[derive(Debug)]
pub(super) struct KeptPage {
    /// When the listing started.
    pub at: Instant,
    pub page: ListPage,
    /// The pending changes of the directory's entries when the listing started.
    pub pending: Vec<(String, Option<Kind>)>,
}

/// The kept pages, by directory prefix ("dir/"), and the directories known to hold too much
/// below them for a flat listing.
#[derive(Debug, Default)]
pub(super) struct Listings {
    pages: HashMap<String, KeptPage>,
    too_big: HashSet<String>,
    /// Counts the changes recorded: a listing during which one was recorded keeps nothing.
    generation: u64,
}

/// How many directories known to be too big are remembered (then forgotten all at once).
const TOO_BIG_REMEMBERED: usize = 10_000;

impl Listings {
    /// The kept page of directory `prefix`, if made within `ttl` (it is handed out once).
    pub fn take(&mut self, prefix: &str, ttl: Duration) -> Option<KeptPage> {
        self.pages
            .remove(prefix)
            .filter(|kept| kept.at.elapsed() < ttl)
    }

    /// Where the count of recorded changes stands (read before a listing starts).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Keeps the pages of a flat listing that started `at`, at `generation` (but that of the
    /// directory read now). `pending` holds the changes then pending below it, by key. If a
    /// change was recorded since, nothing is kept: its page might have missed it. Returns how
    /// many pages it kept.
    pub fn keep(
        &mut self,
        (at, generation): (Instant, u64),
        pages: HashMap<String, ListPage>,
        pending: &[(String, Option<Kind>)],
        ttl: Duration,
    ) -> usize {
        self.pages.retain(|_, kept| kept.at.elapsed() < ttl);
        if generation != self.generation {
            return 0;
        }
        let mut pending_by_dir: HashMap<&str, Vec<(String, Option<Kind>)>> = HashMap::new();
        for (key, kind) in pending {
            let (dir, name) = key.split_at(key.rfind('/').map_or(0, |at| at + 1));
            pending_by_dir
                .entry(dir)
                .or_default()
                .push((name.to_string(), *kind));
        }
        let kept = pages.len();
        for (prefix, page) in pages {
            let pending = pending_by_dir.remove(prefix.as_str()).unwrap_or_default();
            self.pages.insert(prefix, KeptPage { at, page, pending });
        }
        kept
    }

    /// A change of `key` is being recorded: the pages of its directory and of itself (if it is
    /// a directory) no longer tell the whole story. Called before the change is recorded (no
    /// page is handed out after) and after (no listing running meanwhile keeps its pages).
    pub fn changed(&mut self, key: &str) {
        self.generation += 1;
        if self.pages.is_empty() {
            return;
        }
        let parent = key.rfind('/').map_or("", |at| &key[..=at]);
        self.pages.remove(parent);
        self.pages.remove(&format!("{key}/"));
    }

    /// Something changes a whole tree at once (a directory renamed in the store): called before
    /// and after, as [`Listings::changed`].
    pub fn clear(&mut self) {
        self.generation += 1;
        self.pages.clear();
    }

    pub fn is_too_big(&self, prefix: &str) -> bool {
        self.too_big.contains(prefix)
    }

    pub fn mark_too_big(&mut self, prefix: &str) {
        if self.too_big.len() >= TOO_BIG_REMEMBERED {
            self.too_big.clear();
        }
        self.too_big.insert(prefix.to_string());
    }
}

/// The entries of `pending` (key, what it becomes) directly inside directory `prefix`, by name.
pub(super) fn children_of(
    prefix: &str,
    pending: &[(String, Option<Kind>)],
) -> Vec<(String, Option<Kind>)> {
    pending
        .iter()
        .filter_map(|(key, kind)| {
            let name = key.strip_prefix(prefix)?;
            (!name.is_empty() && !name.contains('/')).then(|| (name.to_string(), *kind))
        })
        .collect()
}

/// Splits a flat listing of everything below `prefix` into the page a delimited listing of each
/// directory in it would give: its objects, and its subdirectories as common prefixes.
pub(super) fn split_flat(prefix: &str, objects: Vec<ListEntry>) -> HashMap<String, ListPage> {
    let mut dirs: HashMap<String, (Vec<ListEntry>, BTreeSet<String>)> = HashMap::new();
    dirs.entry(prefix.to_string()).or_default();
    for object in objects {
        let Some(below) = object.key.strip_prefix(prefix) else {
            continue;
        };
        // Every directory between `prefix` and the object holds the next one as a prefix.
        let mut dir_end = prefix.len();
        for (at, _) in below.match_indices('/') {
            let inner_end = prefix.len() + at + 1;
            let (dir, inner) = (&object.key[..dir_end], &object.key[..inner_end]);
            dirs.entry(dir.to_string())
                .or_default()
                .1
                .insert(inner.to_string());
            dirs.entry(inner.to_string()).or_default();
            dir_end = inner_end;
        }
        let dir = object.key[..dir_end].to_string();
        dirs.entry(dir).or_default().0.push(object);
    }
    dirs.into_iter()
        .map(|(dir, (objects, prefixes))| {
            let page = ListPage {
                objects,
                prefixes: prefixes.into_iter().collect(),
                next: None,
            };
            (dir, page)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ETag;
    use std::time::SystemTime;

    fn object(key: &str) -> ListEntry {
        ListEntry {
            key: key.into(),
            size: 1,
            etag: ETag("e".into()),
            last_modified: SystemTime::UNIX_EPOCH,
        }
    }

    fn keys(page: &ListPage) -> Vec<&str> {
        page.objects.iter().map(|o| o.key.as_str()).collect()
    }

    /// Each directory's page is what a delimited listing of it gives: its own objects (a
    /// directory's marker among its own), its subdirectories once each, in key order.
    #[test]
    fn a_flat_listing_splits_into_each_directorys_page() {
        let flat = [
            "v/d/a.txt",
            "v/d/b/",
            "v/d/b/c.txt",
            "v/d/b/e/f",
            "v/d/b/e/g",
            "v/d/b-x",
            "v/d/h/i/j",
            "v/d/p.rs",
            "v/d/p/",
            "v/d/p/q.rs",
        ];
        let pages = split_flat("v/d/", flat.iter().map(|k| object(k)).collect());
        let mut dirs: Vec<&str> = pages.keys().map(String::as_str).collect();
        dirs.sort();
        let all = ["v/d/", "v/d/b/", "v/d/b/e/", "v/d/h/", "v/d/h/i/", "v/d/p/"];
        assert_eq!(dirs, all);
        assert_eq!(keys(&pages["v/d/"]), ["v/d/a.txt", "v/d/b-x", "v/d/p.rs"]);
        assert_eq!(pages["v/d/"].prefixes, ["v/d/b/", "v/d/h/", "v/d/p/"]);
        assert_eq!(keys(&pages["v/d/b/"]), ["v/d/b/", "v/d/b/c.txt"]);
        assert_eq!(pages["v/d/b/"].prefixes, ["v/d/b/e/"]);
        assert_eq!(keys(&pages["v/d/b/e/"]), ["v/d/b/e/f", "v/d/b/e/g"]);
        assert!(pages["v/d/h/"].objects.is_empty());
        assert_eq!(pages["v/d/h/"].prefixes, ["v/d/h/i/"]);
        assert_eq!(keys(&pages["v/d/h/i/"]), ["v/d/h/i/j"]);
    }

    /// A kept page is handed out once, within the TTL, and not after a change was recorded in
    /// its directory (or to the directory itself).
    #[test]
    fn kept_pages_go_when_stale_taken_or_changed() {
        let ttl = Duration::from_secs(60);
        let flat = ["v/a/f", "v/b/f", "v/c/f", "v/d/f"];
        let pending = vec![("v/a/new".to_string(), Some(Kind::File))];
        let mut listings = Listings::default();
        let mut pages = split_flat("v/", flat.iter().map(|k| object(k)).collect());
        pages.remove("v/");
        let at = (Instant::now(), listings.generation());
        listings.keep(at, pages, &pending, ttl);
        let a = listings.take("v/a/", ttl).expect("kept");
        assert_eq!(keys(&a.page), ["v/a/f"]);
        assert_eq!(a.pending, [("new".to_string(), Some(Kind::File))]);
        assert!(listings.take("v/a/", ttl).is_none(), "handed out once");
        listings.changed("v/b/g");
        assert!(listings.take("v/b/", ttl).is_none());
        listings.changed("v/c");
        assert!(listings.take("v/c/", ttl).is_none());
        assert!(listings.take("v/d/", Duration::ZERO).is_none(), "stale");

        // A change recorded while a listing ran: its pages are not kept.
        let at = (Instant::now(), listings.generation());
        listings.changed("v/elsewhere");
        let pages = split_flat("v/", flat.iter().map(|k| object(k)).collect());
        listings.keep(at, pages, &pending, ttl);
        assert!(listings.take("v/d/", ttl).is_none(), "kept across a change");
    }
}
