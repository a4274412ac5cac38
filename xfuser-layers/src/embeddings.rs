//! Embeddings shared by diffusion transformers, after diffusers' `models/embeddings.py`:
//! sinusoidal timestep and 2-D positional embeddings, the patch embedding of latents, and
//! PixArt's timestep/size conditioning and caption projection.
//!
//! The sinusoids are computed on the host in the precision diffusers uses (f32 for timesteps,
//! f64 for positions), so that the results agree with diffusers to the last bit or two.

use std::sync::Mutex;

use candle_core::{DType, Device, Module, Result, Tensor, TensorId, D};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::kernels::gemm_friendly_linear;

/// diffusers' `get_timestep_embedding`: (N,) timesteps -> (N, dim) f32 sinusoids, `[sin, cos]`
/// (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded when `dim` is odd.
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Result<Tensor> {
    let n = timesteps.dims1()?;
    let half = dim / 2;
    // Same f32 operation order as diffusers: exp((-ln(max_period) * i) / (half - shift)).
    let neg_log = -(max_period.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&freqs)?;
    let args = if scale == 1.0 { args } else { (args * scale)? };
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// 1-D sincos embedding of one position into `dim` values, `[sin(p·ω), cos(p·ω)]` with
/// ω_k = 10000^(−k/(dim/2)), k < dim/2. f64 as in diffusers.
fn sincos_1d(dim: usize, position: f64) -> impl Iterator<Item = f64> {
    let half = dim / 2;
    let omega = move |k: usize| 1.0 / 10000f64.powf(k as f64 / (dim as f64 / 2.0));
    let sin = (0..half).map(move |k| (position * omega(k)).sin());
    let cos = (0..half).map(move |k| (position * omega(k)).cos());
    sin.chain(cos)
}

/// diffusers' `get_2d_sincos_pos_embed` for a grid of `(rows, cols)` patches: (rows·cols, dim)
/// f32, row-major over the grid. Positions are scaled so that the grid spans `base_size`
/// patches at `interpolation_scale` 1, whatever its actual size. Each token's first half
/// encodes its column and its second half its row (diffusers' meshgrid puts width first).
pub fn get_2d_sincos_pos_embed(
    dim: usize,
    grid: (usize, usize),
    base_size: usize,
    interpolation_scale: f64,
    device: &Device,
) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!(
            "2-D sincos positional embedding needs a dimension divisible by 4, got {dim}"
        );
    }
    let (rows, cols) = grid;
    // The grid coordinates are f32 in diffusers: arange / (size / base_size) / scale.
    let coord = |i: usize, size: usize| -> f64 {
        let step = (size as f64 / base_size as f64) as f32;
        ((i as f32 / step) / interpolation_scale as f32) as f64
    };
    let col_emb: Vec<Vec<f64>> = (0..cols)
        .map(|j| sincos_1d(dim / 2, coord(j, cols)).collect())
        .collect();
    let row_emb: Vec<Vec<f64>> = (0..rows)
        .map(|i| sincos_1d(dim / 2, coord(i, rows)).collect())
        .collect();
    let mut data = Vec::with_capacity(rows * cols * dim);
    for row in &row_emb {
        for col in &col_emb {
            data.extend(col.iter().chain(row.iter()).map(|&v| v as f32));
        }
    }
    Tensor::from_vec(data, (rows * cols, dim), device)
}

/// diffusers' `PatchEmbed` with the 2-D sincos positional embedding (no layer norm, no SD3
/// cropping): a stride-`patch_size` convolution applied as one matmul over flattened patches.
#[derive(Debug)]
pub struct PatchEmbed {
    /// (embed_dim, in_channels·p·p): the convolution kernel, flattened.
    weight: Tensor,
    bias: Tensor,
    patch_size: usize,
    embed_dim: usize,
    base_size: usize,
    interpolation_scale: f64,
    /// The positional embedding of the last grid seen: latents keep their size across steps.
    pos_cache: Mutex<Option<((usize, usize), Tensor)>>,
}

