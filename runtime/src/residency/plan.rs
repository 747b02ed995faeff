//! Planning a component's residency: which layers stay on the device and how
//! large the streaming ring is, and the predicted order of layer use.

use crate::error::{Error, Result};

/// What stays resident and what streams, for one component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per layer: kept resident across passes.
    pub(crate) resident: Vec<bool>,
    /// Ring slots for streamed layers (0 when everything is resident).
    pub(crate) slots: usize,
    /// Pages per ring slot (the largest streamed layer's pages).
    pub(crate) slot_pages: usize,
}

impl Plan {
    /// Pages the plan needs in all.
    #[cfg(test)]
    pub(crate) fn pages(&self, layer_pages: &[usize]) -> usize {
        let resident: usize = layer_pages
            .iter()
            .zip(&self.resident)
            .filter(|(_, &r)| r)
            .map(|(p, _)| p)
            .sum();
        resident + self.slots * self.slot_pages
    }
}

/// Choose the resident set for a budget of `budget_pages`: the most bytes
/// that fit beside a ring of `depth + 1` slots sized for the largest streamed
/// layer. A repeated pass then moves only the streamed layers' bytes, the
/// minimum for a fixed resident set.
///
/// Layers not in `used` (never acquired in the observed order) are neither
/// resident nor counted. `streamed_only` forces every layer to stream
/// (sequential mode, never-resident components). When the full ring does
/// not fit, fewer slots are used (one at least); when not even one slot for
/// the largest layer fits, the budget is too small.
pub(crate) fn plan(
    layer_pages: &[usize],
    used: &[bool],
    budget_pages: usize,
    depth: usize,
    streamed_only: bool,
    page_size: usize,
) -> Result<Plan> {
    let n = layer_pages.len();
    let mut by_size: Vec<usize> = (0..n).filter(|&i| used[i]).collect();
    // Largest first; ties in execution order.
    by_size.sort_by(|&a, &b| layer_pages[b].cmp(&layer_pages[a]).then(a.cmp(&b)));
    let largest = by_size.first().map(|&i| layer_pages[i]).unwrap_or(0);
    if largest > budget_pages {
        return Err(Error::BudgetTooSmall {
            budget: budget_pages * page_size,
            largest_layer: largest * page_size,
        });
    }
    if by_size.is_empty() {
        return Ok(Plan {
            resident: vec![false; n],
            slots: 0,
            slot_pages: 0,
        });
    }
    let total: usize = by_size.iter().map(|&i| layer_pages[i]).sum();
    if !streamed_only && total <= budget_pages {
        let mut resident = vec![false; n];
        for &i in &by_size {
            resident[i] = true;
        }
        return Ok(Plan {
            resident,
            slots: 0,
            slot_pages: 0,
        });
    }
    // Candidate k: the k largest layers resident, the next one sizes the ring
    // slots, and smaller layers fill what is left. Keep the candidate with
    // the most resident pages.
    let max_k = if streamed_only { 0 } else { by_size.len() - 1 };
    let mut best: Option<(usize, Vec<usize>, usize, usize)> = None; // (resident pages, set, slots, slot pages)
    let mut prefix = 0usize;
    for k in 0..=max_k {
        if k > 0 {
            prefix += layer_pages[by_size[k - 1]];
        }
        if prefix > budget_pages {
            break;
        }
        let slot = layer_pages[by_size[k]];
        let room = (budget_pages - prefix) / slot.max(1);
        let slots = if room > depth {
            depth + 1
        } else if k == 0 && room >= 1 {
            room
        } else {
            continue;
        };
        let mut left = budget_pages - prefix - slots * slot;
        let mut set: Vec<usize> = by_size[..k].to_vec();
        let mut pages = prefix;
        if !streamed_only {
            for &i in &by_size[k + 1..] {
                if layer_pages[i] <= left {
                    left -= layer_pages[i];
                    pages += layer_pages[i];
                    set.push(i);
                }
            }
        }
        if best.as_ref().is_none_or(|b| pages >= b.0) {
            best = Some((pages, set, slots, slot));
        }
    }
    let (_, set, slots, slot_pages) =
        best.expect("k = 0 always fits one slot for the largest layer");
    let mut resident = vec![false; n];
    for i in set {
        resident[i] = true;
    }
    Ok(Plan {
        resident,
        slots,
        slot_pages,
    })
}

