use candle_core::{Result, Tensor};

use crate::ConfigError;

/// An activation function, named as Hugging Face configs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact GELU, `x * Φ(x)` with the error function.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation of GELU.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 * x)`.
    QuickGelu,
    /// `relu`.
    Relu,
    /// `silu` or `swish`.
    Silu,
}

impl Activation {
    /// Parses a `hidden_act` / `activation_function` / `dense_act_fn` value.
    ///
    /// `field` names the config key for the error message.
    pub fn from_hf_name(name: &str, field: &str) -> std::result::Result<Self, ConfigError> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "quick_gelu" => Ok(Self::QuickGelu),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ConfigError::new(
                field,
                format!(
                    "unknown activation {other:?}; expected one of gelu, gelu_new, \
                     gelu_pytorch_tanh, gelu_fast, quick_gelu, relu, silu, swish"
                ),
            )),
        }
    }

    /// Applies the activation element-wise.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf if xs.device().is_cpu() => {
                xs.contiguous()?.apply_op1_no_bwd(&crate::gelu::GeluErf)
            }
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => crate::elementwise::relu(xs),
            Self::Silu => xs.silu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_activation_names_field_and_value() {
        let error = Activation::from_hf_name("gelu_fancy", "vision_config.hidden_act").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("vision_config.hidden_act"), "{message}");
        assert!(message.contains("gelu_fancy"), "{message}");
    }

    #[test]
    fn gelu_variants_match_known_values() {
        let xs = Tensor::new(&[-1.0f32, 0.0, 1.0, 2.0], &candle_core::Device::Cpu).unwrap();
        // Reference values from torch.nn.functional.gelu with approximate="none" and "tanh".
        let erf = Activation::GeluErf
            .forward(&xs)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let tanh = Activation::GeluTanh
            .forward(&xs)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected_erf = [-0.158_655_26_f32, 0.0, 0.841_344_7, 1.954_499_8];
        let expected_tanh = [-0.158_808_f32, 0.0, 0.841_192, 1.954_597_7];
        for i in 0..4 {
            assert!(
                (erf[i] - expected_erf[i]).abs() < 1e-6,
                "erf gelu at {i}: {} vs {}",
                erf[i],
                expected_erf[i]
            );
            assert!(
                (tanh[i] - expected_tanh[i]).abs() < 1e-6,
                "tanh gelu at {i}: {} vs {}",
                tanh[i],
                expected_tanh[i]
            );
        }
    }
}
