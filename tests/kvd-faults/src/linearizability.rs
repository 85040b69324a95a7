//! A linearizability checker for one register (a key) with read, write and
//! compare-and-swap: the Wing–Gong search with Lowe's memoisation, as in
//! Porcupine and Knossos.
//!
//! The search walks the history's calls and returns in time order, trying to
//! linearize each pending call at the current point; a return whose call is
//! not yet linearized means the last choice was wrong, so it backtracks.
//! Configurations already seen (the set of linearized operations and the
//! register's value) are not explored twice.
//!
//! An operation whose outcome is unknown (a timeout, a lost connection) has
//! its return at the end of time: it may take effect at any point after its
//! call, or never (linearized at the very end, after everything observable).

use std::collections::HashSet;

/// The register's value: 0 is "no key", every written value is non-zero.
pub type Value = u64;

/// What a client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Read,
    Write(Value),
    /// Set to `.1` if the value is `.0`.
    Cas(Value, Value),
}

/// What it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Read(Value),
    Written,
    Cas(bool),
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

/// One operation, with its call and return times (any monotonic unit).
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub input: Input,
    pub output: Output,
    pub call: u64,
    /// `u64::MAX` when the outcome is unknown.
    pub ret: u64,
}

fn step(state: Value, input: Input, output: Output) -> Option<Value> {
    match (input, output) {
        (Input::Read, Output::Read(v)) => (v == state).then_some(state),
        (Input::Read, _) => Some(state),
        (Input::Write(v), _) => Some(v),
        (Input::Cas(expected, new), Output::Cas(true)) => (state == expected).then_some(new),
        (Input::Cas(expected, _), Output::Cas(false)) => (state != expected).then_some(state),
        (Input::Cas(expected, new), _) => Some(if state == expected { new } else { state }),
    }
}

/// The checker's verdict on one history.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order fits; the index is of the operation (in the given history)
    /// whose return the search could never get past.
    NotLinearizable {
        stuck_at: usize,
    },
    /// The search gave up after this many steps.
    Undecided {
        steps: u64,
    },
}

