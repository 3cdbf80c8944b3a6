//! Table keys: a name as lowercase wire-format labels (length byte, then the label), without
//! the root. The form is unambiguous (a label holding a dot cannot pose as two labels), cheap
//! to build from a service's namespace and name, and cheap to hash; a query's key is built in
//! a stack buffer, so a lookup allocates nothing. The key of a name's parent is a tail of the
//! name's key, so walking up a name costs no copies either.

use hickory_proto::rr::Name;

/// Longest wire-format name (RFC 1035), which bounds every key.
pub const MAX_KEY_LEN: usize = 255;

/// A key being built on the stack.
#[derive(Clone)]
pub struct KeyBuf {
    len: usize,
    buf: [u8; MAX_KEY_LEN],
}

impl Default for KeyBuf {
    fn default() -> Self {
        Self {
            len: 0,
            buf: [0; MAX_KEY_LEN],
        }
    }
}

impl KeyBuf {
    /// The key of a whole name; `None` only for names longer than DNS allows.
    pub fn from_name(name: &Name) -> Option<Self> {
        Self::from_labels(name.iter())
    }

    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Option<Self> {
        let mut key = Self::default();
        for label in labels {
            key.push_label(label)?;
        }
        Some(key)
    }

    /// Appends one label, lowercased.
    pub fn push_label(&mut self, label: &[u8]) -> Option<()> {
        let len = u8::try_from(label.len()).ok().filter(|&l| l > 0 && l <= 63)?;
        let end = self.len + 1 + label.len();
        if end > MAX_KEY_LEN {
            return None;
        }
        self.buf[self.len] = len;
        for (dst, src) in self.buf[self.len + 1..end].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        self.len = end;
        Some(())
    }

    /// Appends a key that is already lowercase wire format (e.g. a zone's key).
    pub fn push_key(&mut self, key: &[u8]) -> Option<()> {
        let end = self.len + key.len();
        if end > MAX_KEY_LEN {
            return None;
        }
        self.buf[self.len..end].copy_from_slice(key);
        self.len = end;
        Some(())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn to_boxed(&self) -> Box<[u8]> {
        self.as_bytes().into()
    }
}

/// The keys of `key`'s proper ancestors, nearest first (each a tail of `key`).
pub fn ancestors(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = key;
    std::iter::from_fn(move || {
        let len = usize::from(*rest.first()?);
        rest = rest.get(1 + len..)?;
        (!rest.is_empty()).then_some(rest)
    })
}

/// Turns a key back into a lowercase FQDN (for answers that name a table entry).
pub fn to_name(key: &[u8]) -> Option<Name> {
    let mut labels = Vec::new();
    let mut rest = key;
    while let Some(&len) = rest.first() {
        let label = rest.get(1..1 + usize::from(len))?;
        labels.push(label);
        rest = &rest[1 + usize::from(len)..];
    }
    Name::from_labels(labels).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_case_free_unambiguous_and_walk_up() {
        let a = KeyBuf::from_name(&Name::from_ascii("Web.NS.svc.cluster.local.").unwrap()).unwrap();
        let b = KeyBuf::from_labels([&b"web"[..], b"ns", b"svc", b"cluster", b"local"]).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        let dotted = KeyBuf::from_labels([&b"web.ns"[..], b"svc", b"cluster", b"local"]).unwrap();
        assert_ne!(dotted.as_bytes(), a.as_bytes(), "a label with a dot is not two labels");
        let up: Vec<String> = ancestors(a.as_bytes())
            .map(|k| to_name(k).unwrap().to_string())
            .collect();
        assert_eq!(
            up,
            [
                "ns.svc.cluster.local.",
                "svc.cluster.local.",
                "cluster.local.",
                "local."
            ]
        );
        assert_eq!(to_name(a.as_bytes()).unwrap().to_string(), "web.ns.svc.cluster.local.");
        assert!(
            KeyBuf::from_labels([&[b'a'; 64][..]]).is_none(),
            "labels are at most 63 bytes"
        );
        assert!(ancestors(&[5, b'a']).next().is_none(), "a truncated key ends the walk");
    }
}
