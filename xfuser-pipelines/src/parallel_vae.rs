//! The patch-parallel VAE decode (`--use-parallel-vae`, xDiT's name): the latent image is cut
//! into bands of whole rows, one band per member of a process group, and every member runs the
//! whole decoder on its band, so that each holds about 1/N of every activation.
//!
//! What crosses the bands, and how:
//! - a 3×3 convolution (padding 1) reads one row above and one below each output row: before
//!   each one, members swap their edge rows with their neighbours (posted sends and receives,
//!   a "halo"); the first and last members read zero rows at the image's edges, as the
//!   serial padding does;
//! - GroupNorm's statistics are over the whole image: per-group sums are all-reduced (in f32),
//!   first for the mean, then the centred sums of squares for the variance (the same two-pass
//!   variance as candle's serial GroupNorm, so the results agree to f32 rounding);
//! - the mid-block attention attends over every pixel: each member keeps the queries of its
//!   own rows and gathers the keys and values of all rows (bands padded to the longest for the
//!   all-gather), and computes its scores a chunk of queries at a time, so the score matrix,
//!   the largest activation of a high-resolution serial decode, is never whole;
//! - nearest-neighbour upsampling and 1×1 convolutions need nothing from other rows; the
//!   upsampling is read by the convolution after it (an upsampled band's edge rows are the
//!   band's edge rows repeated, so the halo is exchanged before upsampling, half as wide).
//!
//! Rows are split as evenly as they go: member i of N gets `h / N` latent rows, and one more
//! when `i < h % N` (the first members carry the remainder); upsampling doubles every band, so
//! the same split holds at every resolution. Each member needs at least one latent row.
//!
//! The serial decode ([`crate::vae::AutoencoderKL::decode`]) is this decoder on one band, the
//! whole image ([`ParallelVaeDecoder::decode_whole`]).
//!
//! Why this decoder is written here, against diffusers' `AutoencoderKL` weight layout, rather
//! than reusing candle-transformers' Stable Diffusion VAE (kept as the independent reference
//! the tests and benchmarks compare with, [`crate::vae::AutoencoderKL::decode_candle`]):
//! candle's `Decoder` and its blocks are private, and its convolutions and norms run on a
//! whole tensor with no hook for exchanging halo rows or reducing statistics across ranks.
//! On one band it also serves the serial decode better than candle's: its 3×3 convolutions
//! go through [`xfuser_core::kernels::conv3x3`] (candle's CPU convolution is several
//! times slower), and its attention never holds the whole score matrix (16 GiB at 2048 px).
//! Its 1×1 convolutions ([`xfuser_core::kernels::conv1x1`]) and GroupNorms (with the SiLU
//! after them fused, [`xfuser_core::kernels::group_norm_apply`]) are f32 CPU kernels too;
//! the attention's projections and softmax are candle_nn's.

use candle_core::{DType, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module, VarBuilder};
use std::time::Duration;

use xfuser_core::distributed::{CommStats, LocalWorld, ProcessGroup};
use xfuser_core::kernels;
use xfuser_core::{Error, Result};

use crate::vae::VaeConfig;

/// candle's and diffusers' eps of every decoder GroupNorm (`resnet_eps`).
const NORM_EPS: f64 = 1e-6;

/// Bytes of attention scores computed at once (per query chunk): at 1024 px (16384 tokens)
/// the whole f32 score matrix would be 1 GiB, at 2048 px 16 GiB.
const SCORE_CHUNK_BYTES: usize = 64 << 20;

/// How the rows of an image of `total` rows are split over `parts` members: contiguous bands,
/// the first `total % parts` one row longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSplit {
    pub total: usize,
    pub parts: usize,
}

impl RowSplit {
    /// Refuses a split that would leave a member without rows.
    pub fn new(total: usize, parts: usize) -> Result<Self> {
        if parts == 0 || total < parts {
            return Err(Error::invalid(format!(
                "--use-parallel-vae: the latent image has {total} rows, fewer than the {parts} \
                 ranks that would decode it (each needs at least one row); use a larger \
                 --height or fewer ranks"
            )));
        }
        Ok(Self { total, parts })
    }

    /// Rows of member `i`.
    pub fn len(&self, i: usize) -> usize {
        self.total / self.parts + usize::from(i < self.total % self.parts)
    }

    /// First row of member `i`.
    pub fn start(&self, i: usize) -> usize {
        i * (self.total / self.parts) + i.min(self.total % self.parts)
    }

