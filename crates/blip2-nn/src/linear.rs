//! Fully connected layers, loaded from `weight` `[out, in]` and optional `bias` `[out]`
//! exactly as `torch.nn.Linear` stores them.
//!
//! On the CPU, products with a few input rows (decoding: one row per sequence) use the
//! bandwidth-bound kernels of [`crate::kernels`] for `f32` and `bf16` weights. Larger
//! products with `f32` weights read in place from the mapped checkpoint go through
//! [`crate::kernels::gemm_f32`] (AVX-512 or the `gemm` crate), others through candle. Weights can be quantized to 8 or 4 bits
//! ([`Linear::quantize`]), after which every product uses the int8 kernels. They can
//! also be stored in 8 bits with one scale per row ([`Linear::quantize_per_row`]), or
//! get such a copy for products with many rows ([`Linear::add_int8_for_many_rows`]).

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Module, Result, Storage, Tensor};
use half::bf16;

use crate::convert::{Element, bf16_values, f32_values, tensor_from_f32, with_f32_values};
use crate::kernels::packed_bf16::PackedBf16;
use crate::kernels::packed_i8::PackedI8;
use crate::kernels::quant::{QuantKind, QuantMatrix};
use crate::weights::{MappedMatrix, Weights};

/// Inputs of at most this many rows take the matrix-vector kernels.
pub const GEMV_MAX_ROWS: usize = 8;

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    /// float32, read in place from the mapped checkpoint.
    Mapped(MappedMatrix),
    Quantized(Arc<QuantMatrix>),
    /// bfloat16 in panels for `vdpbf16ps` (CPUs with AVX-512 BF16).
    PackedBf16(Arc<PackedBf16>),
    /// 8 bits per weight, one scale per row, in panels for `vpdpbusd`.
    PackedI8(Arc<PackedI8>),
}

/// A fully connected layer `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// 8-bit weights per row for products with more than [`GEMV_MAX_ROWS`] input rows,
    /// next to the weights that smaller products use (see [`Linear::add_int8_for_many_rows`]).
    many_rows: Option<Arc<PackedI8>>,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

/// Loads `weight` `[out, in]` and `bias` `[out]` under `weights`.
pub fn linear(in_features: usize, out_features: usize, weights: Weights) -> Result<Linear> {
    let bias = weights.get(out_features, "bias")?;
    load(in_features, out_features, &weights, Some(bias))
}

/// Loads `weight` `[out, in]` under `weights`; the layer has no bias.
pub fn linear_no_bias(in_features: usize, out_features: usize, weights: Weights) -> Result<Linear> {
    load(in_features, out_features, &weights, None)
}

/// Loads `weight` `[out, in]` under `weights`, with a bias the caller assembled (some
/// checkpoints store it in parts).
pub fn linear_with_bias(
    in_features: usize,
    out_features: usize,
    weights: Weights,
    bias: Option<Tensor>,
) -> Result<Linear> {
    load(in_features, out_features, &weights, bias)
}