struct Entry {
    op: usize,
    is_call: bool,
    /// For a call, the position of its return.
    ret: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Checks `ops` on a register that starts at `initial`, giving up after
/// `max_steps` search steps.
pub fn check(ops: &[Op], initial: Value, max_steps: u64) -> Verdict {
    if ops.is_empty() {
        return Verdict::Linearizable;
    }
    // Events in time order; a call sorts before a return at the same time
    // (the two operations count as concurrent).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, true, i));
        events.push((op.ret, false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // Slot 0 is the list's head; event k is at slot k + 1.
    let n = events.len();
    let mut list: Vec<Entry> = Vec::with_capacity(n + 1);
    list.push(Entry { op: NIL, is_call: false, ret: NIL, prev: NIL, next: 1 });
    let mut ret_slot = vec![0; ops.len()];
    for (k, &(_, is_call, op)) in events.iter().enumerate() {
        if !is_call {
            ret_slot[op] = k + 1;
        }
        list.push(Entry { op, is_call, ret: NIL, prev: k, next: if k + 1 < n { k + 2 } else { NIL } });
    }
    for slot in 1..=n {
        if list[slot].is_call {
            list[slot].ret = ret_slot[list[slot].op];
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Value)> = HashSet::new();
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut state = initial;
    let mut entry = list[0].next;
    let mut steps = 0u64;
    let mut deepest_stuck = 0usize;

    fn unlink(list: &mut [Entry], slot: usize) {
        let (p, nx) = (list[slot].prev, list[slot].next);
        list[p].next = nx;
        if nx != NIL {
            list[nx].prev = p;
        }
    }
    fn relink(list: &mut [Entry], slot: usize) {
        let (p, nx) = (list[slot].prev, list[slot].next);
        list[p].next = slot;
        if nx != NIL {
            list[nx].prev = slot;
        }
    }

    while list[0].next != NIL {
        steps += 1;
        if steps > max_steps {
            return Verdict::Undecided { steps };
        }
        if entry == NIL {
            // Only possible if every remaining entry is a call that cannot
            // be linearized here; treated as a return with nothing to undo.
            return Verdict::NotLinearizable { stuck_at: deepest_stuck };
        }
        let e = &list[entry];
        if e.is_call {
            let op = &ops[e.op];
            if let Some(next_state) = step(state, op.input, op.output) {
                let (w, b) = (e.op / 64, e.op % 64);
                linearized[w] |= 1 << b;
                if seen.insert((linearized.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    let ret = list[entry].ret;
                    unlink(&mut list, entry);
                    unlink(&mut list, ret);
                    entry = list[0].next;
                    continue;
                }
                linearized[w] &= !(1 << b);
            }
            entry = list[entry].next;
        } else {
            // A return whose call is still pending: backtrack.
            deepest_stuck = deepest_stuck.max(list[entry].op);
            let Some((call, previous)) = stack.pop() else {
                return Verdict::NotLinearizable { stuck_at: list[entry].op };
            };
            state = previous;
            let op = list[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            let ret = list[call].ret;
            relink(&mut list, ret);
            relink(&mut list, call);
            entry = list[call].next;
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(input: Input, output: Output, call: u64, ret: u64) -> Op {
        Op { input, output, call, ret }
    }

    const MAX: u64 = 1_000_000;

    #[test]
    fn sequential_histories() {
        let ok = [
            op(Input::Write(1), Output::Written, 0, 1),
            op(Input::Read, Output::Read(1), 2, 3),
            op(Input::Cas(1, 2), Output::Cas(true), 4, 5),
            op(Input::Cas(1, 3), Output::Cas(false), 6, 7),
            op(Input::Read, Output::Read(2), 8, 9),
        ];
        assert_eq!(check(&ok, 0, MAX), Verdict::Linearizable);
        // A read of a value overwritten before it began.
        let stale = [
            op(Input::Write(1), Output::Written, 0, 1),
            op(Input::Write(2), Output::Written, 2, 3),
            op(Input::Read, Output::Read(1), 4, 5),
        ];
        assert!(matches!(check(&stale, 0, MAX), Verdict::NotLinearizable { .. }));
        // A CAS that claims success on a value the register never had.
        let bad_cas = [op(Input::Write(1), Output::Written, 0, 1), op(Input::Cas(5, 6), Output::Cas(true), 2, 3)];
        assert!(matches!(check(&bad_cas, 0, MAX), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps both writes: 1 and 2 are both possible.
        for seen in [1, 2] {
            let h = [
                op(Input::Write(1), Output::Written, 0, 10),
                op(Input::Write(2), Output::Written, 1, 10),
                op(Input::Read, Output::Read(seen), 2, 11),
            ];
            assert_eq!(check(&h, 0, MAX), Verdict::Linearizable, "read {seen}");
        }
        // Two reads after both writes must agree.
        let split = [
            op(Input::Write(1), Output::Written, 0, 10),
            op(Input::Write(2), Output::Written, 1, 10),
            op(Input::Read, Output::Read(1), 11, 12),
            op(Input::Read, Output::Read(2), 13, 14),
        ];
        assert!(matches!(check(&split, 0, MAX), Verdict::NotLinearizable { .. }));
        // A read may see the initial state while a write is in flight.
        let h = [op(Input::Write(1), Output::Written, 0, 10), op(Input::Read, Output::Read(0), 1, 2)];
        assert_eq!(check(&h, 0, MAX), Verdict::Linearizable);
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        // The timed-out write took effect.
        let took = [op(Input::Write(7), Output::Unknown, 0, u64::MAX), op(Input::Read, Output::Read(7), 5, 6)];
        assert_eq!(check(&took, 0, MAX), Verdict::Linearizable);
        // Or it did not.
        let not = [op(Input::Write(7), Output::Unknown, 0, u64::MAX), op(Input::Read, Output::Read(0), 5, 6)];
        assert_eq!(check(&not, 0, MAX), Verdict::Linearizable);
        // But it cannot take effect before it was called.
        let early = [op(Input::Read, Output::Read(7), 0, 1), op(Input::Write(7), Output::Unknown, 2, u64::MAX)];
        assert!(matches!(check(&early, 0, MAX), Verdict::NotLinearizable { .. }));
        // Nor come and go: once seen and then overwritten, it is not seen again.
        let twice = [
            op(Input::Write(7), Output::Unknown, 0, u64::MAX),
            op(Input::Read, Output::Read(7), 1, 2),
            op(Input::Write(8), Output::Written, 3, 4),
            op(Input::Read, Output::Read(7), 5, 6),
        ];
        assert!(matches!(check(&twice, 0, MAX), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn many_concurrent_clients_are_checked_quickly() {
        // Ten clients, each write followed by a read of its own value, in
        // overlapping rounds: linearizable, and the memo keeps it fast.
        let mut h = Vec::new();
        for round in 0..200u64 {
            let t = round * 100;
            for c in 0..10u64 {
                let v = round * 10 + c + 1;
                h.push(op(Input::Write(v), Output::Written, t + c, t + 20 + c));
            }
            let last = round * 10 + 10;
            h.push(op(Input::Read, Output::Read(last), t + 50, t + 60));
        }
        assert_eq!(check(&h, 0, 10_000_000), Verdict::Linearizable);
    }
}