    /// The longest band.
    pub fn max_len(&self) -> usize {
        self.len(0)
    }

    /// The same split after a ×`factor` upsampling.
    pub fn scaled(&self, factor: usize) -> Self {
        Self {
            total: self.total * factor,
            parts: self.parts,
        }
    }
}

/// One member's view of a band-split image: its group and the current split.
struct Band<'a> {
    group: &'a ProcessGroup,
    split: RowSplit,
}

impl Band<'_> {
    /// The neighbours' edge rows just above and below this member's rows `x` (B, C, rows, W),
    /// each (B, C, 1, W); None at the image's edges (where a padding-1 convolution reads
    /// zeros). What a 3×3 convolution of the band reads besides the band.
    fn halo_rows(&self, x: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = x.dim(2)?;
        let (i, n) = (self.group.index(), self.group.size());
        // Receives are posted before the sends so that neither side waits on the other.
        let from_above = (i > 0).then(|| self.group.irecv(i - 1)).transpose()?;
        let from_below = (i + 1 < n).then(|| self.group.irecv(i + 1)).transpose()?;
        let mut sends = Vec::with_capacity(2);
        if i > 0 {
            sends.push(self.group.isend(&x.narrow(2, 0, 1)?.contiguous()?, i - 1)?);
        }
        if i + 1 < n {
            sends.push(
                self.group
                    .isend(&x.narrow(2, rows - 1, 1)?.contiguous()?, i + 1)?,
            );
        }
        let above = from_above.map(|r| r.wait()).transpose()?;
        let below = from_below.map(|r| r.wait()).transpose()?;
        for s in sends {
            s.wait()?;
        }
        Ok((above, below))
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        if self.group.size() == 1 {
            return Ok(t.clone());
        }
        self.group.all_reduce_sum(t)
    }

    /// The (B, T, C) tokens of every band, in row order, from this member's (B, rows·W, C):
    /// bands are padded to the longest so that the all-gather moves equal shapes.
    fn gather_tokens(&self, t: &Tensor, width: usize) -> Result<Tensor> {
        if self.group.size() == 1 {
            return Ok(t.clone());
        }
        let rows = self.split.len(self.group.index());
        let padded = t.pad_with_zeros(1, 0, (self.split.max_len() - rows) * width)?;
        let parts = self.group.all_gather_tensors(&padded)?;
        let parts = parts
            .iter()
            .enumerate()
            .map(|(j, p)| p.narrow(1, 0, self.split.len(j) * width))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn upsampled(&self) -> Self {
        Self {
            group: self.group,
            split: self.split.scaled(2),
        }
    }
}

/// A 3×3, padding-1 convolution on a band: [`kernels::conv3x3`] of the band's rows with its
/// neighbours' edge rows, upsampled first for an upsampler's.
struct BandConv(Conv2d);

impl BandConv {
    fn load(vb: VarBuilder, in_c: usize, out_c: usize) -> candle_core::Result<Self> {
        Ok(Self(candle_nn::conv2d(
            in_c,
            out_c,
            3,
            Conv2dConfig::default(),
            vb,
        )?))
    }

    /// The convolution of the band `x` of `band` (`upsample`: of `x` upsampled 2×; the
    /// caller then continues on the upsampled split).
    fn forward(&self, x: &Tensor, band: &Band, upsample: bool) -> Result<Tensor> {
        let (above, below) = band.halo_rows(x)?;
        let input = kernels::ConvInput {
            rows: x,
            above: above.as_ref(),
            below: below.as_ref(),
            upsample,
        };
        Ok(kernels::conv3x3(input, self.0.weight(), self.0.bias())?)
    }
}

