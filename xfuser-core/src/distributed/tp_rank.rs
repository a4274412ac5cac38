//! A rank's position in its tensor-parallel group, which is all a model needs to load its
//! shard (the group itself is passed to the forwards that communicate).

use super::ProcessGroup;
use crate::{Error, Result};

/// Which shard of a tensor-parallel layer (or model) a rank holds: its position `index` in a
/// group of `size` members. Loading needs only this; the group itself is passed to the
/// forwards, so a model loaded once per tp position can be shared by the ranks of the other
/// axes. The default is the whole layer on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    pub index: usize,
    pub size: usize,
}

impl Default for TpRank {
    fn default() -> Self {
        Self::serial()
    }
}

impl TpRank {
    /// Shard `index` of `size`; refuses an index out of range or a size of 0.
    pub fn new(index: usize, size: usize) -> Result<Self> {
        if index >= size {
            return Err(Error::invalid(format!(
                "tensor-parallel shard {index} of {size}: the index must be below the degree"
            )));
        }
        Ok(Self { index, size })
    }

    /// The whole layer on one rank.
    pub fn serial() -> Self {
        Self { index: 0, size: 1 }
    }

    /// Whether this is the whole layer (a degree of 1).
    pub fn is_serial(&self) -> bool {
        self.size == 1
    }

    /// This rank's shard in `group`.
    pub fn of(group: &ProcessGroup) -> Self {
        Self {
            index: group.index(),
            size: group.size(),
        }
    }

    /// Checks that `group` (None: no tp group) is the one this shard was cut for: a serial
    /// shard needs none (a group of 1 is accepted too), a shard of T > 1 needs a group of T
    /// members with this rank at `index`. `what` names the model for the error.
    pub fn check_group(&self, group: Option<&ProcessGroup>, what: &str) -> Result<()> {
        match group {
            None if self.size == 1 => Ok(()),
            None => Err(Error::invalid(format!(
                "{what} was loaded as tensor-parallel shard {} of {}, but the forward has no \
                 tensor-parallel group (ForwardContext::tp); run it on the ranks of \
                 --tensor-parallel-degree {}",
                self.index, self.size, self.size
            ))),
            Some(g) if g.size() == self.size && g.index() == self.index => Ok(()),
            Some(g) => Err(Error::invalid(format!(
                "{what} holds tensor-parallel shard {} of {} but runs on member {} of group {} \
                 ({} members); run it on the tensor-parallel group it was loaded for",
                self.index,
                self.size,
                g.index(),
                g.name(),
                g.size()
            ))),
        }
    }
}

impl From<&ProcessGroup> for TpRank {
    fn from(group: &ProcessGroup) -> Self {
        Self::of(group)
    }
}
