//! kvd-faults as a library: the faults it injects, listed once, and the
//! cluster it injects them into, for the binary and for its tests.

pub mod cluster;

use std::fmt;
use std::str::FromStr;

/// Declares the fault list: each variant with the name it has on the
/// command line and in reports.
macro_rules! faults {
    ($($variant:ident = $name:literal: $doc:literal,)*) => {
        /// A fault the harness injects.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Fault {
            $(#[doc = $doc] $variant,)*
        }

        impl Fault {
            /// Every fault, in the order of the list.
            pub const ALL: &'static [Fault] = &[$(Fault::$variant,)*];

            /// Its name on the command line and in reports.
            pub fn name(self) -> &'static str {
                match self {
                    $(Fault::$variant => $name,)*
                }
            }
        }
    };
}

faults! {
    KillLeader = "kill-leader": "SIGKILL the leader, restart it a moment later.",
    KillMember = "kill-member": "SIGKILL any member, restart it a moment later.",
    RestartAll = "restart-all": "SIGKILL every member, then start them all again.",
    PauseLeader = "pause-leader": "SIGSTOP the leader for several election timeouts.",
    PauseFollower = "pause-follower": "SIGSTOP a follower for several election timeouts.",
    PartitionLeader = "partition-leader": "Cut the leader off from both others, then heal.",
    PartitionMember = "partition-member": "Cut a follower off from both others, then heal.",
    OneWay = "one-way": "The leader's connections to the followers fail; theirs to it work.",
    CorruptLog = "corrupt-log": "Flip a byte in a stopped follower's log; it must refuse to start.",
    TruncateLog = "truncate-log": "Cut a stopped follower's log; it must start and catch up, or refuse clearly.",
    DiskFull = "disk-full": "Fill member 2's data disk (a 512 MiB tmpfs; needs root) to 16 MiB free: it raises NOSPACE; then free it and disarm.",
    ReplaceMember = "replace-member": "SIGKILL a follower, remove it, wipe its disk, add it again as a learner, promote it.",
    MoveLeader = "move-leader": "Hand leadership to a follower (MoveLeader).",
    AddLearner = "add-learner": "Add a fourth member as a learner, promote it once caught up, then remove it (it stops itself).",
    RemoveReadd = "remove-readd": "Remove a running follower (it stops itself), wipe it, add it back as a voter.",
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL.iter().copied().find(|f| f.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {s:?}; known: {}", known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_parses_back_from_its_name() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(*f));
        }
        assert!("flood".parse::<Fault>().unwrap_err().contains("kill-leader"));
    }
}
