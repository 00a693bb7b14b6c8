//! The KV cell ↔ prompt token map. llama.cpp attends over cells, not tokens: after an eviction
//! new tokens fill holes first, and a compaction packs the survivors to the front. The map is
//! rebuilt from the cell ids each ubatch is written to (`attn_inp_k_idxs`), so columns of a
//! `kq` tensor can be read as prompt tokens.

/// Which prompt token each cell holds, and where the current ubatch starts.
#[derive(Debug, Default)]
pub(super) struct Cells {
    /// cell → prompt token index
    cell_token: Vec<Option<u32>>,
    /// prompt token index of the first row of the current ubatch, and its row count
    ubatch: (u32, usize),
    next_token: u32,
}

/// The key cells a layer's queries can see, as `(cell, token)` pairs sorted by token.
#[derive(Debug)]
pub(super) struct Keys {
    /// `(cell, token)`, token ascending.
    pub cols: Vec<(usize, u32)>,
    /// Cell j holds token j for every visible key (as after a plain prefill): the visible keys
    /// of any row are then a contiguous prefix of its logits.
    pub identity: bool,
}

impl Cells {
    /// A new ubatch: its tokens (the next prompt tokens, in order) were written to `cells`.
    pub fn on_ubatch(&mut self, cells: &[i64]) {
        self.ubatch = (self.next_token, cells.len());
        for (r, &c) in cells.iter().enumerate() {
            let Ok(c) = usize::try_from(c) else { continue };
            if self.cell_token.len() <= c {
                self.cell_token.resize(c + 1, None);
            }
            self.cell_token[c] = Some(self.next_token + r as u32);
        }
        self.next_token += cells.len() as u32;
    }

    /// After an eviction packed the surviving tokens (`kept(token)`) into the first cells, in
    /// their cell order.
    pub fn on_compact(&mut self, kept: &dyn Fn(usize) -> bool) {
        let survivors: Vec<Option<u32>> = self.cell_token.iter().filter(|u| u.is_some_and(|u| kept(u as usize))).copied().collect();
        self.cell_token = survivors;
    }

    /// Prompt tokens seen so far.
    pub fn tokens_seen(&self) -> usize {
        self.next_token as usize
    }

    /// The current ubatch: its first prompt token index and its row count.
    pub fn ubatch(&self) -> (u32, usize) {
        self.ubatch
    }

    /// The occupied cells among the first `n_kv`, sorted by token.
    pub fn keys(&self, n_kv: usize) -> Keys {
        let mut cols: Vec<(usize, u32)> = self.cell_token.iter().take(n_kv).enumerate().filter_map(|(j, u)| u.map(|u| (j, u))).collect();
        cols.sort_unstable_by_key(|&(_, u)| u);
        // After a plain prefill, cell j holds token j: visible keys are a contiguous prefix.
        let identity = cols.iter().enumerate().all(|(i, &(j, u))| i == j && j == u as usize);
        Keys { cols, identity }
    }
}