/// What a recorded acquire changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing: the pass so far follows the prediction, or is still running.
    None,
    /// A pass ended in another order over the same layers.
    Order,
    /// A pass ended using another set of layers.
    Used,
}

/// The predicted order of layer use, corrected by the observed trace.
#[derive(Clone, Debug)]
pub(crate) struct Order {
    /// Layers in predicted order of use.
    pub(crate) seq: Vec<usize>,
    /// Position of each layer in `seq`.
    pos: Vec<Option<usize>>,
    /// Layers acquired so far in the current pass, in order.
    trace: Vec<usize>,
    seen: Vec<bool>,
    passes: usize,
    /// Layers the previous pass used, when they differed from the prediction's.
    pending_used: Option<Vec<bool>>,
}

impl Order {
    /// Start from the execution order of `n` layers.
    pub(crate) fn new(n: usize) -> Self {
        Order {
            seq: (0..n).collect(),
            pos: (0..n).map(Some).collect(),
            trace: Vec::new(),
            seen: vec![false; n],
            passes: 0,
            pending_used: None,
        }
    }

    /// Add `layer` to the prediction (at the end) if it is not in it; true if it was added.
    pub(crate) fn include(&mut self, layer: usize) -> bool {
        if self.pos[layer].is_some() {
            return false;
        }
        self.pos[layer] = Some(self.seq.len());
        self.seq.push(layer);
        true
    }

    /// Passes completed (a layer was acquired again).
    pub(crate) fn passes(&self) -> usize {
        self.passes
    }

    /// Layers the predicted order uses.
    pub(crate) fn used(&self) -> Vec<bool> {
        self.pos.iter().map(Option::is_some).collect()
    }

    /// Record an acquire of `layer`. When a layer repeats, a pass has ended.
    /// A pass over the predicted layers in another order becomes the
    /// prediction at once; a pass over another set of layers does when the
    /// next pass uses that set too (one odd pass does not re-plan). Says what changed.
    pub(crate) fn record(&mut self, layer: usize) -> Change {
        let mut change = Change::None;
        if self.seen[layer] {
            self.passes += 1;
            if self.trace != self.seq {
                let used_now = self.seen.clone();
                let adopt = if used_now == self.used() {
                    change = Change::Order;
                    true
                } else if self.pending_used.as_ref() == Some(&used_now) {
                    change = Change::Used;
                    true
                } else {
                    self.pending_used = Some(used_now);
                    false
                };
                if adopt {
                    self.pending_used = None;
                    self.seq = std::mem::take(&mut self.trace);
                    self.pos = vec![None; self.seen.len()];
                    for (i, &l) in self.seq.iter().enumerate() {
                        self.pos[l] = Some(i);
                    }
                }
            } else {
                self.pending_used = None;
            }
            self.trace.clear();
            self.seen.iter_mut().for_each(|s| *s = false);
        }
        self.trace.push(layer);
        self.seen[layer] = true;
        change
    }

    /// Up to `n` layers predicted after `layer` for which `want` holds;
    /// with `wrap`, continuing into the next pass.
    pub(crate) fn next_after(
        &self,
        layer: usize,
        n: usize,
        wrap: bool,
        want: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let len = self.seq.len();
        let Some(p) = self.pos.get(layer).copied().flatten() else {
            return Vec::new();
        };
        (1..len)
            .filter(|d| wrap || p + d < len)
            .map(|d| self.seq[(p + d) % len])
            .filter(|&l| want(l))
            .take(n)
            .collect()
    }

