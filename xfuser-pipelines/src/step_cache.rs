//! Step caches: skipping transformer work on denoising steps where it barely changes, once for
//! every registered backbone (they need only the `embed` / `blocks` / `head` split of the
//! contract, and TeaCache the backbone's `modulated_input`).
//!
//! First-Block-Cache ([`FirstBlockCache`]): every step runs `embed` and the first block. The
//! first block's residual (its output minus its input) is compared with the one of the last
//! fully computed step; when the relative L1 change, Σ|r − r_prev| / Σ|r_prev|, is below the
//! threshold, the step adds the cached residual of the remaining blocks instead of running
//! them, then runs the head. A computed step refreshes both residuals.
//!
//! TeaCache ([`TeaCache`]): every step runs `embed` and asks the backbone for the first
//! block's timestep-modulated input (no block runs). Its relative L1 change since the previous
//! step, rescaled by the model's TeaCache polynomial where one is known, is added to a running
//! sum; while the sum stays below the threshold the step adds the cached residual of all the
//! blocks instead of running them, otherwise it runs them, refreshes the residual and resets
//! the sum. The first and the last step always run, as in TeaCache and xDiT.
//!
//! Every rank that works on the same images takes the same decision: the two sums of the
//! relative change are all-reduced over the sequence-parallel group (each rank holds a slice of
//! the tokens; padding tokens are left out) and the CFG-parallel group (each rank holds one half
//! of the guided batch), so no rank skips a block in which its peers exchange. Serial CFG runs
//! both halves in one batch, so they share the decision too. The tensor-parallel group's ranks
//! hold the same (replicated) activations and so measure the same change; their sums are
//! all-reduced too, so that a backend whose all-reduce rounds differently per rank cannot make
//! one tp rank skip the blocks in which the others all-reduce (both sums grow T-fold, so the
//! ratio stays the same up to rounding). With threshold 0 nothing is ever reused and the
//! result is the uncached one.

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{Backbone, BackboneInputs, ForwardContext};
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::engine::{CacheStats, StepCache, StepCacheKind};
use xfuser_core::{Error, Result};

/// A step cache over one denoising loop: one forward of the backbone per step, some of its
/// blocks replaced by a cached residual.
pub trait StepCacher {
    /// The forward of step `step` (0-based) of `steps`.
    fn forward(
        &mut self,
        backbone: &dyn Backbone,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
        step: usize,
        steps: usize,
    ) -> Result<Tensor>;

    /// Steps seen and steps whose blocks all ran.
    fn stats(&self) -> CacheStats;
}

/// The cache `config` names, its decisions agreed over `groups` (groups of one rank are
/// ignored).
pub fn step_cacher(config: &StepCache, groups: &[&ProcessGroup]) -> Result<Box<dyn StepCacher>> {
    Ok(cacher(
        config.kind,
        Agreement::new(config.threshold, groups)?,
    ))
}

fn cacher(kind: StepCacheKind, agreement: Agreement) -> Box<dyn StepCacher> {
    match kind {
        StepCacheKind::FirstBlock => Box::new(FirstBlockCache::with(agreement)),
        StepCacheKind::TeaCache => Box::new(TeaCache::with(agreement)),
    }
}

/// Benchmark aid: the cache `config` names, with its decisions taken from `computed` (step i
/// runs every block when `computed[i]`; steps past its end run them too) instead of the
/// threshold, still computing everything the cache computes to decide. On random weights the
/// measured change is meaningless, so a benchmark of the cache's speed replays the pattern a
/// trained model chose. Not for real runs: the result depends on the pattern, not the model.
pub fn step_cacher_with_pattern(
    config: &StepCache,
    computed: Vec<bool>,
) -> Result<Box<dyn StepCacher>> {
    let mut agreement = Agreement::new(config.threshold, &[])?;
    agreement.pattern = Some(computed);
    Ok(cacher(config.kind, agreement))
}

/// The threshold and the groups whose ranks must take the same decision (sp, cfg, tp).
struct Agreement {
    threshold: f64,
    groups: Vec<ProcessGroup>,
    /// Set by [`step_cacher_with_pattern`]: the steps that run every block.
    pattern: Option<Vec<bool>>,
}

impl Agreement {
    fn new(threshold: f64, groups: &[&ProcessGroup]) -> Result<Self> {
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
            pattern: None,
        })
    }

    /// `decided` (true: reuse the cache at step `step`), unless a pattern overrides it.
    fn decide(&self, step: usize, decided: bool) -> bool {
        match &self.pattern {
            Some(pattern) => !pattern.get(step).copied().unwrap_or(true),
            None => decided,
        }
    }

    /// Σ|current − previous| / Σ|previous| over the real tokens of every rank that shares the
    /// decision; None when the previous tensor is all zeros.
    fn relative_l1(
        &self,
        previous: &Tensor,
        current: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<Option<f64>> {
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
        Ok((sums[1] > 0.0).then(|| sums[0] / sums[1]))
    }
}

/// The state of a First-Block-Cache over one denoising loop.
pub struct FirstBlockCache {
    agreement: Agreement,
    /// The first block's residual at the last fully computed step.
    first_residual: Option<Tensor>,
    /// The residual of the remaining blocks at that step.
    rest_residual: Option<Tensor>,
    stats: CacheStats,
}