impl PatchEmbed {
    /// `vb` is the module's prefix (`pos_embed`); the kernel is read from `proj.weight`.
    /// `height` is the training latent height (`sample_size`), which fixes `base_size`.
    pub fn new(
        height: usize,
        patch_size: usize,
        in_channels: usize,
        embed_dim: usize,
        interpolation_scale: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("proj");
        let weight = vb
            .get((embed_dim, in_channels, patch_size, patch_size), "weight")?
            .reshape((embed_dim, in_channels * patch_size * patch_size))?;
        let bias = vb.get(embed_dim, "bias")?;
        Ok(Self {
            weight,
            bias,
            patch_size,
            embed_dim,
            base_size: height / patch_size,
            interpolation_scale,
            pos_cache: Mutex::new(None),
        })
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// The positional embedding of a `(rows, cols)` patch grid, (rows·cols, D) f32.
    pub fn pos_embed(&self, grid: (usize, usize), device: &Device) -> Result<Tensor> {
        let mut cache = self.pos_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, t)) = cache.as_ref() {
            if *g == grid && t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let t = get_2d_sincos_pos_embed(
            self.embed_dim,
            grid,
            self.base_size,
            self.interpolation_scale,
            device,
        )?;
        *cache = Some((grid, t.clone()));
        Ok(t)
    }

    /// (B, C, H, W) latents -> (B, (H/p)·(W/p), D) patch tokens plus positional embedding.
    pub fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let (_, _, h, _) = latent.dims4()?;
        self.forward_rows(latent, 0..h / self.patch_size)
    }

    /// The tokens of the patch rows `rows` only, with the positional embedding of the whole
    /// latent's grid: (B, C, H, W) -> (B, rows.len()·(W/p), D), rows[i] of `forward`'s grid.
    /// A sequence-parallel rank embeds its own rows this way.
    pub fn forward_rows(&self, latent: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let (b, c, h, w) = latent.dims4()?;
        let p = self.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!("latent size {h}x{w} is not a multiple of the patch size {p}");
        }
        let (grid_rows, cols) = (h / p, w / p);
        if rows.is_empty() || rows.end > grid_rows {
            candle_core::bail!(
                "patch rows {rows:?} are empty or outside the {grid_rows} rows of a {h}x{w} latent"
            );
        }
        let n_rows = rows.len();
        let latent = if n_rows == grid_rows {
            latent.clone()
        } else {
            latent.narrow(2, rows.start * p, n_rows * p)?
        };
        // (B, C, n·p, W) -> (B, n, cols, C·p·p), the order of the convolution kernel.
        let patches = latent
            .reshape((b, c, n_rows, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * n_rows * cols, c * p * p))?;
        let tokens = patches
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, n_rows * cols, self.embed_dim))?;
        // diffusers adds the f32 embedding, promoting, then casts back.
        let pos = self.pos_embed((grid_rows, cols), latent.device())?;
        let pos = if n_rows == grid_rows {
            pos
        } else {
            pos.narrow(0, rows.start * cols, n_rows * cols)?
        };
        let dtype = tokens.dtype();
        tokens
            .to_dtype(DType::F32)?
            .broadcast_add(&pos)?
            .to_dtype(dtype)
    }
}

/// diffusers' `TimestepEmbedding` with SiLU: linear_1 -> SiLU -> linear_2.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_channels: usize, time_embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// Width of the sinusoidal projection PixArt feeds its timestep and size embedders.
const PIXART_TIME_PROJ_DIM: usize = 256;

/// PixArt's timestep projection: 256 channels, `[cos, sin]`, no frequency shift.
fn pixart_time_proj(t: &Tensor) -> Result<Tensor> {
    get_timestep_embedding(t, PIXART_TIME_PROJ_DIM, true, 0.0, 1.0, 10000.0)
}

