//! Per-shape runtime metadata: how the latent image's tokens split over the sequence-parallel
//! ranks and into PipeFusion patches. Everything that splits or joins a sequence reads these
//! numbers; nothing recomputes them.
//!
//! Tokens are the latent image's patch_size × patch_size cells in row-major order; the grid
//! has `grid_height` rows of `grid_width` tokens. Splits are by whole token rows, so that each
//! rank can patch-embed (and unpatchify) its own latent rows.
//!
//! **Sequence-parallel split.** A run of rows split over the S sp ranks gives every rank
//! `ceil(rows / S)` rows, the first ranks full, the rest short or empty. Every rank's buffer
//! holds that many rows (its `padded_len` tokens, the same on all ranks, as all-to-all and
//! all-gather need); a short rank's real tokens come first, then padding. Gathered in rank
//! order the padded sequence is therefore all real tokens then all padding: attention masks
//! keys at gathered positions ≥ the number of real tokens (under Ring: the last
//! `padded_len − len` keys of a slice). xDiT refuses sizes that sp does not divide; we pad.
//!
//! **PipeFusion patches.** The M patches are contiguous runs of token rows, each a multiple of
//! S rows (patch_size·S latent rows) except the last, which takes what is left; sizes differ by
//! at most S rows, the larger first. Each patch splits over the sp ranks as above, so only the
//! last patch can carry padding. With M = 1 the one patch is the whole image.

use std::ops::Range;

use super::mesh::{Axis, RankMesh};
use crate::{Error, Result};

/// A range of tokens: `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    pub start: usize,
    pub len: usize,
}

impl TokenRange {
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.end()
    }
}

/// One sp rank's share of a patch (or of the whole image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpSlice {
    pub sp_rank: usize,
    /// Token rows of the image, global.
    pub token_rows: Range<usize>,
    /// Latent rows of the image: `token_rows` · patch_size.
    pub latent_rows: Range<usize>,
    /// Tokens of the image, global (row-major).
    pub tokens: TokenRange,
    /// The same tokens relative to the patch's first token.
    pub in_patch: TokenRange,
    /// Tokens this rank's buffer holds: `tokens.len` real ones, then `padding()` padding.
    /// The same on every sp rank of the patch.
    pub padded_len: usize,
}

impl SpSlice {
    pub fn padding(&self) -> usize {
        self.padded_len - self.tokens.len
    }
}

/// A contiguous run of token rows and its split over the sp ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub index: usize,
    pub token_rows: Range<usize>,
    pub latent_rows: Range<usize>,
    pub tokens: TokenRange,
    /// One per sp rank, in sp order.
    pub slices: Vec<SpSlice>,
}

impl Patch {
    /// The length of the patch's sequence gathered over the sp ranks, padding included:
    /// positions from `tokens.len` on are padding.
    pub fn padded_len(&self) -> usize {
        self.slices.iter().map(|s| s.padded_len).sum()
    }
}

/// Everything derived from one input shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMetadata {
    pub height: usize,
    pub width: usize,
    pub batch_size: usize,
    pub num_inference_steps: usize,
    pub vae_scale_factor: usize,
    pub patch_size: usize,
    pub sp_degree: usize,
    pub latent_height: usize,
    pub latent_width: usize,
    pub grid_height: usize,
    pub grid_width: usize,
    /// grid_height · grid_width.
    pub num_tokens: usize,
    /// The whole image split over the sp ranks (synchronous steps: warmup, pure SP).
    pub full: Patch,
    /// The PipeFusion patches, in order.
    pub patches: Vec<Patch>,
}

/// The degrees and model constants the metadata depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeParams {
    pub sp_degree: usize,
    pub num_pipeline_patch: usize,
    pub patch_size: usize,
    pub vae_scale_factor: usize,
}

/// Splits the token rows `rows` over `sp` ranks, `ceil(len / sp)` rows to a rank.
fn split_rows(
    index: usize,
    rows: Range<usize>,
    sp: usize,
    params: &ShapeParams,
    grid_width: usize,
) -> Patch {
    let per_rank = rows.len().div_ceil(sp);
    let slices = (0..sp)
        .map(|k| {
            let start = (rows.start + k * per_rank).min(rows.end);
            let end = (start + per_rank).min(rows.end);
            SpSlice {
                sp_rank: k,
                token_rows: start..end,
                latent_rows: start * params.patch_size..end * params.patch_size,
                tokens: TokenRange {
                    start: start * grid_width,
                    len: (end - start) * grid_width,
                },
                in_patch: TokenRange {
                    start: (start - rows.start) * grid_width,
                    len: (end - start) * grid_width,
                },
                padded_len: per_rank * grid_width,
            }
        })
        .collect();
    Patch {
        index,
        latent_rows: rows.start * params.patch_size..rows.end * params.patch_size,
        tokens: TokenRange {
            start: rows.start * grid_width,
            len: rows.len() * grid_width,
        },
        token_rows: rows,
        slices,
    }
}

