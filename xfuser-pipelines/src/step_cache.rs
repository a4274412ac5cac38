//! Step caches: skipping transformer work on denoising steps where it barely changes, once for
//! every registered backbone (it only needs the `embed` / `blocks` / `head` split of the
//! contract).
//!
//! First-Block-Cache ([`FirstBlockCache`]): every step runs `embed` and the first block. The
//! first block's residual (its output minus its input) is compared with the one of the last
//! fully computed step; when the relative L1 change, Σ|r − r_prev| / Σ|r_prev|, is below the
//! threshold, the step adds the cached residual of the remaining blocks instead of running
//! them, then runs the head. A computed step refreshes both residuals.
//!
//! Every rank that works on the same images takes the same decision: the two sums are
//! all-reduced over the sequence-parallel group (each rank holds a slice of the tokens; padding
//! tokens are left out) and the CFG-parallel group (each rank holds one half of the guided
//! batch), so no rank skips a block in which its peers exchange. Serial CFG runs both halves
//! in one batch, so they share the decision too. With threshold 0 nothing is ever reused and
//! the result is the uncached one.

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{Backbone, BackboneInputs, ForwardContext};
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::engine::CacheStats;
use xfuser_core::{Error, Result};

/// The state of a First-Block-Cache over one denoising loop.
pub struct FirstBlockCache {
    threshold: f64,
    /// The groups whose ranks must take the same decision (sp, cfg), when larger than one.
    groups: Vec<ProcessGroup>,
    /// The first block's residual at the last fully computed step.
    first_residual: Option<Tensor>,
    /// The residual of the remaining blocks at that step.
    rest_residual: Option<Tensor>,
    stats: CacheStats,
}

impl FirstBlockCache {
    /// A cache with `threshold` whose decisions are agreed over `groups` (groups of one rank
    /// are ignored).
    pub fn new(threshold: f64, groups: &[&ProcessGroup]) -> Result<Self> {
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(Error::invalid(format!(
                "--cache-threshold {threshold}: must be a finite number ≥ 0"
            )));
        }
        Ok(Self {
            threshold,
            groups: groups
                .iter()
                .filter(|g| g.size() > 1)
                .map(|g| (*g).clone())
                .collect(),
            first_residual: None,
            rest_residual: None,
            stats: CacheStats {
                computed: 0,
                steps: 0,
            },
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// One forward of `backbone`, its blocks after the first reused when the first block's
    /// residual barely changed.
    pub fn forward(
        &mut self,
        backbone: &dyn Backbone,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        self.stats.steps += 1;
        let layers = backbone.info().num_layers;
        let embedded = backbone.embed(inputs, ctx)?;
        let before = embedded.hidden.clone();
        let mut state = backbone.blocks(embedded, 0..1, ctx)?;
        let residual = (&state.hidden - &before)?;
        let reuse = match (&self.first_residual, &self.rest_residual) {
            (Some(previous), Some(rest)) if layers > 1 => self
                .barely_changed(previous, &residual, ctx)?
                .then(|| rest.clone()),
            _ => None,
        };
        let state = match reuse {
            Some(rest) => {
                state.hidden = (&state.hidden + rest)?;
                state
            }
            None => {
                let after_first = state.hidden.clone();
                let state = backbone.blocks(state, 1..layers, ctx)?;
                self.rest_residual = Some((&state.hidden - &after_first)?);
                self.first_residual = Some(residual);
                self.stats.computed += 1;
                state
            }
        };
        backbone.head(state, ctx)
    }

    /// Σ|current − previous| / Σ|previous| < threshold, over the real tokens of every rank
    /// that shares the decision.
    fn barely_changed(
        &self,
        previous: &Tensor,
        current: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<bool> {
        let (previous, current) = match &ctx.sp {
            Some(sp) => {
                let real = sp.slice().tokens.len;
                (previous.narrow(1, 0, real)?, current.narrow(1, 0, real)?)
            }
            None => (previous.clone(), current.clone()),
        };
        let sum_abs = |t: &Tensor| -> Result<f64> {
            Ok(t.abs()?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        let change = sum_abs(&(&current - &previous)?)?;
        let size = sum_abs(&previous)?;
        let mut sums = Tensor::new(&[change, size], &Device::Cpu)?;
        for group in &self.groups {
            sums = group.all_reduce_sum(&sums)?;
        }
        let sums: Vec<f64> = sums.to_vec1()?;
        Ok(sums[1] > 0.0 && sums[0] / sums[1] < self.threshold)
    }
}
