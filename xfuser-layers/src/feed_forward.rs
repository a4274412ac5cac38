//! diffusers' `FeedForward` (in `models/attention.py`) with its GELU activations:
//! `net.0.proj` -> GELU -> `net.2`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

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
            proj_in: candle_nn::linear(dim, inner_dim, vb.pp("net.0.proj"))?,
            proj_out: candle_nn::linear(inner_dim, dim, vb.pp("net.2"))?,
            activation,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        let h = match self.activation {
            FeedForwardActivation::Gelu => h.gelu_erf()?,
            FeedForwardActivation::GeluTanh => h.gelu()?,
        };
        self.proj_out.forward(&h)
    }
}
