//! Host leases: a host belongs to at most one open run at a time (SPEC §3, rule
//! `R012-one-open-run-per-host`). A run takes the leases of all its target hosts at admission,
//! all or none, and gives them back when it closes (or escalates: an escalated run waits for a
//! person and holds nothing until it is continued, when it takes them again). A restart closes
//! every open run, so no lease outlives the process that granted it.

use std::collections::BTreeMap;

use uuid::Uuid;

/// Who holds which host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    held: BTreeMap<String, Uuid>,
}

/// A host another open run holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {host} belongs to open run {holder}; wait for it to close, or cancel it")]
pub struct HostBusy {
    /// The host.
    pub host: String,
    /// The run that holds it.
    pub holder: Uuid,
}

impl Leases {
    /// No leases.
    pub fn new() -> Self {
        Leases::default()
    }

    /// Gives `run` every host of `hosts`, or none of them: the first host held by another run
    /// (in name order) is the refusal. Hosts `run` already holds are fine.
    pub fn acquire<'a>(
        &mut self,
        run: Uuid,
        hosts: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<(), HostBusy> {
        let mut sorted: Vec<&str> = hosts.clone().into_iter().collect();
        sorted.sort_unstable();
        if let Some((host, holder)) = sorted
            .iter()
            .find_map(|h| self.held.get(*h).filter(|r| **r != run).map(|r| (*h, *r)))
        {
            return Err(HostBusy {
                host: host.to_owned(),
                holder,
            });
        }
        for h in sorted {
            self.held.insert(h.to_owned(), run);
        }
        Ok(())
    }

    /// Gives back every host `run` holds.
    pub fn release(&mut self, run: Uuid) {
        self.held.retain(|_, r| *r != run);
    }

    /// The run holding `host`, if any.
    pub fn holder(&self, host: &str) -> Option<Uuid> {
        self.held.get(host).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_none_and_released_on_close() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut l = Leases::new();
        l.acquire(a, ["web1", "web2"]).unwrap();
        // b wants web2 and db1: refused naming web2 and a, and db1 stays free.
        assert_eq!(
            l.acquire(b, ["db1", "web2"]),
            Err(HostBusy {
                host: "web2".into(),
                holder: a
            })
        );
        assert_eq!(l.holder("db1"), None);
        // a may take what it holds again (a continuation).
        l.acquire(a, ["web2"]).unwrap();
        l.release(a);
        l.acquire(b, ["db1", "web2"]).unwrap();
        assert_eq!(l.holder("web2"), Some(b));
        assert_eq!(l.holder("web1"), None);
    }
}