    /// Distance (in predicted steps) from `from` to the next use of `layer`; `usize::MAX` if never.
    pub(crate) fn distance(&self, from: usize, layer: usize) -> usize {
        let len = self.seq.len();
        match (
            self.pos.get(from).copied().flatten(),
            self.pos.get(layer).copied().flatten(),
        ) {
            (Some(a), Some(b)) => (b + len - a) % len,
            _ => usize::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_that_fits_beside_the_ring() {
        // Layers of 4,1,3,2 pages; budget 9; depth 1 (two slots).
        // k=0: ring 2×4, 1 page left for the 1-page layer: 1 resident.
        // k=1: 4 resident, ring 2×3 = 10 > 9: no. So 1 page resident, 9 used.
        let p = plan(&[4, 1, 3, 2], &[true; 4], 9, 1, false, 1).unwrap();
        assert_eq!(p.resident, vec![false, true, false, false]);
        assert_eq!((p.slots, p.slot_pages), (2, 4));
        assert_eq!(p.pages(&[4, 1, 3, 2]), 9);
        // Layers 4,1,3,2,2 (12 pages), budget 11: k=0 keeps 3 pages, k=1 keeps 4+1,
        // k=2 keeps 4+3 beside a ring of 2×2; k=3 leaves no room for two slots.
        let sizes = [4, 1, 3, 2, 2];
        let p = plan(&sizes, &[true; 5], 11, 1, false, 1).unwrap();
        assert_eq!(p.resident, vec![true, false, true, false, false]);
        assert_eq!((p.slots, p.slot_pages), (2, 2));
        assert_eq!(p.pages(&sizes), 11);
        // Everything fits: no ring.
        let all = plan(&[4, 1, 3, 2], &[true; 4], 10, 1, false, 1).unwrap();
        assert_eq!(all.resident, vec![true; 4]);
        assert_eq!(all.slots, 0);
    }

    #[test]
    fn sequential_streams_all_and_small_budgets_shrink_the_ring() {
        let p = plan(&[4, 1, 3, 2], &[true; 4], 100, 2, true, 1).unwrap();
        assert_eq!(p.resident, vec![false; 4]);
        assert_eq!((p.slots, p.slot_pages), (3, 4));
        let tight = plan(&[4, 1, 3, 2], &[true; 4], 9, 2, true, 1).unwrap();
        assert_eq!((tight.slots, tight.slot_pages), (2, 4));
        let e = plan(&[4, 1, 3, 2], &[true; 4], 3, 2, false, 4096).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BudgetTooSmall {
                    budget: 12288,
                    largest_layer: 16384
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_trace_corrects_the_order() {
        let mut o = Order::new(4);
        assert_eq!(o.next_after(3, 2, true, |_| true), vec![0, 1]);
        assert_eq!(o.next_after(3, 2, false, |_| true), Vec::<usize>::new());
        for l in [0, 2, 3] {
            assert_eq!(o.record(l), Change::None);
        }
        assert_eq!(
            o.record(0),
            Change::None,
            "layer 1 was skipped once: wait for a second pass"
        );
        assert_eq!(o.seq, vec![0, 1, 2, 3]);
        for l in [2, 3] {
            assert_eq!(o.record(l), Change::None);
        }
        assert_eq!(o.record(0), Change::Used, "skipped twice: the new set");
        assert_eq!(o.passes(), 2);
        assert_eq!(o.seq, vec![0, 2, 3]);
        assert_eq!(o.used(), vec![true, false, true, true]);
        assert_eq!(o.next_after(0, 5, true, |_| true), vec![2, 3]);
        assert_eq!(o.distance(3, 2), 2);
        assert_eq!(o.distance(3, 1), usize::MAX);
        for l in [2, 3] {
            assert_eq!(o.record(l), Change::None);
        }
        assert_eq!(o.record(0), Change::None, "the same order again");
        for l in [3, 2] {
            assert_eq!(o.record(l), Change::None);
        }
        assert_eq!(o.record(0), Change::Order, "same layers, another order");
        assert_eq!(o.seq, vec![0, 3, 2]);
    }
}
