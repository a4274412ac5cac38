//! Image classification on LiBai's 3-D parallel layout (dp × tp × pp), for any classifier in
//! the registry (`ClassifierEntry`, keyed by `architectures[0]` of `config.json`).
//!
//! - Data parallel: the images split over the dp groups, contiguously, the first groups one
//!   more when the degree does not divide them; the groups never communicate.
//! - Pipeline parallel: the encoder layers split into P stages (even, the first stages one
//!   more), the embedding on the first and the head on the last. A dp group's images flow
//!   through the stages as micro-batches of one image: stage s sends each micro-batch's hidden
//!   states to stage s+1 with the pp group's `isend` as soon as it is done and goes on to the
//!   next, so the stages work on different images at once.
//! - Tensor parallel: each stage's layers are split over T ranks (the model decides how; ViT:
//!   q/k/v and fc1 column-parallel, the output projections row-parallel). A pp group pairs
//!   equal tp positions, so every tp rank of a stage sends its (replicated) hidden states to
//!   the same tp rank of the next.
//!
//! The P·T model parts are loaded once, before the ranks start, each with only its stage's
//! weights and its tp shard, and shared by the ranks of every dp group. See docs/vit.md.

use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;
use xfuser_core::backbone::PipelineStage;
use xfuser_core::classifier::{check_degrees, ImageClassifier};
use xfuser_core::distributed::{launch_local, CommStats, LaunchOptions, RankContext, RankMesh};
use xfuser_core::engine::{ParallelConfig, RgbImage};
use xfuser_core::registry::{classifier_of, LoadOptions};
use xfuser_core::{Error, Result};
use xfuser_layers::tensor_parallel::TpRank;

use crate::image_processing::ImageProcessor;

/// The logits of every image, in input order, and the name of each image's top-1 label.
#[derive(Debug, Clone)]
pub struct Classification {
    /// One row of `labels` logits per image.
    pub logits: Vec<Vec<f32>>,
    pub labels: Vec<String>,
    /// What the ranks sent, per group and op.
    pub comm_stats: CommStats,
}

/// Keeps the registrations of the stock classifiers in every binary that classifies: they
/// are reached only through the registry, by name (see
/// [`crate::link_stock_registrations`]).
pub fn link_stock_classifiers() {
    std::hint::black_box(
        xfuser_transformers::vit::ViTForImageClassification::load as fn(_, _) -> _,
    );
}

/// The degrees classification uses: data (`data_parallel_degree`), tensor
/// (`tensor_parallel_degree`) and pipeline (`pipefusion_parallel_degree`, named
/// `--pipeline-parallel-degree` on the command line); the others must be off.
pub fn check_parallel(parallel: &ParallelConfig) -> Result<()> {
    let used = [
        ("--data-parallel-degree", parallel.data_parallel_degree),
        ("--tensor-parallel-degree", parallel.tensor_parallel_degree),
        (
            "--pipeline-parallel-degree",
            parallel.pipefusion_parallel_degree,
        ),
    ];
    if let Some((flag, _)) = used.iter().find(|(_, d)| *d == 0) {
        return Err(Error::invalid(format!(
            "{flag} 0: every parallel degree must be at least 1 (1 turns the method off)"
        )));
    }
    let unused = [
        ("--use-cfg-parallel", parallel.cfg_degree()),
        ("--ulysses-degree", parallel.ulysses_degree),
        ("--ring-degree", parallel.ring_degree),
    ];
    if let Some((flag, _)) = unused.iter().find(|(_, d)| *d != 1) {
        return Err(Error::invalid(format!(
            "{flag}: classification parallelizes over data, tensor and pipeline degrees only"
        )));
    }
    if parallel.attn_layer_num_for_pp.is_some() {
        return Err(Error::invalid(
            "classification splits the layers evenly over the pipeline stages; per-stage layer \
             counts are not supported",
        ));
    }
    RankMesh::new(parallel)?;
    Ok(())
}

/// The images of each of `groups` dp groups: contiguous ranges of `n`, the first `n % groups`
/// groups one image more.
pub fn data_parallel_ranges(n: usize, groups: usize) -> Vec<Range<usize>> {
    let mut start = 0;
    (0..groups)
        .map(|g| {
            let len = n / groups + usize::from(g < n % groups);
            start += len;
            start - len..start
        })
        .collect()
}

/// A classifier folder loaded for a parallel layout: the image processor and one model part
/// per (pipeline stage, tp position), stage-major.
pub struct ParallelClassifier {
    processor: ImageProcessor,
    parts: Vec<Box<dyn ImageClassifier>>,
    parallel: ParallelConfig,
}

