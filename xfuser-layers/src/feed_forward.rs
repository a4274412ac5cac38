//! diffusers' `FeedForward` (in `models/attention.py`) with its GELU activations:
//! `net.0.proj` -> GELU -> `net.2`, whole ([`FeedForward`]) or split over a tensor-parallel
//! group ([`ParallelFeedForward`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::kernels::gemm_friendly_linear;

use crate::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, SplitWeights, TpRank};

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

/// diffusers' `FeedForward` split over a tensor-parallel group: `net.0.proj` column-parallel
/// (this rank's slice of the hidden features, with its bias and the activation), `net.2`
/// row-parallel. [`forward_partial`](Self::forward_partial) returns this rank's partial
/// product, which the caller all-reduces over the tp group (and adds
/// [`out_bias`](Self::out_bias) once); with a degree of 1 it is the whole forward without the
/// bias, as [`FeedForward::forward_without_out_bias`].
#[derive(Debug, Clone)]
pub struct ParallelFeedForward {
    proj_in: ColumnParallelLinear,
    proj_out: RowParallelLinear,
    activation: FeedForwardActivation,
}

impl ParallelFeedForward {
    /// Shard `shard` of the `dim` -> `inner_dim` -> `dim` feed-forward at `source` (the `ff`
    /// module: `net.0.proj` and `net.2`, with biases).
    pub fn load(
        dim: usize,
        inner_dim: usize,
        activation: FeedForwardActivation,
        shard: TpRank,
        source: &SplitWeights,
    ) -> xfuser_core::Result<Self> {
        Ok(Self {
            proj_in: ColumnParallelLinear::load(
                dim,
                inner_dim,
                true,
                shard,
                &source.pp("net.0.proj"),
            )?,
            proj_out: RowParallelLinear::load(inner_dim, dim, true, shard, &source.pp("net.2"))?,
            activation,
        })
    }

    /// (…, dim) -> this rank's partial (…, dim) of `net.2`, not reduced, without its bias.
    pub fn forward_partial(&self, xs: &Tensor) -> xfuser_core::Result<Tensor> {
        let (h, bias) = self.proj_in.forward_local_without_bias(xs)?;
        let h = match self.activation {
            FeedForwardActivation::Gelu => match bias {
                Some(b) => h.broadcast_add(b)?.gelu_erf()?,
                None => h.gelu_erf()?,
            },
            // bias and GELU in one pass
            FeedForwardActivation::GeluTanh => xfuser_core::kernels::bias_gelu_tanh(&h, bias)?,
        };
        self.proj_out.forward_partial(&h)
    }

    /// `net.2`'s bias, whole: added once, after the reduce.
    pub fn out_bias(&self) -> Option<&Tensor> {
        self.proj_out.bias()
    }

    /// The shard this rank holds.
    pub fn shard(&self) -> TpRank {
        self.proj_in.shard()
    }

    /// The bytes of the weights and biases this rank keeps.
    pub fn parameter_bytes(&self) -> usize {
        self.proj_in.parameter_bytes() + self.proj_out.parameter_bytes()
    }
}
