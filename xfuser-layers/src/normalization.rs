//! Normalization layers after diffusers' `models/normalization.py`: a LayerNorm with optional
//! affine parameters, and PixArt's adaLN-single.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::embeddings::PixArtAlphaCombinedTimestepSizeEmbeddings;

/// `torch.nn.LayerNorm` over the last dimension, with or without `weight`/`bias`.
///
/// Two-pass (mean, then the variance of the centred values) in f32 whatever the input dtype,
/// like torch; candle's fused kernel takes E[x²] − E[x]², which loses digits when the mean is
/// large against the spread.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// `elementwise_affine` reads `weight` and `bias` from `vb`, as torch's module names them.
    pub fn new(dim: usize, eps: f64, elementwise_affine: bool, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = if elementwise_affine {
            (Some(vb.get(dim, "weight")?), Some(vb.get(dim, "bias")?))
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    pub fn without_affine(eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            eps,
        }
    }

    /// `forward(xs)·(1 + scale) + shift` with xs (B, N, D) and shift, scale (B, 1, D): adaLN
    /// modulation. Without affine parameters this is one fused pass
    /// ([`xfuser_core::kernels::layer_norm_modulate`]).
    pub fn forward_modulated(&self, xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        if self.weight.is_none() && self.bias.is_none() {
            return xfuser_core::kernels::layer_norm_modulate(xs, shift, scale, self.eps);
        }
        self.forward(xs)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(shift)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        let normed = match &self.weight {
            Some(w) => normed.broadcast_mul(w)?,
            None => normed,
        };
        match &self.bias {
            Some(b) => normed.broadcast_add(b),
            None => Ok(normed),
        }
    }
}

/// diffusers' `AdaLayerNormSingle` (PixArt-α §2.3): one conditioning MLP shared by all
/// blocks; each block adds its own `scale_shift_table` to the six modulation vectors.
#[derive(Debug, Clone)]
pub struct AdaLayerNormSingle {
    emb: PixArtAlphaCombinedTimestepSizeEmbeddings,
    linear: Linear,
}

impl AdaLayerNormSingle {
    /// `embedding_dim` must be divisible by 3 with additional conditions (two thirds for the
    /// resolution, one for the aspect ratio).
    pub fn new(
        embedding_dim: usize,
        use_additional_conditions: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            emb: PixArtAlphaCombinedTimestepSizeEmbeddings::new(
                embedding_dim,
                embedding_dim / 3,
                use_additional_conditions,
                vb.pp("emb"),
            )?,
            linear: candle_nn::linear(embedding_dim, 6 * embedding_dim, vb.pp("linear"))?,
        })
    }

    pub fn uses_additional_conditions(&self) -> bool {
        self.emb.uses_additional_conditions()
    }

    /// Returns (modulation (B, 6·D), embedded timestep (B, D)).
    pub fn forward(
        &self,
        timestep: &Tensor,
        resolution: Option<&Tensor>,
        aspect_ratio: Option<&Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let embedded = self
            .emb
            .forward(timestep, resolution, aspect_ratio, dtype)?;
        let modulation = self.linear.forward(&embedded.silu()?)?;
        Ok((modulation, embedded))
    }
}

/// diffusers' `RMSNorm` over the last dimension: `x / sqrt(mean(x²) + eps)`, computed in f32,
/// times `weight` when it has one (`elementwise_affine`), in the input dtype. SD3.5's and
/// Flux's query/key norms.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// `elementwise_affine` reads `weight` from `vb`.
    pub fn new(dim: usize, eps: f64, elementwise_affine: bool, vb: VarBuilder) -> Result<Self> {
        let weight = if elementwise_affine {
            Some(vb.get(dim, "weight")?)
        } else {
            None
        };
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(w) = &self.weight {
            if xs.dtype() == DType::F32 && w.dtype() == DType::F32 {
                // One fused pass (f32 throughout, as diffusers computes it).
                return candle_nn::ops::rms_norm(&xs.contiguous()?, w, self.eps as f32);
            }
        }
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x
            .broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        match &self.weight {
            Some(w) => normed.broadcast_mul(&w.to_dtype(dtype)?),
            None => Ok(normed),
        }
    }
}