/// GroupNorm over the whole image from a band: statistics all-reduced over the group.
struct BandGroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl BandGroupNorm {
    fn load(vb: VarBuilder, groups: usize, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
        })
    }

    /// The norm of the band `x`, then SiLU when `silu` (fused on the f32 CPU path).
    fn forward(&self, x: &Tensor, band: &Band, silu: bool) -> Result<Tensor> {
        let (_b, c, _rows, w) = x.dims4()?;
        let g = self.groups;
        let count = (c / g * band.split.total * w) as f64;
        let mean = (band.all_reduce(&kernels::group_sums(x, g, None)?)? / count)?;
        let var = (band.all_reduce(&kernels::group_sums(x, g, Some(&mean))?)? / count)?;
        Ok(kernels::group_norm_apply(
            x,
            g,
            &mean,
            &var,
            NORM_EPS,
            &self.weight,
            &self.bias,
            silu,
        )?)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct Resnet {
    norm1: BandGroupNorm,
    conv1: BandConv,
    norm2: BandGroupNorm,
    conv2: BandConv,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(vb: VarBuilder, groups: usize, in_c: usize, out_c: usize) -> candle_core::Result<Self> {
        let shortcut = (in_c != out_c)
            .then(|| {
                candle_nn::conv2d(
                    in_c,
                    out_c,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("conv_shortcut"),
                )
            })
            .transpose()?;
        Ok(Self {
            norm1: BandGroupNorm::load(vb.pp("norm1"), groups, in_c)?,
            conv1: BandConv::load(vb.pp("conv1"), in_c, out_c)?,
            norm2: BandGroupNorm::load(vb.pp("norm2"), groups, out_c)?,
            conv2: BandConv::load(vb.pp("conv2"), out_c, out_c)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, band: &Band) -> Result<Tensor> {
        // Reassigned, not shadowed: each step's input is freed as soon as its output exists
        // (shadowed values would all live to the end, several full-size activations).
        let mut h = self.norm1.forward(x, band, true)?;
        h = self.conv1.forward(&h, band, false)?;
        h = self.norm2.forward(&h, band, true)?;
        h = self.conv2.forward(&h, band, false)?;
        let skip = match &self.shortcut {
            Some(conv) => kernels::conv1x1(x, conv.weight(), conv.bias())?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// The mid-block's single-head self-attention over all pixels: local queries, gathered keys
/// and values.
struct Attention {
    norm: BandGroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

/// A (C, C) projection stored as a linear (diffusers today) or as a 1×1 convolution (older
/// checkpoints, e.g. SD3's original release).
fn projection(vb: VarBuilder, c: usize) -> candle_core::Result<Linear> {
    let weight = match vb.get((c, c), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
    };
    Ok(Linear::new(weight, Some(vb.get(c, "bias")?)))
}

impl Attention {
    fn load(vb: VarBuilder, groups: usize, c: usize) -> candle_core::Result<Self> {
        // diffusers' names, or the pre-0.14 ones of older checkpoints.
        let names = match vb.contains_tensor("to_q.weight") {
            true => ["to_q", "to_k", "to_v", "to_out.0"],
            false => ["query", "key", "value", "proj_attn"],
        };
        Ok(Self {
            norm: BandGroupNorm::load(vb.pp("group_norm"), groups, c)?,
            q: projection(vb.pp(names[0]), c)?,
            k: projection(vb.pp(names[1]), c)?,
            v: projection(vb.pp(names[2]), c)?,
            out: projection(vb.pp(names[3]), c)?,
        })
    }

    fn forward(&self, x: &Tensor, band: &Band) -> Result<Tensor> {
        let (b, c, rows, w) = x.dims4()?;
        let dtype = x.dtype();
        // (B, rows·W, C), contiguous: candle 0.11.1's batched matmul misreads a transposed
        // lhs (see `AutoencoderKL::decode`).
        let tokens = self
            .norm
            .forward(x, band, false)?
            .reshape((b, c, rows * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // Queries and keys are each scaled by C^-1/4 (so the product by C^-1/2), as candle's
        // and diffusers' VAE attention do.
        let scale = (c as f64).powf(-0.25);
        let q = (self.q.forward(&tokens)?.to_dtype(DType::F32)? * scale)?;
        let k = band.gather_tokens(&self.k.forward(&tokens)?, w)?;
        let v = band.gather_tokens(&self.v.forward(&tokens)?, w)?;
        let kt = (k.to_dtype(DType::F32)? * scale)?.t()?;
        let v = v.to_dtype(DType::F32)?;
        // Queries in chunks, so that a chunk's (queries × all keys) score matrix stays near
        // SCORE_CHUNK_BYTES whatever the image size; each query's softmax is over its own
        // row, so chunking changes no value.
        let (queries, keys) = (q.dim(1)?, kt.dim(2)?);
        let chunk = (SCORE_CHUNK_BYTES / (4 * keys * b)).max(1);
        let mut mixed = Vec::with_capacity(queries.div_ceil(chunk));
        for start in (0..queries).step_by(chunk) {
            let q = q.narrow(1, start, chunk.min(queries - start))?;
            let probs = candle_nn::ops::softmax(&q.matmul(&kt)?, D::Minus1)?;
            mixed.push(probs.matmul(&v)?.to_dtype(dtype)?);
        }
        drop((q, kt, v));
        let projected = self.out.forward(&Tensor::cat(&mixed, 1)?)?;
        let projected = projected
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, rows, w))?;
        Ok((projected + x)?)
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (except the last block) a ×2 nearest
/// upsampling and a 3×3 convolution.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample_conv: Option<BandConv>,
}

/// The decoder half of diffusers' `AutoencoderKL` (with its `post_quant_conv`), run on one band
/// of rows per member of a group.
pub struct ParallelVaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: BandConv,
    mid_resnets: Vec<Resnet>,
    mid_attention: Attention,
    up_blocks: Vec<UpBlock>,
    norm_out: BandGroupNorm,
    conv_out: BandConv,
    latent_channels: usize,
}

impl std::fmt::Debug for ParallelVaeDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelVaeDecoder")
            .field("up_blocks", &self.up_blocks.len())
            .finish_non_exhaustive()
    }
}

impl ParallelVaeDecoder {
    /// Builds the decoder from a VAE's weights (`vb` at the root of
    /// `diffusion_pytorch_model.safetensors`); `config` already validated.
    pub fn load(vb: VarBuilder, config: &VaeConfig) -> candle_core::Result<Self> {
        let groups = config.norm_num_groups;
        let channels = &config.block_out_channels;
        let top = *channels.last().unwrap_or(&0);
        let dec = vb.pp("decoder");
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| {
                let c = config.latent_channels;
                candle_nn::conv2d(c, c, 1, Conv2dConfig::default(), vb.pp("post_quant_conv"))
            })
            .transpose()?;
        let mid = dec.pp("mid_block");
        let mid_resnets = (0..2)
            .map(|i| Resnet::load(mid.pp("resnets").pp(i), groups, top, top))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid_attention = Attention::load(mid.pp("attentions").pp(0), groups, top)?;
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut in_c = top;
        for (i, &out_c) in reversed.iter().enumerate() {
            let vb = dec.pp("up_blocks").pp(i);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let from = if j == 0 { in_c } else { out_c };
                    Resnet::load(vb.pp("resnets").pp(j), groups, from, out_c)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample_conv = (i + 1 < reversed.len())
                .then(|| BandConv::load(vb.pp("upsamplers").pp(0).pp("conv"), out_c, out_c))
                .transpose()?;
            up_blocks.push(UpBlock {
                resnets,
                upsample_conv,
            });
            in_c = out_c;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: BandConv::load(dec.pp("conv_in"), config.latent_channels, top)?,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out: BandGroupNorm::load(dec.pp("conv_norm_out"), groups, channels[0])?,
            conv_out: BandConv::load(dec.pp("conv_out"), channels[0], config.out_channels)?,
            latent_channels: config.latent_channels,
        })
    }

    /// `vae.decode(z)` split over `group`: every member passes the same whole latents
    /// (B, latent_channels, h, w) and decodes its band of rows, one image at a time; member 0
    /// gets the whole (B, out_channels, h·f, w·f) image, the others None. Refuses a group
    /// with more members than latent rows.
    pub fn decode(&self, z: &Tensor, group: &ProcessGroup) -> Result<Option<Tensor>> {
        let (batch, c, h, _w) = z.dims4()?;
        if c != self.latent_channels {
            return Err(Error::invalid(format!(
                "parallel VAE decode: latents have {c} channels, latent_channels is {}",
                self.latent_channels
            )));
        }
        let split = RowSplit::new(h, group.size())?;
        let i = group.index();
        let mut images = Vec::with_capacity(batch);
        for entry in 0..batch {
            let band = z
                .narrow(0, entry, 1)?
                .narrow(2, split.start(i), split.len(i))?
                .contiguous()?;
            let rows = self.decode_band(&band, group, split)?;
            images.push(gather_to_first(&rows, group)?);
        }
        match i {
            0 => Ok(Some(Tensor::cat(
                &images.into_iter().flatten().collect::<Vec<_>>(),
                0,
            )?)),
            _ => Ok(None),
        }
    }

    /// `vae.decode(z)` in this process alone: the whole image as one band, on a group of one.
    pub fn decode_whole(&self, z: &Tensor) -> Result<Tensor> {
        // A one-member group never communicates (no neighbours, nothing to reduce); the
        // timeout is never waited on.
        let world = LocalWorld::new(1, Duration::from_secs(60));
        let mut comms = world.new_group("vae[0]", &[0])?;
        let comm = comms
            .pop()
            .ok_or_else(|| Error::invalid("no rank in a one-rank group"))?;
        let group = ProcessGroup::new("vae[0]", vec![0], 0, comm, CommStats::new())?;
        self.decode(z, &group)?
            .ok_or_else(|| Error::invalid("the one-member VAE decode returned no image"))
    }

    /// Decodes this member's band `z` (B, latent_channels, split.len(index), w) of a latent
    /// image split by `split` over `group`, returning its band of the image.
    pub fn decode_band(&self, z: &Tensor, group: &ProcessGroup, split: RowSplit) -> Result<Tensor> {
        let mut band = Band { group, split };
        let mut x = match &self.post_quant_conv {
            Some(conv) => kernels::conv1x1(z, conv.weight(), conv.bias())?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x, &band, false)?;
        x = self.mid_resnets[0].forward(&x, &band)?;
        x = self.mid_attention.forward(&x, &band)?;
        x = self.mid_resnets[1].forward(&x, &band)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, &band)?;
            }
            if let Some(conv) = &block.upsample_conv {
                x = conv.forward(&x, &band, true)?;
                band = band.upsampled();
            }
        }
        x = self.norm_out.forward(&x, &band, true)?;
        self.conv_out.forward(&x, &band, false)
    }
}