/// diffusers' `PixArtAlphaCombinedTimestepSizeEmbeddings`: the timestep embedding plus, for
/// PixArt-α's micro-conditioning, embeddings of the image resolution and aspect ratio.
#[derive(Debug, Clone)]
pub struct PixArtAlphaCombinedTimestepSizeEmbeddings {
    timestep_embedder: TimestepEmbedding,
    /// (resolution_embedder, aspect_ratio_embedder) when additional conditions are used.
    size_embedders: Option<(TimestepEmbedding, TimestepEmbedding)>,
}

impl PixArtAlphaCombinedTimestepSizeEmbeddings {
    pub fn new(
        embedding_dim: usize,
        size_emb_dim: usize,
        use_additional_conditions: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let timestep_embedder = TimestepEmbedding::new(
            PIXART_TIME_PROJ_DIM,
            embedding_dim,
            vb.pp("timestep_embedder"),
        )?;
        let size_embedders = if use_additional_conditions {
            Some((
                TimestepEmbedding::new(
                    PIXART_TIME_PROJ_DIM,
                    size_emb_dim,
                    vb.pp("resolution_embedder"),
                )?,
                TimestepEmbedding::new(
                    PIXART_TIME_PROJ_DIM,
                    size_emb_dim,
                    vb.pp("aspect_ratio_embedder"),
                )?,
            ))
        } else {
            None
        };
        Ok(Self {
            timestep_embedder,
            size_embedders,
        })
    }

    pub fn uses_additional_conditions(&self) -> bool {
        self.size_embedders.is_some()
    }

    /// timestep (B,), resolution (B, 2), aspect_ratio (B, 1) -> (B, D) in `dtype`.
    pub fn forward(
        &self,
        timestep: &Tensor,
        resolution: Option<&Tensor>,
        aspect_ratio: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t_emb = self
            .timestep_embedder
            .forward(&pixart_time_proj(timestep)?.to_dtype(dtype)?)?;
        let Some((resolution_embedder, aspect_ratio_embedder)) = &self.size_embedders else {
            return Ok(t_emb);
        };
        let (Some(resolution), Some(aspect_ratio)) = (resolution, aspect_ratio) else {
            candle_core::bail!(
                "this model uses additional conditions: resolution and aspect_ratio are required"
            );
        };
        let batch = t_emb.dim(0)?;
        // Each value of (B, k) is embedded separately, then the k embeddings are concatenated.
        let embed_sizes = |values: &Tensor, embedder: &TimestepEmbedding| -> Result<Tensor> {
            let proj = pixart_time_proj(&values.flatten_all()?)?.to_dtype(dtype)?;
            embedder.forward(&proj)?.reshape((batch, ()))
        };
        let sizes = Tensor::cat(
            &[
                embed_sizes(resolution, resolution_embedder)?,
                embed_sizes(aspect_ratio, aspect_ratio_embedder)?,
            ],
            D::Minus1,
        )?;
        t_emb + sizes
    }
}

/// diffusers' `PixArtAlphaTextProjection` (GELU-tanh): caption features -> hidden size.
///
/// Keeps the projections of the last caption tensors it saw, by tensor id: a denoising loop
/// passes the same text at every step, so it is projected once per loop (candle tensors are
/// immutable, so an id names one content), and the attention layers can keep their text
/// keys and values by the id of the projection.
#[derive(Debug)]
pub struct PixArtAlphaTextProjection {
    linear_1: Linear,
    linear_2: Linear,
    cache: Mutex<Vec<(TensorId, Tensor)>>,
}

/// Caption tensors whose projection is kept (both CFG halves on two rank threads, say).
const CAPTION_CACHE_ENTRIES: usize = 2;

impl Clone for PixArtAlphaTextProjection {
    fn clone(&self) -> Self {
        Self {
            linear_1: self.linear_1.clone(),
            linear_2: self.linear_2.clone(),
            cache: Mutex::new(Vec::new()),
        }
    }
}