impl FirstBlockCache {
    fn with(agreement: Agreement) -> Self {
        Self {
            agreement,
            first_residual: None,
            rest_residual: None,
            stats: CacheStats {
                computed: 0,
                steps: 0,
            },
        }
    }
}

impl StepCacher for FirstBlockCache {
    fn stats(&self) -> CacheStats {
        self.stats
    }

    /// One forward of `backbone`, its blocks after the first reused when the first block's
    /// residual barely changed.
    fn forward(
        &mut self,
        backbone: &dyn Backbone,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
        step: usize,
        _steps: usize,
    ) -> Result<Tensor> {
        self.stats.steps += 1;
        let layers = backbone.info().num_layers;
        let embedded = backbone.embed(inputs, ctx)?;
        let before = embedded.hidden.clone();
        let mut state = backbone.blocks(embedded, 0..1, ctx)?;
        let residual = (&state.hidden - &before)?;
        let reuse = match (&self.first_residual, &self.rest_residual) {
            (Some(previous), Some(rest)) if layers > 1 => {
                let change = self.agreement.relative_l1(previous, &residual, ctx)?;
                let below = change.is_some_and(|c| c < self.agreement.threshold);
                self.agreement.decide(step, below).then(|| rest.clone())
            }
            _ => None,
        };
        tracing::debug!(step, reuse = reuse.is_some(), "first-block cache");
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
}

/// The state of a TeaCache over one denoising loop.
pub struct TeaCache {
    agreement: Agreement,
    /// The first block's modulated input at the previous step.
    previous_input: Option<Tensor>,
    /// The residual of all the blocks at the last fully computed step.
    residual: Option<Tensor>,
    /// The rescaled relative changes summed since the last fully computed step.
    accumulated: f64,
    stats: CacheStats,
}

impl TeaCache {
    fn with(agreement: Agreement) -> Self {
        Self {
            agreement,
            previous_input: None,
            residual: None,
            accumulated: 0.0,
            stats: CacheStats {
                computed: 0,
                steps: 0,
            },
        }
    }

    /// Whether this step reuses the residual: never on the first and the last step, nor with
    /// threshold 0; otherwise while the running sum stays below the threshold.
    fn reuse(
        &mut self,
        backbone: &dyn Backbone,
        modulated: &Tensor,
        ctx: &ForwardContext,
        last: bool,
    ) -> Result<bool> {
        let threshold = self.agreement.threshold;
        let (Some(previous), Some(_)) = (&self.previous_input, &self.residual) else {
            return Ok(false);
        };
        if last || threshold <= 0.0 {
            return Ok(false);
        }
        let Some(change) = self.agreement.relative_l1(previous, modulated, ctx)? else {
            return Ok(false);
        };
        let rescaled = match backbone.teacache_coefficients() {
            Some(coefficients) => polynomial(coefficients, change),
            None => change,
        };
        let sum = self.accumulated + rescaled;
        if sum < threshold {
            self.accumulated = sum;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// `c[0]·x^(n−1) + … + c[n−1]` (Horner).
fn polynomial(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

impl StepCacher for TeaCache {
    fn stats(&self) -> CacheStats {
        self.stats
    }

    /// One forward of `backbone`, every block replaced by the cached residual while the
    /// modulated input has changed little since the last computed step.
    fn forward(
        &mut self,
        backbone: &dyn Backbone,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
        step: usize,
        steps: usize,
    ) -> Result<Tensor> {
        self.stats.steps += 1;
        let embedded = backbone.embed(inputs, ctx)?;
        let modulated = backbone.modulated_input(&embedded, ctx)?.ok_or_else(|| {
            Error::Unsupported(format!(
                "--use-teacache: {} does not expose its first block's modulated input \
                     (Backbone::modulated_input), which TeaCache compares between steps; use \
                     --use-fbcache",
                backbone.info().class_name
            ))
        })?;
        let reuse = self.reuse(backbone, &modulated, ctx, step + 1 >= steps)?;
        let reuse = self.residual.is_some() && self.agreement.decide(step, reuse);
        tracing::debug!(step, reuse, accumulated = self.accumulated, "teacache");
        self.previous_input = Some(modulated);
        let state = match (reuse, &self.residual) {
            (true, Some(residual)) => {
                let mut state = embedded;
                state.hidden = (&state.hidden + residual)?;
                state
            }
            _ => {
                self.accumulated = 0.0;
                let before = embedded.hidden.clone();
                let layers = backbone.info().num_layers;
                let state = backbone.blocks(embedded, 0..layers, ctx)?;
                self.residual = Some((&state.hidden - &before)?);
                self.stats.computed += 1;
                state
            }
        };
        backbone.head(state, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::polynomial;

    #[test]
    fn polynomial_is_highest_power_first() {
        // 2x² − 3x + 1 at 0, 1, 2.
        let c = [2.0, -3.0, 1.0];
        assert_eq!(polynomial(&c, 0.0), 1.0);
        assert_eq!(polynomial(&c, 1.0), 0.0);
        assert_eq!(polynomial(&c, 2.0), 3.0);
    }
}