fn load(
    in_features: usize,
    out_features: usize,
    weights: &Weights,
    bias: Option<Tensor>,
) -> Result<Linear> {
    if let Some(mapped) = weights.mapped_matrix("weight", out_features, in_features) {
        return Ok(Linear {
            weight: Weight::Mapped(mapped),
            many_rows: None,
            bias,
            in_features,
            out_features,
        });
    }
    if packs_bf16(weights.dtype(), &weights.var_device()) {
        // Straight from the file's float32 values when it stores them: rounding and
        // packing in one parallel pass is much faster than converting a tensor first.
        if let Some(mapped) = weights.f32_matrix_in_file("weight", out_features, in_features) {
            let packed = PackedBf16::from_f32(mapped.values(), out_features, in_features)
                .map_err(candle_core::Error::Msg)?;
            // The float32 pages are not read again; dropping them keeps peak memory
            // near the bfloat16 size.
            mapped.release();
            return Ok(Linear {
                weight: Weight::PackedBf16(Arc::new(packed)),
                many_rows: None,
                bias,
                in_features,
                out_features,
            });
        }
    }
    let weight = weights.get((out_features, in_features), "weight")?;
    Ok(Linear::new(weight, bias))
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`. bfloat16 weights on
    /// a CPU with AVX-512 BF16 are packed for its kernel.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = weight.dims2().unwrap_or((0, 0));
        let packed = packs_bf16(weight.dtype(), weight.device())
            .then(|| {
                let values = weight.flatten_all().ok()?.to_vec1::<bf16>().ok()?;
                PackedBf16::from_bf16(&values, out_features, in_features).ok()
            })
            .flatten();
        let weight = match packed {
            Some(packed) => Weight::PackedBf16(Arc::new(packed)),
            None => Weight::Dense(weight),
        };
        Self {
            weight,
            many_rows: None,
            bias,
            in_features,
            out_features,
        }
    }

    /// A layer that reads its float32 weight in place.
    pub fn from_mapped(matrix: MappedMatrix, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = matrix.shape();
        Self {
            weight: Weight::Mapped(matrix),
            many_rows: None,
            bias,
            in_features,
            out_features,
        }
    }

    /// Uses already-quantized weights.
    pub fn from_quantized(matrix: QuantMatrix, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = (matrix.rows(), matrix.cols());
        Self {
            weight: Weight::Quantized(Arc::new(matrix)),
            many_rows: None,
            bias,
            in_features,
            out_features,
        }
    }

    /// The weight as a tensor (a copy for weights read in place), or `None` once quantized.
    pub fn weight(&self) -> Option<Tensor> {
        match &self.weight {
            Weight::Dense(weight) => Some(weight.clone()),
            Weight::Mapped(matrix) => {
                Tensor::from_slice(matrix.values(), matrix.shape(), &candle_core::Device::Cpu).ok()
            }
            Weight::Quantized(_) => None,
            Weight::PackedBf16(matrix) => Tensor::from_vec(
                matrix.to_f32(),
                (self.out_features, self.in_features),
                &candle_core::Device::Cpu,
            )
            .and_then(|t| t.to_dtype(DType::BF16))
            .ok(),
            Weight::PackedI8(matrix) => Tensor::from_vec(
                matrix.dequantize(),
                (self.out_features, self.in_features),
                &candle_core::Device::Cpu,
            )
            .ok(),
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The dtype products are computed in: the weight's, or `f32` once quantized.
    pub fn dtype(&self) -> DType {
        match &self.weight {
            Weight::Dense(weight) => weight.dtype(),
            Weight::Mapped(_) | Weight::Quantized(_) | Weight::PackedI8(_) => DType::F32,
            Weight::PackedBf16(_) => DType::BF16,
        }
    }

    /// Whether the weights are quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized(_))
    }

    /// The quantized weights, if any.
    pub fn quantized(&self) -> Option<&QuantMatrix> {
        match &self.weight {
            Weight::Quantized(matrix) => Some(matrix),
            Weight::Dense(_) | Weight::Mapped(_) | Weight::PackedBf16(_) | Weight::PackedI8(_) => {
                None
            }
        }
    }

    /// Quantizes the weights in place. A layer whose input width is not a multiple of
    /// 32 stays dense (the function returns `false`), as does one not on the CPU.
    pub fn quantize(&mut self, kind: QuantKind) -> Result<bool> {
        if !self
            .in_features
            .is_multiple_of(crate::kernels::quant::BLOCK)
        {
            return Ok(false);
        }
        let matrix = match &self.weight {
            Weight::Quantized(_) => return Ok(true),
            Weight::Dense(weight) if !weight.device().is_cpu() => return Ok(false),
            Weight::Dense(weight) => QuantMatrix::quantize(
                kind,
                &dense_values(weight)?,
                self.out_features,
                self.in_features,
            ),
            Weight::PackedBf16(packed) => {
                QuantMatrix::quantize(kind, &packed.to_f32(), self.out_features, self.in_features)
            }
            Weight::PackedI8(packed) => QuantMatrix::quantize(
                kind,
                &packed.dequantize(),
                self.out_features,
                self.in_features,
            ),
            Weight::Mapped(mapped) => {
                // `set_quantized` then drops the float32 pages, read once here, so that
                // peak memory stays near the quantized size.
                QuantMatrix::quantize(kind, mapped.values(), self.out_features, self.in_features)
            }
        }
        .map_err(candle_core::Error::Msg)?;
        self.set_quantized(matrix)?;
        Ok(true)
    }

    /// Quantizes the weights to 8 bits with one scale per output row, in the layout of
    /// [`PackedI8`]; inputs are then quantized per row at run time, which suits products
    /// with many rows such as the vision encoder's. Returns `false`, leaving the layer as
    /// it is, when it is not on the CPU or is already quantized in blocks.
    pub fn quantize_per_row(&mut self) -> Result<bool> {
        match &self.weight {
            Weight::PackedI8(_) => return Ok(true),
            Weight::Quantized(_) => return Ok(false),
            _ => {}
        }
        let Some(packed) = self.int8_per_row()? else {
            return Ok(false);
        };
        if let Weight::Mapped(mapped) = &self.weight {
            mapped.release();
        }
        self.weight = Weight::PackedI8(Arc::new(packed));
        self.many_rows = None;
        Ok(true)
    }

    /// Drops this layer's weight pages from the process's memory when the weights are read
    /// in place from the checkpoint (see [`crate::MappedTensors::release`]). The next
    /// product reads them back from the file cache. Weights held in memory stay.
    pub fn release_mapped_pages(&self) {
        if let Weight::Mapped(mapped) = &self.weight {
            mapped.release();
        }
    }

    /// Adds a copy of the weights quantized to 8 bits per row ([`PackedI8`]), which
    /// products with more than [`GEMV_MAX_ROWS`] input rows then use, with their inputs
    /// quantized per row. For a prompt's tokens that product runs about twice as fast as
    /// the bfloat16 one, and three times as fast as weights quantized in blocks. Decoding
    /// keeps the current weights. Returns `false`, adding nothing, off the CPU.
    ///
    /// NOTE: each input row shares one 8-bit range, so a few outlier features (as trained
    /// large language models have) coarsen the rest of the row. The cost was measured on
    /// random weights only.
    pub fn add_int8_for_many_rows(&mut self) -> Result<bool> {
        if matches!(self.weight, Weight::PackedI8(_)) {
            return Ok(true);
        }
        let Some(packed) = self.int8_per_row()? else {
            return Ok(false);
        };
        self.many_rows = Some(Arc::new(packed));
        Ok(true)
    }

    /// Quantizes the current weights to 8 bits per row, or returns `None` off the CPU.
    fn int8_per_row(&self) -> Result<Option<PackedI8>> {
        let (rows, cols) = (self.out_features, self.in_features);
        let quantize = |values: &[f32]| {
            PackedI8::quantize(values, rows, cols).map_err(candle_core::Error::Msg)
        };
        let packed = match &self.weight {
            Weight::Dense(weight) if !weight.device().is_cpu() => return Ok(None),
            Weight::Dense(weight) => quantize(&dense_values(weight)?)?,
            Weight::Mapped(mapped) => quantize(mapped.values())?,
            Weight::PackedBf16(packed) => quantize(&packed.to_f32())?,
            Weight::Quantized(matrix) => PackedI8::quantize_rows(rows, cols, |r, row| {
                row.copy_from_slice(&matrix.dequantize_row(r));
            }),
            Weight::PackedI8(packed) => PackedI8::clone(packed),
        };
        Ok(Some(packed))
    }

    /// Replaces the weights with `matrix` (quantized earlier, for example read from a
    /// file), which must have this layer's shape.
    pub fn set_quantized(&mut self, matrix: QuantMatrix) -> Result<()> {
        let shape = (matrix.rows(), matrix.cols());
        if shape != (self.out_features, self.in_features) {
            candle_core::bail!(
                "quantized weights of shape {shape:?} do not fit a layer of shape {:?}",
                (self.out_features, self.in_features)
            );
        }
        if let Weight::Mapped(mapped) = &self.weight {
            mapped.release();
        }
        self.weight = Weight::Quantized(Arc::new(matrix));
        self.many_rows = None;
        if let Some(bias) = &self.bias {
            self.bias = Some(bias.to_dtype(DType::F32)?);
        }
        Ok(())
    }

    /// Bytes a product reads from the weights.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(weight) => weight.elem_count() * weight.dtype().size_in_bytes(),
            Weight::Mapped(matrix) => matrix.values().len() * 4,
            Weight::Quantized(matrix) => matrix.size_in_bytes(),
            Weight::PackedBf16(matrix) => matrix.size_in_bytes(),
            Weight::PackedI8(matrix) => matrix.size_in_bytes(),
        }
    }

    /// `[.., in]` → `[.., out]` with one of the CPU kernels, or `None` when none applies.
    fn forward_kernel(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        if !xs.device().is_cpu() {
            return Ok(None);
        }
        let rows = xs.elem_count() / self.in_features.max(1);
        let mut shape = xs.dims().to_vec();
        let Some(last) = shape.last_mut() else {
            return Ok(None);
        };
        *last = self.out_features;
        let packed = match (&self.weight, &self.many_rows) {
            (_, Some(matrix)) if rows > GEMV_MAX_ROWS => Some(Packed::I8(matrix, f32_values(xs)?)),
            (Weight::PackedBf16(matrix), _) => Some(Packed::Bf16(matrix, bf16_values(xs)?)),
            (Weight::PackedI8(matrix), _) => Some(Packed::I8(matrix, f32_values(xs)?)),
            _ => None,
        };
        if let Some(packed) = packed {
            return self.forward_packed(xs, rows, shape, packed).map(Some);
        }
        let bias = self.bias_values()?;
        let mut out = vec![0f32; rows * self.out_features];
        if !with_f32_values(xs, |inputs| {
            self.multiply(inputs, rows, bias.as_deref(), &mut out)
        })? {
            return Ok(None);
        }
        tensor_from_f32(out, shape, xs.dtype(), xs.device()).map(Some)
    }

    /// Computes `inputs · wᵀ + bias` into `out` with this project's kernels. Returns
    /// `false`, writing nothing, for a dense weight off the CPU or of another dtype, and for
    /// packed weights, which [`Linear::forward_packed`] serves.
    fn multiply(&self, inputs: &[f32], rows: usize, bias: Option<&[f32]>, out: &mut [f32]) -> bool {
        let (n_out, k) = (self.out_features, self.in_features);
        match &self.weight {
            Weight::Mapped(matrix) if rows > GEMV_MAX_ROWS => {
                // The blocked kernel starts its sums from the bias.
                crate::kernels::gemm_f32(matrix.values(), inputs, bias, out, rows, n_out, k);
                return true;
            }
            Weight::Mapped(matrix) => {
                crate::kernels::gemv_f32(matrix.values(), inputs, out, rows, n_out, k)
            }
            Weight::Quantized(matrix) => matrix.matmul(inputs, rows, out),
            Weight::Dense(weight) if rows <= GEMV_MAX_ROWS && weight.is_contiguous() => {
                let (storage, layout) = weight.storage_and_layout();
                let Storage::Cpu(storage) = &*storage else {
                    return false;
                };
                let range = layout.start_offset()..layout.start_offset() + n_out * k;
                match storage {
                    CpuStorage::F32(w) => {
                        crate::kernels::gemv_f32(&w[range], inputs, out, rows, n_out, k)
                    }
                    CpuStorage::BF16(w) => {
                        crate::kernels::bf16::gemv_bf16(&w[range], inputs, out, rows, n_out, k)
                    }
                    _ => return false,
                }
            }
            Weight::Dense(_) | Weight::PackedBf16(_) | Weight::PackedI8(_) => return false,
        }
        if let Some(bias) = bias {
            crate::kernels::add_bias(out, bias);
        }
        true
    }

    /// Adds the bias to the kernel's `f32` products and returns them in the input's dtype
    /// and device. The bias is added here rather than as a tensor operation: for a
    /// decoding step the operation's dispatch would cost more than the additions.
    fn kernel_output(&self, mut out: Vec<f32>, shape: Vec<usize>, xs: &Tensor) -> Result<Tensor> {
        if let Some(bias) = self.bias_values()? {
            crate::kernels::add_bias(&mut out, &bias);
        }
        tensor_from_f32(out, shape, xs.dtype(), xs.device())
    }

    /// Applies several layers to the same input, as attention does with its query, key
    /// and value projections. Quantized layers of one kind and width share one pass:
    /// the input is quantized once and their rows are computed together. Any other mix
    /// runs layer by layer.
    pub fn forward_many(layers: &[&Linear], xs: &Tensor) -> Result<Vec<Tensor>> {
        let matrices: Option<Vec<&QuantMatrix>> =
            layers.iter().map(|layer| layer.quantized()).collect();
        let shared = matrices.filter(|matrices| match matrices.first() {
            Some(first) => {
                xs.device().is_cpu()
                    && xs.dims().last() == Some(&first.cols())
                    && matrices
                        .iter()
                        .all(|m| m.kind() == first.kind() && m.cols() == first.cols())
            }
            None => false,
        });
        let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
        let many_rows_int8 = rows > GEMV_MAX_ROWS && layers.iter().all(|l| l.many_rows.is_some());
        let Some(matrices) = shared.filter(|_| !many_rows_int8) else {
            return layers.iter().map(|layer| layer.forward(xs)).collect();
        };
        let rows = xs.elem_count() / matrices[0].cols().max(1);
        let inputs = f32_values(xs)?;
        let products = QuantMatrix::matmul_many(&matrices, &inputs, rows);
        layers
            .iter()
            .zip(products)
            .map(|(layer, out)| {
                let mut shape = xs.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = layer.out_features;
                }
                layer.kernel_output(out, shape, xs)
            })
            .collect()
    }
}

impl Linear {
    /// Returns the bias as `f32` values, for the kernels that add it themselves.
    fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|bias| bias.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()
    }

    /// Runs a packed kernel. It adds the bias to its `f32` sums and converts them
    /// straight to bfloat16 for bfloat16 inputs, so no `f32` copy of the output is made.
    fn forward_packed(
        &self,
        xs: &Tensor,
        rows: usize,
        shape: Vec<usize>,
        packed: Packed,
    ) -> Result<Tensor> {
        let bias = self.bias_values()?;
        let bias = bias.as_deref();
        match xs.dtype() {
            DType::BF16 => {
                let out = packed.matmul(rows, bias, <bf16 as Element>::from_f32);
                Tensor::from_vec(out, shape, xs.device())
            }
            dtype => {
                let out = packed.matmul(rows, bias, |v| v);
                tensor_from_f32(out, shape, dtype, xs.device())
            }
        }
    }
}

/// A packed weight matrix with the inputs in the form its kernel takes.
enum Packed<'a> {
    Bf16(&'a PackedBf16, Vec<bf16>),
    I8(&'a PackedI8, Vec<f32>),
}

impl Packed<'_> {
    fn matmul<T: Send + Copy + Default>(
        &self,
        rows: usize,
        bias: Option<&[f32]>,
        convert: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        match self {
            Self::Bf16(matrix, inputs) => matrix.matmul(inputs, rows, bias, convert),
            Self::I8(matrix, inputs) => matrix.matmul(inputs, rows, bias, convert),
        }
    }
}

/// Returns a tensor's values as `f32`, row-major.
fn dense_values(weight: &Tensor) -> Result<Vec<f32>> {
    weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Returns whether bfloat16 weights of this dtype on this device go to the packed kernel.
fn packs_bf16(dtype: DType, device: &candle_core::Device) -> bool {
    dtype == DType::BF16 && device.is_cpu() && crate::kernels::cpu_features().avx512_bf16
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(ys) = self.forward_kernel(xs)? {
            return Ok(ys);
        }
        let Weight::Dense(weight) = &self.weight else {
            candle_core::bail!("quantized and mapped layers run on the CPU only");
        };
        let weight_t = match xs.dims() {
            [batch, _, _] => weight.broadcast_left(*batch)?.t()?,
            _ => weight.t()?,
        };
        let ys = xs.matmul(&weight_t)?;
        match &self.bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_abs_difference;
    use candle_core::Device;

    #[test]
    fn kernel_and_matmul_paths_agree() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (48, 64), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 48, &device).unwrap();
        let layer = Linear::new(weight.clone(), Some(bias.clone()));
        for rows in [1, 3, 20] {
            let xs = Tensor::randn(0f32, 1.0, (1, rows, 64), &device).unwrap();
            let got = layer.forward(&xs).unwrap();
            let expected = xs
                .matmul(&weight.t().unwrap().unsqueeze(0).unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let difference = max_abs_difference(&got, &expected);
            assert!(difference < 1e-4, "{rows} rows: difference {difference}");
        }
    }

    /// Deterministic values in [-scale, scale).
    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn quantized_layer_stays_close() {
        let device = Device::Cpu;
        let weight = Tensor::from_vec(values(40 * 128, 1, 0.1), (40, 128), &device).unwrap();
        let mut layer = Linear::new(weight, None);
        let xs = Tensor::from_vec(values(2 * 128, 2, 1.0), (2, 128), &device).unwrap();
        let dense = layer.forward(&xs).unwrap();
        // Outputs spread about 0.38 here; the 4-bit error has a spread of about 0.023.
        for (kind, tolerance) in [(QuantKind::Q8, 0.007), (QuantKind::Q4, 0.12)] {
            let mut quantized = layer.clone();
            assert!(quantized.quantize(kind).unwrap());
            let got = quantized.forward(&xs).unwrap();
            let difference = max_abs_difference(&got, &dense);
            assert!(difference < tolerance, "{kind:?}: difference {difference}");
            assert!(quantized.weight_bytes() < layer.weight_bytes() / 3);
        }
        let mut odd = Linear::new(Tensor::zeros((4, 33), DType::F32, &device).unwrap(), None);
        assert!(
            !odd.quantize(QuantKind::Q8).unwrap(),
            "33 columns cannot be quantized in blocks of 32"
        );
        layer.quantize(QuantKind::Q4).unwrap();
        assert!(layer.is_quantized());
    }

    #[test]
    fn forward_many_matches_forward() {
        let device = Device::Cpu;
        let layer = |rows: usize, seed: u64| {
            let weight =
                Tensor::from_vec(values(rows * 64, seed, 0.1), (rows, 64), &device).unwrap();
            let bias = Tensor::from_vec(values(rows, seed + 10, 0.1), rows, &device).unwrap();
            Linear::new(weight, Some(bias))
        };
        let (mut first, mut second, dense) = (layer(12, 3), layer(20, 4), layer(8, 5));
        first.quantize(QuantKind::Q8).unwrap();
        second.quantize(QuantKind::Q8).unwrap();
        let xs = Tensor::from_vec(values(3 * 64, 6, 1.0), (1, 3, 64), &device).unwrap();
        // Layers quantized alike share one pass. A dense layer among them makes each run alone.
        for layers in [vec![&first, &second], vec![&first, &dense, &second]] {
            let products = Linear::forward_many(&layers, &xs).unwrap();
            for (layer, product) in layers.iter().zip(&products) {
                let alone = layer.forward(&xs).unwrap();
                assert_eq!(product.dims(), alone.dims());
                assert_eq!(max_abs_difference(product, &alone), 0.0);
            }
        }
        assert!(Linear::forward_many(&[], &xs).unwrap().is_empty());
    }

    #[test]
    fn int8_products_stay_close() {
        let device = Device::Cpu;
        let weight = Tensor::from_vec(values(40 * 100, 7, 0.1), (40, 100), &device).unwrap();
        let bias = Tensor::from_vec(values(40, 8, 0.1), 40, &device).unwrap();
        let layer = Linear::new(weight, Some(bias));
        let inputs = |rows: usize| {
            Tensor::from_vec(values(rows * 100, 9, 1.0), (1, rows, 100), &device).unwrap()
        };
        let (few, many) = (inputs(GEMV_MAX_ROWS), inputs(GEMV_MAX_ROWS + 1));
        let (dense_few, dense_many) = (layer.forward(&few).unwrap(), layer.forward(&many).unwrap());
        // Outputs spread about 0.33 here; 8-bit weights and inputs err by about 0.004.
        let tolerance = 0.02;

        // Quantized per row, every product uses the 8-bit weights, in the input's dtype.
        let mut per_row = layer.clone();
        assert!(per_row.quantize_per_row().unwrap());
        for (xs, dense) in [(&few, &dense_few), (&many, &dense_many)] {
            let difference = max_abs_difference(&per_row.forward(xs).unwrap(), dense);
            assert!(difference > 0.0, "the 8-bit weights changed nothing");
            assert!(difference < tolerance, "{difference}");
        }
        let half = per_row
            .forward(&many.to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        let difference = max_abs_difference(&half.to_dtype(DType::F32).unwrap(), &dense_many);
        assert!(difference < tolerance, "bf16: {difference}");

        // With an 8-bit copy, only products of more than GEMV_MAX_ROWS rows change.
        let mut with_copy = layer.clone();
        assert!(with_copy.add_int8_for_many_rows().unwrap());
        let unchanged = max_abs_difference(&with_copy.forward(&few).unwrap(), &dense_few);
        assert_eq!(unchanged, 0.0);
        let difference = max_abs_difference(&with_copy.forward(&many).unwrap(), &dense_many);
        assert!(difference > 0.0, "the 8-bit copy was not used");
        assert!(difference < tolerance, "{difference}");

        // Layers quantized in blocks with copies run them alone for many rows, the same
        // as one by one, and share one pass for few.
        let wide = Tensor::from_vec(values(40 * 128, 10, 0.1), (40, 128), &device).unwrap();
        let mut blocks = Linear::new(wide, None);
        blocks.quantize(QuantKind::Q8).unwrap();
        blocks.add_int8_for_many_rows().unwrap();
        for rows in [3, 12] {
            let xs = Tensor::from_vec(values(rows * 128, 11, 1.0), (rows, 128), &device).unwrap();
            let shared = Linear::forward_many(&[&blocks, &blocks], &xs).unwrap();
            assert_eq!(
                max_abs_difference(&shared[1], &blocks.forward(&xs).unwrap()),
                0.0
            );
        }
        // New weights drop the copy, which no longer matches them.
        let matrix = QuantMatrix::quantize(QuantKind::Q4, &values(40 * 128, 12, 0.1), 40, 128);
        blocks.set_quantized(matrix.unwrap()).unwrap();
        assert!(blocks.many_rows.is_none());
    }
}