impl PixArtAlphaTextProjection {
    pub fn new(in_features: usize, hidden_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: gemm_friendly_linear(&candle_nn::linear(
                in_features,
                hidden_size,
                vb.pp("linear_1"),
            )?)?,
            linear_2: gemm_friendly_linear(&candle_nn::linear(
                hidden_size,
                hidden_size,
                vb.pp("linear_2"),
            )?)?,
            cache: Mutex::new(Vec::new()),
        })
    }

    fn project(&self, caption: &Tensor) -> Result<Tensor> {
        let h = xfuser_core::kernels::bias_gelu_tanh(
            &xfuser_core::kernels::matmul_t(caption, self.linear_1.weight())?,
            self.linear_1.bias(),
        )?;
        self.linear_2.forward(&h)
    }
}

impl Module for PixArtAlphaTextProjection {
    fn forward(&self, caption: &Tensor) -> Result<Tensor> {
        let id = caption.id();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(i, _)| *i == id) {
            return Ok(t.clone());
        }
        let out = self.project(caption)?;
        if cache.len() == CAPTION_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((id, out.clone()));
        Ok(out)
    }
}

/// diffusers' `CombinedTimestepTextProjEmbeddings` (SD3): the embedded timestep plus the
/// projected pooled text, `timestep_embedder(time_proj(t)) + text_embedder(pooled)`, where
/// `time_proj` is the 256-channel `[cos, sin]` sinusoid and `text_embedder` is
/// `linear_1 -> SiLU -> linear_2` (diffusers' `PixArtAlphaTextProjection` with `act_fn="silu"`).
#[derive(Debug, Clone)]
pub struct CombinedTimestepTextProjEmbeddings {
    timestep_embedder: TimestepEmbedding,
    text_linear_1: Linear,
    text_linear_2: Linear,
}

impl CombinedTimestepTextProjEmbeddings {
    /// `vb` is the module's prefix (`time_text_embed`).
    pub fn new(embedding_dim: usize, pooled_projection_dim: usize, vb: VarBuilder) -> Result<Self> {
        let text = vb.pp("text_embedder");
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                PIXART_TIME_PROJ_DIM,
                embedding_dim,
                vb.pp("timestep_embedder"),
            )?,
            text_linear_1: candle_nn::linear(
                pooled_projection_dim,
                embedding_dim,
                text.pp("linear_1"),
            )?,
            text_linear_2: candle_nn::linear(embedding_dim, embedding_dim, text.pp("linear_2"))?,
        })
    }

    /// timestep (B,), pooled (B, pooled_projection_dim) -> (B, D) in the dtype of `pooled`.
    pub fn forward(&self, timestep: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let proj = get_timestep_embedding(timestep, PIXART_TIME_PROJ_DIM, true, 0.0, 1.0, 10000.0)?;
        let t_emb = self
            .timestep_embedder
            .forward(&proj.to_dtype(pooled.dtype())?)?;
        let text = self
            .text_linear_2
            .forward(&self.text_linear_1.forward(pooled)?.silu()?)?;
        t_emb + text
    }
}

/// diffusers' `CombinedTimestepGuidanceTextProjEmbeddings` (Flux-dev): the embedded timestep
/// plus the embedded guidance value plus the projected pooled text,
/// `(timestep_embedder(time_proj(t)) + guidance_embedder(time_proj(g))) + text_embedder(pooled)`,
/// with the same 256-channel `[cos, sin]` sinusoid for both and the SiLU text projection of
/// [`CombinedTimestepTextProjEmbeddings`].
#[derive(Debug, Clone)]
pub struct CombinedTimestepGuidanceTextProjEmbeddings {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: TimestepEmbedding,
    text_linear_1: Linear,
    text_linear_2: Linear,
}

