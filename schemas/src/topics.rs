//! Topic and consumer-group names, defined once. Every name is the
//! configurable prefix followed by a fixed base name.

/// The ledger's topics. Each is created explicitly with its partition count
/// (`ledger topics create`); nothing relies on broker auto-creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Accepted intents: one header event, then recipient batches; key = intent id.
    Intents,
    /// Rendered messages; key = message id.
    Rendered,
    /// Delivery outcomes and provider feedback; key = message id.
    Outcomes,
    /// Deferred deliveries waiting for their retry time; key = message id.
    Retries,
    /// Records that could not be processed, with the reason.
    DeadLetter,
    /// Published template versions; compacted; key = tenant/name/version.
    Templates,
}

impl Topic {
    pub const ALL: [Topic; 6] =
        [Topic::Intents, Topic::Rendered, Topic::Outcomes, Topic::Retries, Topic::DeadLetter, Topic::Templates];

    pub fn base_name(self) -> &'static str {
        match self {
            Topic::Intents => "intents",
            Topic::Rendered => "rendered",
            Topic::Outcomes => "outcomes",
            Topic::Retries => "retries",
            Topic::DeadLetter => "deadletter",
            Topic::Templates => "templates",
        }
    }

    /// Partitions bound the consumers that can work in parallel. Messages fan
    /// out from intents, so the message-keyed topics get more.
    pub fn partitions(self) -> i32 {
        match self {
            Topic::Intents => 4,
            Topic::Rendered => 8,
            Topic::Outcomes => 8,
            Topic::Retries => 4,
            Topic::DeadLetter => 2,
            Topic::Templates => 1,
        }
    }

    pub fn name(self, prefix: &str) -> String {
        format!("{prefix}{}", self.base_name())
    }

    /// Whether the broker keeps only the latest record per key.
    pub fn compacted(self) -> bool {
        matches!(self, Topic::Templates)
    }

    pub fn from_name(prefix: &str, name: &str) -> Option<Topic> {
        let base = name.strip_prefix(prefix)?;
        Topic::ALL.into_iter().find(|t| t.base_name() == base)
    }
}

/// Consumer groups, one per role. Instances of a role share its group, so
/// adding instances spreads partitions between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerGroup {
    Renderer,
    Dispatcher,
    /// The dispatcher's consumer of the retries topic.
    DispatcherRetries,
    Projector,
}

impl ConsumerGroup {
    pub fn base_name(self) -> &'static str {
        match self {
            ConsumerGroup::Renderer => "renderer",
            ConsumerGroup::Dispatcher => "dispatcher",
            ConsumerGroup::DispatcherRetries => "dispatcher-retries",
            ConsumerGroup::Projector => "projector",
        }
    }

    pub fn name(self, prefix: &str) -> String {
        format!("{prefix}{}", self.base_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_round_trip_through_the_prefix() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_name("ledger.", &t.name("ledger.")), Some(t));
        }
        assert_eq!(Topic::from_name("ledger.", "other.intents"), None);
    }
}
