use candle_core::{Result, Tensor};

/// Keys and values of one attention layer, in buffers that grow with the generation.
///
/// Both buffers are `[rows, heads, allocated, head_dim]`; new entries are written in
/// place, so a decoding step copies only the new token's keys and values. The buffers
/// start at [`INITIAL_POSITIONS`] at most and double when full, up to `capacity`, so a
/// generous token limit costs no memory until it is used.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
    capacity: usize,
}

/// Positions allocated up front.
const INITIAL_POSITIONS: usize = 512;

impl KvCache {
    /// Allocates empty buffers shaped like `template` `[rows, heads, _, head_dim]` that
    /// take up to `capacity` positions.
    pub fn new(template: &Tensor, capacity: usize) -> Result<Self> {
        let keys = Self::buffer(template, capacity.min(INITIAL_POSITIONS))?;
        Ok(Self {
            values: keys.zeros_like()?,
            keys,
            len: 0,
            capacity,
        })
    }

    fn buffer(template: &Tensor, positions: usize) -> Result<Tensor> {
        let (rows, heads, _, head_dim) = template.dims4()?;
        Tensor::zeros(
            (rows, heads, positions, head_dim),
            template.dtype(),
            template.device(),
        )
    }

    /// Makes room for `needed` positions, doubling the buffers (up to the capacity).
    fn grow(&mut self, needed: usize) -> Result<()> {
        let allocated = self.keys.dim(2)?;
        if needed <= allocated {
            return Ok(());
        }
        let positions = (2 * allocated).max(needed).min(self.capacity);
        let keys = Self::buffer(&self.keys, positions)?;
        let values = keys.zeros_like()?;
        if self.len > 0 {
            keys.slice_set(&self.keys.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            values.slice_set(&self.values.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        }
        self.keys = keys;
        self.values = values;
        Ok(())
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
        if self.len + tokens > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} positions stored, {tokens} more requested, capacity {}",
                self.len,
                self.capacity
            );
        }
        self.grow(self.len + tokens)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    #[test]
    fn cache_grows_and_keeps_entries() {
        let template = Tensor::zeros((1, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let capacity = INITIAL_POSITIONS * 2 + 7;
        let mut cache = KvCache::new(&template, capacity).unwrap();
        let mut expected = Vec::new();
        for step in 0..capacity {
            let entry = Tensor::full(step as f32, (1, 2, 1, 3), &Device::Cpu).unwrap();
            let (keys, values) = cache.append(&entry, &(&entry * 2.0).unwrap()).unwrap();
            expected.push(step as f32);
            if step % 300 == 0 || step + 1 == capacity {
                let stored: Vec<f32> = keys.i((0, 0, .., 0)).unwrap().to_vec1().unwrap();
                assert_eq!(stored, expected, "keys after {} positions", step + 1);
                let doubled: Vec<f32> = values.i((0, 1, .., 2)).unwrap().to_vec1().unwrap();
                let twice: Vec<f32> = expected.iter().map(|v| v * 2.0).collect();
                assert_eq!(doubled, twice, "values after {} positions", step + 1);
            }
        }
        let one_more = Tensor::zeros((1, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(
            cache.append(&one_more, &one_more).is_err(),
            "capacity is a hard limit"
        );
    }
}
