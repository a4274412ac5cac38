//! diffusers' `FeedForward` (in `models/attention.py`) with its GELU activations:
//! `net.0.proj` -> GELU -> `net.2`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::kernels::gemm_friendly_linear;

/// The activations of diffusers' `FeedForward` that this port runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// `"gelu"`: exact, erf-based GELU.
    Gelu,
    /// `"gelu-approximate"`: tanh-approximated GELU (PixArt).
    GeluTanh,
}

impl FeedForwardActivation {
    /// The activation named `name` in a diffusers config, or None if not supported here.
    pub fn from_diffusers_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu-approximate" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub const SUPPORTED: &'static [&'static str] = &["gelu", "gelu-approximate"];
}

#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    activation: FeedForwardActivation,
}

impl FeedForward {
    /// `dim` -> `inner_dim` (diffusers: 4·dim) -> `dim`, with biases.
    pub fn new(
        dim: usize,
        inner_dim: usize,
        activation: FeedForwardActivation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            proj_in: gemm_friendly_linear(&candle_nn::linear(
                dim,
                inner_dim,
                vb.pp("net.0.proj"),
            )?)?,
            proj_out: gemm_friendly_linear(&candle_nn::linear(inner_dim, dim, vb.pp("net.2"))?)?,
            activation,
        })
    }
}

impl FeedForward {
    /// The forward without `net.2`'s bias, and that bias, for the caller to add in a fused
    /// residual ([`xfuser_core::kernels::gated_residual`]).
    pub fn forward_without_out_bias(&self, xs: &Tensor) -> Result<(Tensor, Option<&Tensor>)> {
        let h = match self.activation {
            FeedForwardActivation::Gelu => self.proj_in.forward(xs)?.gelu_erf()?,
            // matmul, then bias and GELU in one pass
            FeedForwardActivation::GeluTanh => xfuser_core::kernels::bias_gelu_tanh(
                &xfuser_core::kernels::matmul_t(xs, self.proj_in.weight())?,
                self.proj_in.bias(),
            )?,
        };
        Ok((
            xfuser_core::kernels::matmul_t(&h, self.proj_out.weight())?,
            self.proj_out.bias(),
        ))
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (h, bias) = self.forward_without_out_bias(xs)?;
        match bias {
            Some(b) => h.broadcast_add(b),
            None => Ok(h),
        }
    }
}