impl CombinedTimestepGuidanceTextProjEmbeddings {
    /// `vb` is the module's prefix (`time_text_embed`).
    pub fn new(embedding_dim: usize, pooled_projection_dim: usize, vb: VarBuilder) -> Result<Self> {
        let text = vb.pp("text_embedder");
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                PIXART_TIME_PROJ_DIM,
                embedding_dim,
                vb.pp("timestep_embedder"),
            )?,
            guidance_embedder: TimestepEmbedding::new(
                PIXART_TIME_PROJ_DIM,
                embedding_dim,
                vb.pp("guidance_embedder"),
            )?,
            text_linear_1: candle_nn::linear(
                pooled_projection_dim,
                embedding_dim,
                text.pp("linear_1"),
            )?,
            text_linear_2: candle_nn::linear(embedding_dim, embedding_dim, text.pp("linear_2"))?,
        })
    }

    /// timestep (B,), guidance (B,), pooled (B, pooled_projection_dim) -> (B, D) in the dtype
    /// of `pooled`.
    pub fn forward(&self, timestep: &Tensor, guidance: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let embed = |t: &Tensor, embedder: &TimestepEmbedding| -> Result<Tensor> {
            let proj = get_timestep_embedding(t, PIXART_TIME_PROJ_DIM, true, 0.0, 1.0, 10000.0)?;
            embedder.forward(&proj.to_dtype(pooled.dtype())?)
        };
        let time_guidance = (embed(timestep, &self.timestep_embedder)?
            + embed(guidance, &self.guidance_embedder)?)?;
        let text = self
            .text_linear_2
            .forward(&self.text_linear_1.forward(pooled)?.silu()?)?;
        time_guidance + text
    }
}