/// Every member's band, concatenated by rows on member 0 (None on the others).
fn gather_to_first(band: &Tensor, group: &ProcessGroup) -> Result<Option<Tensor>> {
    if group.index() != 0 {
        group.send(band, 0)?;
        return Ok(None);
    }
    let mut bands = Vec::with_capacity(group.size());
    bands.push(band.clone());
    for j in 1..group.size() {
        bands.push(group.recv(j)?);
    }
    Ok(Some(Tensor::cat(&bands, 2)?))
}

/// Which decode [`peak_activation_bytes`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKind {
    /// candle-transformers' decoder ([`AutoencoderKL::decode_candle`]), the reference.
    Candle,
    /// The band-split decode on this many ranks.
    Bands(usize),
}

/// Each rank's peak activation bytes while decoding `z` (one image is best: batch entries are
/// decoded one after the other), in rank order.
///
/// How it is measured: the program's global allocator must be
/// [`xfuser_core::alloc::TaggedAllocator`] (else this errors). Every rank runs on a rayon
/// pool of one thread (`RankThreads::Each(1)`), so all of its work (candle's kernels
/// included) allocates on that thread, whose allocations carry the rank's tag. A rank's peak
/// is the most bytes its thread had allocated and not yet freed during the decode, above what
/// it held when the decode began; the weights are loaded before (a band decode is run once
/// first for that), so they are not counted. Tensors that move between ranks travel by
/// reference and count for the rank that allocated them.
pub fn peak_activation_bytes(
    vae: &crate::vae::AutoencoderKL,
    z: &Tensor,
    kind: DecodeKind,
) -> Result<Vec<usize>> {
    use xfuser_core::alloc::{reset_peak, set_thread_tag, tag_stats, tagged_allocator_installed};
    use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh, RankThreads};
    if !tagged_allocator_installed() {
        return Err(Error::invalid(
            "peak_activation_bytes needs xfuser_core::alloc::TaggedAllocator as the program's \
             global allocator",
        ));
    }
    let ranks = match kind {
        DecodeKind::Candle => 1,
        DecodeKind::Bands(n) => n,
    };
    if ranks + 1 >= xfuser_core::alloc::MAX_TAGS {
        return Err(Error::invalid(format!(
            "peak_activation_bytes: {ranks} ranks, at most {} are counted",
            xfuser_core::alloc::MAX_TAGS - 2
        )));
    }
    if kind != DecodeKind::Candle {
        vae.parallel_decoder()?;
    }
    let mesh = RankMesh::new(&xfuser_core::engine::ParallelConfig {
        ulysses_degree: ranks,
        ..Default::default()
    })?;
    let options = LaunchOptions {
        threads: RankThreads::Each(1),
        ..LaunchOptions::default()
    };
    launch_local(&mesh, &options, |ctx| {
        let tag = ctx.rank() + 1;
        set_thread_tag(tag);
        reset_peak(tag);
        let (start, _) = tag_stats(tag);
        let image = match kind {
            DecodeKind::Candle => Some(vae.decode_candle(z)?),
            DecodeKind::Bands(_) => vae.decode_parallel(z, ctx.world())?,
        };
        let (_, peak) = tag_stats(tag);
        drop(image);
        set_thread_tag(0);
        Ok(peak.saturating_sub(start))
    })
}
