//! Which query rows count: every prompt row (`Rows::All`), the last `w` before the horizon
//! (`Rows::Last`), or the final ubatch's rows (`Rows::Elite`, filtered further by
//! [`super::elite`]). The horizon is the prompt's end, or in a bounded prefill the next
//! eviction point; after an eviction, window sums restart while `Rows::All` accumulates.

use std::ops::Range;

use super::Rows;

/// First prompt token index whose row `rows` reads, for the ubatch starting at prompt token
/// `ubatch.0` with `ubatch.1` rows, when windows end before token `horizon`.
pub(super) fn first_row(rows: Rows, horizon: usize, ubatch: (u32, usize)) -> usize {
    match rows {
        Rows::All => 0,
        Rows::Moments { skip } => skip,
        Rows::Last(w) => horizon.saturating_sub(w),
        Rows::Elite { .. } => {
            let (first, n) = (ubatch.0 as usize, ubatch.1);
            if first < horizon && first + n >= horizon {
                first
            } else {
                horizon
            }
        }
    }
}

/// Rows of the ubatch (as in [`first_row`]) that some request wants, given the smallest first
/// row `from` among the requests: a suffix, as `start..end` row indices.
pub(super) fn wanted(ubatch: (u32, usize), horizon: usize, from: usize) -> Range<usize> {
    let (first, n) = ubatch;
    let first = first as usize;
    // rows beyond the prompt (decode) are never wanted
    let end = n.min(horizon.saturating_sub(first));
    let start = from.saturating_sub(first).min(end);
    start..end
}

/// Whether a request's sums restart after an eviction (windows do; `Rows::All` and the query
/// moments keep their running sums).
pub(super) fn restarts(rows: Rows) -> bool {
    !matches!(rows, Rows::All | Rows::Moments { .. })
}