/// Rotary tables of positions with several axes (diffusers' `FluxPosEmbed`, which joins one
/// `get_1d_rotary_pos_embed` per axis): `ids` holds `axes_dims.len()` coordinates per
/// position, row after row; axis `a` takes `axes_dims[a] / 2` rotation pairs, pair `k` at the
/// angle `id_a · theta^(−2k / axes_dims[a])`. Returns cos and sin of the angles, (N, Σ
/// axes_dims / 2) f32 each: pair `i` rotates the values `2i` and `2i + 1` of a head (diffusers'
/// tables, repeat-interleaved, hold each of these values twice). Computed on the host in f64
/// and rounded to f32, as diffusers does on the CPU.
pub fn multi_axis_rotary_tables(
    ids: &[f64],
    axes_dims: &[usize],
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let axes = axes_dims.len();
    if axes == 0 || !ids.len().is_multiple_of(axes) || axes_dims.iter().any(|d| d % 2 == 1) {
        candle_core::bail!(
            "rotary tables: {} ids are not whole positions of {axes} axes, or an axis of \
             {axes_dims:?} is odd",
            ids.len()
        );
    }
    let freqs: Vec<(usize, f64)> = axes_dims
        .iter()
        .enumerate()
        .flat_map(|(a, &dim)| {
            (0..dim / 2).map(move |k| (a, 1.0 / theta.powf((2 * k) as f64 / dim as f64)))
        })
        .collect();
    let n = ids.len() / axes;
    let mut cos = Vec::with_capacity(n * freqs.len());
    let mut sin = Vec::with_capacity(n * freqs.len());
    for position in ids.chunks(axes) {
        for &(a, freq) in &freqs {
            let angle = position[a] * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let half = freqs.len();
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// diffusers' `apply_rotary_emb` with real tables and `use_real_unbind_dim = -1` (Flux,
/// HunyuanDiT, CogVideoX): each pair of values `(x_2i, x_2i+1)` of a head is rotated by its
/// angle, `(x_2i·cos − x_2i+1·sin, x_2i+1·cos + x_2i·sin)`, in f32. x (B, H, S, Dh), cos and
/// sin (S, Dh/2) from [`multi_axis_rotary_tables`] -> (B, H, S, Dh) in the dtype of x.
pub fn apply_rotary_emb_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    if d % 2 == 1 || cos.dims() != [s, d / 2] || sin.dims() != [s, d / 2] {
        candle_core::bail!(
            "apply_rotary_emb_pairs: x {:?} needs (S, Dh/2) tables, got cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let dtype = x.dtype();
    let pairs = x.to_dtype(DType::F32)?.reshape((b, h, s, d / 2, 2))?;
    let (re, im) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
    let table = |t: &Tensor| t.to_dtype(DType::F32)?.reshape((1, 1, s, d / 2, 1));
    let (cos, sin) = (table(cos)?, table(sin)?);
    let out_re = (re.broadcast_mul(&cos)? - im.broadcast_mul(&sin)?)?;
    let out_im = (im.broadcast_mul(&cos)? + re.broadcast_mul(&sin)?)?;
    Tensor::cat(&[out_re, out_im], 4)?
        .reshape((b, h, s, d))?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_matches_closed_form() {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu).unwrap();
        let emb = get_timestep_embedding(&t, 6, true, 0.0, 1.0, 10000.0).unwrap();
        let emb: Vec<Vec<f32>> = emb.to_vec2().unwrap();
        // half = 3, freqs 10000^(-i/3); flipped: [cos.., sin..].
        for (k, f) in [1.0f64, 10000f64.powf(-1.0 / 3.0), 10000f64.powf(-2.0 / 3.0)]
            .iter()
            .enumerate()
        {
            assert!((emb[0][k] - 1.0).abs() < 1e-6);
            assert!(emb[0][3 + k].abs() < 1e-6);
            assert!((emb[1][k] as f64 - (10.0 * f).cos()).abs() < 1e-5);
            assert!((emb[1][3 + k] as f64 - (10.0 * f).sin()).abs() < 1e-5);
        }
    }

    #[test]
    fn pos_embed_layout_is_column_then_row() {
        // 2 rows x 3 cols, base 2: col step 3/2, row step 1.
        let pe = get_2d_sincos_pos_embed(8, (2, 3), 2, 1.0, &Device::Cpu).unwrap();
        let pe: Vec<Vec<f32>> = pe.to_vec2().unwrap();
        assert_eq!(pe.len(), 6);
        // Token (row 1, col 2): column coordinate 2 / 1.5, row coordinate 1.
        let tok = &pe[3 + 2];
        let c = 2.0f64 / 1.5;
        assert!((tok[0] as f64 - c.sin()).abs() < 1e-6);
        assert!((tok[2] as f64 - c.cos()).abs() < 1e-6);
        assert!((tok[4] as f64 - 1f64.sin()).abs() < 1e-6);
        assert!((tok[6] as f64 - 1f64.cos()).abs() < 1e-6);
        assert!((tok[5] as f64 - (0.01f64).sin()).abs() < 1e-6);
    }

    #[test]
    fn rotary_tables_and_rotation_follow_the_closed_form() {
        // Two positions of axes (2, 4): axis 0 one pair at freq 1, axis 1 two pairs at
        // freqs 1 and 10000^(-1/2) = 0.01.
        let ids = [0.0, 0.0, 3.0, 2.0];
        let (cos, sin) = multi_axis_rotary_tables(&ids, &[2, 4], 10000.0, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), [2, 3]);
        let (cos, sin): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (cos.to_vec2().unwrap(), sin.to_vec2().unwrap());
        assert_eq!(
            (cos[0].clone(), sin[0].clone()),
            (vec![1.0; 3], vec![0.0; 3])
        );
        let angles = [3.0f64, 2.0, 2.0 * 0.01];
        for (k, a) in angles.iter().enumerate() {
            assert_eq!(cos[1][k], a.cos() as f32);
            assert_eq!(sin[1][k], a.sin() as f32);
        }
        // x (1, 1, 2, 6): pair k of position 1 rotated by angle k; position 0 unchanged.
        let x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, 2, 6), &Device::Cpu).unwrap();
        let (ct, st) = multi_axis_rotary_tables(&ids, &[2, 4], 10000.0, &Device::Cpu).unwrap();
        let out: Vec<f32> = apply_rotary_emb_pairs(&xt, &ct, &st)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&out[..6], &x[..6]);
        for (k, a) in angles.iter().enumerate() {
            let (re, im) = (x[6 + 2 * k] as f64, x[7 + 2 * k] as f64);
            assert!((out[6 + 2 * k] as f64 - (re * a.cos() - im * a.sin())).abs() < 1e-5);
            assert!((out[7 + 2 * k] as f64 - (im * a.cos() + re * a.sin())).abs() < 1e-5);
        }
    }
}