/// The metadata of an image of `height` × `width` pixels: a pure function of the shape and
/// `params`.
pub fn input_metadata(
    height: usize,
    width: usize,
    batch_size: usize,
    num_inference_steps: usize,
    params: &ShapeParams,
) -> Result<InputMetadata> {
    let ShapeParams {
        sp_degree: sp,
        num_pipeline_patch: m,
        patch_size,
        vae_scale_factor: vae,
    } = *params;
    if sp == 0 || m == 0 || patch_size == 0 || vae == 0 {
        return Err(Error::invalid(format!(
            "shape parameters must be positive: {params:?}"
        )));
    }
    let multiple = vae * patch_size;
    for (flag, v) in [("--height", height), ("--width", width)] {
        if v == 0 || !v.is_multiple_of(multiple) {
            return Err(Error::invalid(format!(
                "{flag} {v} must be a positive multiple of {multiple} (VAE scale factor {vae} × \
                 patch size {patch_size})"
            )));
        }
    }
    let (latent_height, latent_width) = (height / vae, width / vae);
    let (grid_height, grid_width) = (latent_height / patch_size, latent_width / patch_size);

    // A unit is sp token rows: the granularity of patches.
    let units = grid_height.div_ceil(sp);
    if m > units {
        return Err(Error::invalid(format!(
            "--num-pipeline-patch {m} is more than the {units} patches of {} latent rows \
             (patch size {patch_size} × sp degree {sp}) that a {height}-pixel-high image has; \
             use at most {units} or a taller image",
            patch_size * sp
        )));
    }
    let mut patches = Vec::with_capacity(m);
    let mut unit_start = 0;
    for p in 0..m {
        let n_units = units / m + usize::from(p < units % m);
        let rows =
            (unit_start * sp).min(grid_height)..((unit_start + n_units) * sp).min(grid_height);
        patches.push(split_rows(p, rows, sp, params, grid_width));
        unit_start += n_units;
    }
    Ok(InputMetadata {
        height,
        width,
        batch_size,
        num_inference_steps,
        vae_scale_factor: vae,
        patch_size,
        sp_degree: sp,
        latent_height,
        latent_width,
        grid_height,
        grid_width,
        num_tokens: grid_height * grid_width,
        full: split_rows(0, 0..grid_height, sp, params, grid_width),
        patches,
    })
}

/// The runtime state of a rank: shape parameters fixed at build time and the metadata of the
/// current input shape, computed once per shape.
#[derive(Debug, Clone)]
pub struct RuntimeState {
    params: ShapeParams,
    input: Option<InputMetadata>,
}

impl RuntimeState {
    /// The state for `mesh`, a backbone of `patch_size` and a VAE of `vae_scale_factor`;
    /// `num_pipeline_patch` defaults to the PipeFusion degree (xDiT's default).
    pub fn new(
        mesh: &RankMesh,
        patch_size: usize,
        vae_scale_factor: usize,
        num_pipeline_patch: Option<usize>,
    ) -> Self {
        Self::with_params(ShapeParams {
            sp_degree: mesh.degree(Axis::Sp),
            num_pipeline_patch: num_pipeline_patch.unwrap_or(mesh.degree(Axis::Pp)),
            patch_size,
            vae_scale_factor,
        })
    }

    pub fn with_params(params: ShapeParams) -> Self {
        Self {
            params,
            input: None,
        }
    }

    pub fn params(&self) -> &ShapeParams {
        &self.params
    }

    /// Computes the metadata of this input shape, or keeps it when the shape is unchanged.
    pub fn set_input_parameters(
        &mut self,
        height: usize,
        width: usize,
        batch_size: usize,
        num_inference_steps: usize,
    ) -> Result<&InputMetadata> {
        let same = self.input.as_ref().is_some_and(|m| {
            (m.height, m.width, m.batch_size, m.num_inference_steps)
                == (height, width, batch_size, num_inference_steps)
        });
        if !same {
            let metadata =
                input_metadata(height, width, batch_size, num_inference_steps, &self.params)?;
            self.input = Some(metadata);
        }
        Ok(self.input.as_ref().expect("just set"))
    }

    /// The metadata of the last [`set_input_parameters`](Self::set_input_parameters).
    pub fn input(&self) -> Option<&InputMetadata> {
        self.input.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sp: usize, m: usize, patch: usize) -> ShapeParams {
        ShapeParams {
            sp_degree: sp,
            num_pipeline_patch: m,
            patch_size: patch,
            vae_scale_factor: 8,
        }
    }

    /// Invariants every patch satisfies: slices tile the patch's rows in order, real tokens
    /// first, equal padded lengths, padding only after every real token.
    fn check_patch(p: &Patch, grid_width: usize, patch_size: usize) {
        let mut row = p.token_rows.start;
        let padded = p.slices[0].padded_len;
        let mut seen_short = false;
        for (k, s) in p.slices.iter().enumerate() {
            assert_eq!(s.sp_rank, k);
            assert_eq!(s.token_rows.start, row);
            row = s.token_rows.end;
            assert_eq!(s.padded_len, padded);
            assert_eq!(s.tokens.len, s.token_rows.len() * grid_width);
            assert_eq!(s.tokens.start, s.token_rows.start * grid_width);
            assert_eq!(s.in_patch.start, s.tokens.start - p.tokens.start);
            assert_eq!(s.latent_rows.start, s.token_rows.start * patch_size);
            assert_eq!(s.latent_rows.len(), s.token_rows.len() * patch_size);
            if seen_short {
                assert_eq!(s.tokens.len, 0, "padding must come after all real tokens");
            }
            seen_short |= s.padding() > 0;
        }
        assert_eq!(row, p.token_rows.end);
        assert_eq!(p.tokens.len, p.token_rows.len() * grid_width);
    }

