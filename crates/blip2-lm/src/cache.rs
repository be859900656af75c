use candle_core::{Result, Tensor};

/// Keys and values of one attention layer, preallocated for the whole generation.
///
/// Both buffers are `[rows, heads, capacity, head_dim]`; new entries are written in
/// place, so a decoding step copies only the new token's keys and values.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl KvCache {
    /// Allocates empty buffers shaped like `template` `[rows, heads, _, head_dim]` with
    /// room for `capacity` positions.
    pub fn new(template: &Tensor, capacity: usize) -> Result<Self> {
        let (rows, heads, _, head_dim) = template.dims4()?;
        let keys = Tensor::zeros(
            (rows, heads, capacity, head_dim),
            template.dtype(),
            template.device(),
        )?;
        Ok(Self {
            values: keys.zeros_like()?,
            keys,
            len: 0,
        })
    }

    /// Number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `keys` and `values` `[rows, heads, tokens, head_dim]` and returns views of
    /// everything stored so far.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let tokens = keys.dim(2)?;
        let capacity = self.keys.dim(2)?;
        if self.len + tokens > capacity {
            candle_core::bail!(
                "KV cache overflow: {} positions stored, {tokens} more requested, capacity {capacity}",
                self.len
            );
        }
        self.keys.slice_set(&keys.contiguous()?, 2, self.len)?;
        self.values.slice_set(&values.contiguous()?, 2, self.len)?;
        self.len += tokens;
        Ok((
            self.keys.narrow(2, 0, self.len)?,
            self.values.narrow(2, 0, self.len)?,
        ))
    }

    /// Keeps rows in the given order (new row `i` is old row `rows[i]`).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        self.keys = self.keys.index_select(rows, 0)?;
        self.values = self.values.index_select(rows, 0)?;
        Ok(())
    }
}
