//! In-process broker: one node, no network. Publishing is delivering to the local hub.

use std::sync::Arc;

use super::Broker;
use crate::hub::Hub;
use crate::model::Message;

/// Delivers published messages to this process's hub.
#[derive(Debug)]
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    /// A broker feeding `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, message: Arc<Message>) {
        self.hub.deliver(message);
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn topology(&self) -> crate::node::Topology {
        crate::node::Topology::Single
    }
}