    #[test]
    fn even_split_has_no_padding() {
        // 256 px, patch 2: latent 32, grid 16 × 16; sp 4, 2 patches.
        let m = input_metadata(256, 256, 1, 20, &params(4, 2, 2)).unwrap();
        assert_eq!(
            (m.latent_height, m.grid_height, m.num_tokens),
            (32, 16, 256)
        );
        check_patch(&m.full, 16, 2);
        let lens: Vec<_> = m
            .full
            .slices
            .iter()
            .map(|s| (s.tokens.start, s.tokens.len, s.padded_len))
            .collect();
        assert_eq!(
            lens,
            vec![(0, 64, 64), (64, 64, 64), (128, 64, 64), (192, 64, 64)]
        );
        assert_eq!(m.patches.len(), 2);
        assert_eq!(m.patches[0].token_rows, 0..8);
        assert_eq!(m.patches[1].token_rows, 8..16);
        for p in &m.patches {
            check_patch(p, 16, 2);
            assert!(p
                .slices
                .iter()
                .all(|s| s.tokens.len == 32 && s.padding() == 0));
            assert_eq!(
                p.latent_rows.len() % (2 * 4),
                0,
                "a multiple of patch_size · sp"
            );
        }
        assert_eq!(
            m.patches[1].slices[3].tokens,
            TokenRange {
                start: 224,
                len: 32
            }
        );
        assert_eq!(
            m.patches[1].slices[3].in_patch,
            TokenRange { start: 96, len: 32 }
        );
    }

    #[test]
    fn uneven_split_pads_the_last_ranks() {
        // 80 px, patch 2: latent 10 × 10, grid 5 × 5; sp 4: ceil(5/4) = 2 rows per rank.
        let m = input_metadata(80, 80, 2, 10, &params(4, 1, 2)).unwrap();
        assert_eq!((m.grid_height, m.grid_width, m.num_tokens), (5, 5, 25));
        check_patch(&m.full, 5, 2);
        let rows: Vec<_> = m
            .full
            .slices
            .iter()
            .map(|s| (s.token_rows.clone(), s.padding()))
            .collect();
        assert_eq!(rows, vec![(0..2, 0), (2..4, 0), (4..5, 5), (5..5, 10)]);
        assert_eq!(m.full.padded_len(), 40);
        assert_eq!(m.patches, vec![m.full.clone()]);
    }

    #[test]
    fn pipefusion_patches_are_multiples_of_sp_rows() {
        // grid 13 rows, sp 2: 7 units of 2 rows (the last one short), 3 patches: 3, 2, 2 units.
        let m = input_metadata(208, 64, 1, 20, &params(2, 3, 2)).unwrap();
        assert_eq!((m.grid_height, m.grid_width), (13, 4));
        let rows: Vec<_> = m.patches.iter().map(|p| p.token_rows.clone()).collect();
        assert_eq!(rows, vec![0..6, 6..10, 10..13]);
        for p in &m.patches {
            check_patch(p, 4, 2);
        }
        let last = &m.patches[2];
        assert_eq!(last.slices[0].token_rows, 10..12);
        assert_eq!(last.slices[1].token_rows, 12..13);
        assert_eq!(last.slices[1].padding(), 4);
        assert_eq!(last.padded_len(), 16);
        assert_eq!(
            m.patches.iter().map(|p| p.tokens.len).sum::<usize>(),
            m.num_tokens
        );
    }

    #[test]
    fn errors_say_what_to_change() {
        let msg = input_metadata(100, 256, 1, 20, &params(1, 1, 2))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--height 100 must be a positive multiple of 16"),
            "{msg}"
        );
        let msg = input_metadata(64, 64, 1, 20, &params(2, 4, 2))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--num-pipeline-patch 4"), "{msg}");
        assert!(msg.contains("use at most 2"), "{msg}");
    }

    #[test]
    fn set_input_parameters_caches_per_shape() {
        let mesh = RankMesh::new(&crate::engine::ParallelConfig {
            pipefusion_parallel_degree: 2,
            ulysses_degree: 2,
            ..Default::default()
        })
        .unwrap();
        let mut state = RuntimeState::new(&mesh, 2, 8, None);
        assert_eq!(state.params().num_pipeline_patch, 2);
        let a = state.set_input_parameters(256, 256, 1, 20).unwrap().clone();
        assert_eq!(a.patches.len(), 2);
        assert_eq!(state.set_input_parameters(256, 256, 1, 20).unwrap(), &a);
        let b = state.set_input_parameters(512, 256, 1, 20).unwrap();
        assert_eq!(b.grid_height, 32);
        assert_eq!(state.input().unwrap().height, 512);
    }
}