/// diffusers' `AdaLayerNormContinuous` with its `layer_norm` norm: `norm(x)·(1 + scale) +
/// shift`, where `[scale, shift] = linear(SiLU(conditioning))` (scale first). SD3's and Flux's
/// `norm_out`, and SD3's `norm1_context` of the last block.
#[derive(Debug, Clone)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
    norm: LayerNorm,
    dim: usize,
}

impl AdaLayerNormContinuous {
    /// `vb` is the module's prefix; `linear` maps `conditioning_dim` to `2·embedding_dim`, and
    /// `elementwise_affine` reads the norm's `norm.weight` and `norm.bias`.
    pub fn new(
        embedding_dim: usize,
        conditioning_dim: usize,
        elementwise_affine: bool,
        eps: f64,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            linear: xfuser_core::kernels::gemm_friendly_linear(&candle_nn::linear_b(
                conditioning_dim,
                2 * embedding_dim,
                bias,
                vb.pp("linear"),
            )?)?,
            norm: LayerNorm::new(embedding_dim, eps, elementwise_affine, vb.pp("norm"))?,
            dim: embedding_dim,
        })
    }

    /// x (B, N, D), conditioning (B, C) -> (B, N, D).
    pub fn forward(&self, xs: &Tensor, conditioning: &Tensor) -> Result<Tensor> {
        let emb = self
            .linear
            .forward(&conditioning.silu()?.to_dtype(xs.dtype())?)?;
        let batch = emb.dim(0)?;
        let part = |i: usize| -> Result<Tensor> {
            emb.narrow(1, i * self.dim, self.dim)?
                .reshape((batch, 1, self.dim))?
                .contiguous()
        };
        self.norm.forward_modulated(xs, &part(1)?, &part(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_without_affine_normalizes_last_dim() {
        let x = Tensor::new(
            &[[1f32, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 14.0]],
            &Device::Cpu,
        )
        .unwrap();
        let y: Vec<Vec<f32>> = LayerNorm::without_affine(0.0)
            .forward(&x)
            .unwrap()
            .to_vec2()
            .unwrap();
        let s = 1.25f32.sqrt();
        let expect = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s];
        for (a, b) in y[0].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let s = 3f32.sqrt();
        for (a, b) in y[1].iter().zip([-1.0 / s, -1.0 / s, -1.0 / s, 3.0 / s]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}

#[cfg(test)]
mod rms_norm_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_closed_form_in_f32_and_bf16() {
        let x = Tensor::new(
            &[[1f32, -2.0, 3.0, 4.0], [0.5, 0.5, -0.5, 0.5]],
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::new(&[1f32, 2.0, 0.5, -1.0], &Device::Cpu).unwrap();
        let vb = VarBuilder::from_tensors(
            [("weight".to_string(), w)].into_iter().collect(),
            DType::F32,
            &Device::Cpu,
        );
        let norm = RmsNorm::new(4, 1e-6, true, vb).unwrap();
        let expect = |row: [f32; 4]| -> Vec<f32> {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            let r = (ms + 1e-6).sqrt();
            row.iter()
                .zip([1f32, 2.0, 0.5, -1.0])
                .map(|(v, w)| v / r * w)
                .collect()
        };
        let rows = [[1f32, -2.0, 3.0, 4.0], [0.5, 0.5, -0.5, 0.5]];
        let y: Vec<Vec<f32>> = norm.forward(&x).unwrap().to_vec2().unwrap();
        let yb: Vec<Vec<f32>> = norm
            .forward(&x.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        for ((got, got_bf16), row) in y.iter().zip(&yb).zip(rows) {
            for ((a, b), e) in got.iter().zip(got_bf16).zip(expect(row)) {
                assert!((a - e).abs() < 1e-6, "{a} vs {e}");
                assert!((b - e).abs() < 2e-2, "bf16 {b} vs {e}");
            }
        }
    }
}