impl ParallelClassifier {
    /// Loads the classifier in folder `dir` (`config.json`, `model.safetensors`,
    /// `preprocessor_config.json`) for `parallel`. The degrees are checked against
    /// `config.json` before any weights are read.
    pub fn load(dir: &Path, parallel: &ParallelConfig) -> Result<Self> {
        link_stock_classifiers();
        check_parallel(parallel)?;
        let (entry, config) = classifier_of(dir)?;
        let config_file = dir.join("config.json");
        let shape = (entry.shape)(&config, &config_file)?;
        let (p, t) = (
            parallel.pipefusion_parallel_degree,
            parallel.tensor_parallel_degree,
        );
        check_degrees(&shape, t, p, &config_file)?;
        let processor = ImageProcessor::from_dir(dir)?;
        let mut parts = Vec::with_capacity(p * t);
        for stage in 0..p {
            for tp in 0..t {
                let options = LoadOptions {
                    stage: (p > 1).then_some(PipelineStage {
                        index: stage,
                        num_stages: p,
                        layer_counts: None,
                    }),
                    tp: TpRank::new(tp, t)?,
                    ..LoadOptions::default()
                };
                parts.push((entry.load)(dir, &options)?);
            }
        }
        let (c, h, w) = parts[0].info().input_size;
        if let Some(size) = processor.output_size().filter(|s| *s != (h, w)) {
            return Err(Error::invalid(format!(
                "{}: the processor resizes to {}x{} but the model takes {h}x{w}",
                dir.join("preprocessor_config.json").display(),
                size.0,
                size.1
            )));
        }
        if c != 3 {
            return Err(Error::invalid(format!(
                "{}: the model takes {c} channels; only RGB (3) pictures are supported",
                config_file.display()
            )));
        }
        Ok(Self {
            processor,
            parts,
            parallel: parallel.clone(),
        })
    }

    /// The label name of each logit.
    pub fn labels(&self) -> &[String] {
        &self.parts[0].info().labels
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The model part of pipeline stage `stage` and tp position `tp`.
    pub fn part(&self, stage: usize, tp: usize) -> &dyn ImageClassifier {
        self.parts[stage * self.parallel.tensor_parallel_degree + tp].as_ref()
    }

    /// Preprocesses `images` and classifies them on the ranks of the layout.
    pub fn classify(&self, images: &[RgbImage]) -> Result<Classification> {
        let pixels = images
            .iter()
            .map(|i| {
                self.processor
                    .preprocess(i)?
                    .unsqueeze(0)
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        self.classify_pixels(&pixels)
    }

    /// Classifies preprocessed images, each (1, C, H, W).
    pub fn classify_pixels(&self, pixels: &[Tensor]) -> Result<Classification> {
        let mesh = RankMesh::new(&self.parallel)?;
        let options = LaunchOptions::default();
        let groups = data_parallel_ranges(pixels.len(), self.parallel.data_parallel_degree);
        let per_rank = launch_local(&mesh, &options, |ctx| {
            let mine = groups[ctx.coords().dp].clone();
            self.run_rank(&ctx, &pixels[mine.clone()], mine.start)
        })?;
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; pixels.len()];
        for (index, row) in per_rank.into_iter().flatten() {
            logits[index] = Some(row);
        }
        let logits = logits
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.ok_or_else(|| {
                    Error::invalid(format!("no rank returned the logits of image {i}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let labels = logits
            .iter()
            .map(|row| self.top1(row))
            .collect::<Result<Vec<_>>>()?;
        Ok(Classification {
            logits,
            labels,
            comm_stats: options.stats,
        })
    }

    fn top1(&self, row: &[f32]) -> Result<String> {
        let best = row
            .iter()
            .enumerate()
            .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
                Some((_, b)) if b >= v => best,
                _ => Some((i, v)),
            })
            .map(|(i, _)| i);
        best.and_then(|i| self.labels().get(i).cloned())
            .ok_or_else(|| Error::invalid("the model returned no logits"))
    }

    /// One rank's share: the micro-batches (one image each) of its dp group through its
    /// stage. Returns (image index, logits) for the images it finished (the last stage's first
    /// tp rank), nothing elsewhere.
    fn run_rank(
        &self,
        ctx: &RankContext,
        pixels: &[Tensor],
        first_index: usize,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let coords = ctx.coords();
        let model = self.part(coords.pp, coords.tp);
        let pp = ctx.pp_group();
        let tp = Some(ctx.tp_group());
        let (stage, stages) = (coords.pp, pp.size());
        let (first, last) = (stage == 0, stage + 1 == stages);
        // Every receive is posted up front: the micro-batches arrive in order, and the previous
        // stage never waits for this one to ask.
        let mut incoming = match first {
            true => Vec::new(),
            false => (0..pixels.len())
                .map(|_| pp.irecv(stage - 1))
                .collect::<Result<Vec<_>>>()?,
        }
        .into_iter();
        let mut sends = Vec::new();
        let mut done = Vec::new();
        for (m, image) in pixels.iter().enumerate() {
            let hidden = match incoming.next() {
                Some(handle) => handle.wait()?,
                None => model.embed(image)?,
            };
            let hidden = model.forward_layers(&hidden, tp)?;
            if !last {
                sends.push(pp.isend(&hidden, stage + 1)?);
                continue;
            }
            if coords.tp == 0 {
                let logits = model.classify(&hidden)?.squeeze(0)?.to_vec1::<f32>()?;
                done.push((first_index + m, logits));
            }
        }
        debug_assert!(first || incoming.next().is_none());
        for send in sends {
            send.wait()?;
        }
        Ok(done)
    }
}

/// Classifies `images` with the model in folder `dir` on the layout `parallel`.
pub fn classify(
    dir: &Path,
    images: &[RgbImage],
    parallel: &ParallelConfig,
) -> Result<Classification> {
    ParallelClassifier::load(dir, parallel)?.classify(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_contiguously_first_groups_one_more() {
        assert_eq!(data_parallel_ranges(4, 2), vec![0..2, 2..4]);
        assert_eq!(data_parallel_ranges(5, 2), vec![0..3, 3..5]);
        assert_eq!(data_parallel_ranges(5, 3), vec![0..2, 2..4, 4..5]);
        assert_eq!(data_parallel_ranges(1, 2), vec![0..1, 1..1]);
    }
}
