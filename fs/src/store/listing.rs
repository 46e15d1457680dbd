//! Listing logic shared by the backends that list themselves (memory, dir): rolling keys up into
//! common prefixes, and cutting a sorted listing into pages whose token is the last name returned.

use super::{ListEntry, ListOptions, ListPage, MAX_LIST_PAGE};

/// One item of a listing in key order: an object, or a common prefix that stands for many.
#[derive(Debug, Clone)]
pub(crate) enum Listed {
    Object(ListEntry),
    Prefix(String),
}

impl Listed {
    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Object(entry) => &entry.key,
            Self::Prefix(prefix) => prefix,
        }
    }
}

/// The common prefix `key` rolls up into when listing `prefix` with a delimiter, if any.
pub(crate) fn common_prefix<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let rest = &key[prefix.len()..];
    rest.find('/').map(|at| &key[..prefix.len() + at + 1])
}

/// Rolls sorted objects under `prefix` into the items of a listing (prefixes when delimited).
pub(crate) fn roll_up(
    prefix: &str,
    delimited: bool,
    sorted: impl IntoIterator<Item = ListEntry>,
) -> Vec<Listed> {
    let mut items: Vec<Listed> = Vec::new();
    for entry in sorted {
        let rolled = if delimited {
            common_prefix(prefix, &entry.key)
        } else {
            None
        };
        match rolled {
            Some(group) => {
                let repeated = matches!(items.last(), Some(Listed::Prefix(last)) if last == group);
                if !repeated {
                    items.push(Listed::Prefix(group.to_string()));
                }
            }
            None => items.push(Listed::Object(entry)),
        }
    }
    items
}

/// Whether the item named `name` comes after the page token `after` (so belongs on a later page).
pub(crate) fn after_token(name: &str, after: Option<&str>) -> bool {
    after.is_none_or(|token| name > token)
}

/// Cuts one page out of `items` (sorted, names unique) following `options.continuation`.
pub(crate) fn paginate(items: impl IntoIterator<Item = Listed>, options: &ListOptions) -> ListPage {
    let max = options
        .max_keys
        .unwrap_or(MAX_LIST_PAGE)
        .clamp(1, MAX_LIST_PAGE);
    let token = options.continuation.as_deref();
    let mut page = ListPage::default();
    let mut last_name = None;
    let wanted = items.into_iter().filter(|i| after_token(i.name(), token));
    for (taken, item) in wanted.enumerate() {
        if taken == max {
            page.next = last_name;
            return page;
        }
        last_name = Some(item.name().to_string());
        match item {
            Listed::Object(entry) => page.objects.push(entry),
            Listed::Prefix(prefix) => page.prefixes.push(prefix),
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ETag;
    use std::time::SystemTime;

    fn entry(key: &str) -> ListEntry {
        ListEntry {
            key: key.into(),
            size: 0,
            etag: ETag(String::new()),
            last_modified: SystemTime::UNIX_EPOCH,
        }
    }

    fn names(items: &[Listed]) -> Vec<&str> {
        items.iter().map(Listed::name).collect()
    }

    #[test]
    fn delimited_listing_rolls_up_directories() {
        let keys = ["d/a", "d/a.txt", "d/b/1", "d/b/2", "d/c/", "d/e"];
        let items = roll_up("d/", true, keys.iter().map(|k| entry(k)));
        assert_eq!(names(&items), ["d/a", "d/a.txt", "d/b/", "d/c/", "d/e"]);
    }

    #[test]
    fn pages_follow_the_token() {
        let keys = ["a", "b/1", "b/2", "c"];
        let items = roll_up("", true, keys.iter().map(|k| entry(k)));
        let mut options = ListOptions {
            delimited: true,
            continuation: None,
            max_keys: Some(2),
        };
        let first = paginate(items.clone(), &options);
        assert_eq!(first.objects.len(), 1);
        assert_eq!(first.prefixes, ["b/"]);
        assert_eq!(first.next.as_deref(), Some("b/"));
        options.continuation = first.next;
        let second = paginate(items, &options);
        assert_eq!(second.objects[0].key, "c");
        assert_eq!(second.next, None);
    }
}
