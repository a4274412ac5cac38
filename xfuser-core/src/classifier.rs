//! The interface between an image classifier (transformers' `*ForImageClassification`) and the
//! parallel driver that runs it: the model is cut into an embedding, a range of encoder layers
//! and a head, so one driver can place any registered classifier on pipeline stages and
//! tensor-parallel shards without knowing its layers.

use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;

use crate::distributed::ProcessGroup;
use crate::registry::ModelShape;
use crate::{Error, Result};

/// What the driver needs to know about a classifier, read from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierInfo {
    /// The registered architecture (`architectures[0]` of `config.json`).
    pub class_name: &'static str,
    /// Encoder layers, which pipeline stages split.
    pub num_layers: usize,
    /// Attention heads, which the tensor-parallel degree must divide.
    pub num_attention_heads: usize,
    /// The input the model takes: (channels, height, width).
    pub input_size: (usize, usize, usize),
    /// The label name of each logit (`config.id2label`), in logit order.
    pub labels: Vec<String>,
}

/// An image classifier, or the part of it one rank holds: the embedding on the first pipeline
/// stage, the encoder layers [`held_layers`](Self::held_layers), the head on the last stage, each
/// split layer cut to the rank's tensor-parallel shard.
pub trait ImageClassifier: Send + Sync {
    fn info(&self) -> &ClassifierInfo;

    /// The encoder layers this instance holds: all of them, or a pipeline stage's range.
    fn held_layers(&self) -> Range<usize>;

    /// (B, C, H, W) pixel values → (B, S, D) hidden states. Only the first stage can.
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor>;

    /// The held encoder layers over (B, S, D) hidden states. `tp`: the tensor-parallel group
    /// the instance's shard was loaded for (None, or a group of 1, for the whole model).
    fn forward_layers(&self, hidden: &Tensor, tp: Option<&ProcessGroup>) -> Result<Tensor>;

    /// (B, S, D) hidden states after the last layer → (B, labels) logits. Only the last stage
    /// can.
    fn classify(&self, hidden: &Tensor) -> Result<Tensor>;

    /// The whole forward, for an instance that holds every stage.
    fn forward(&self, pixel_values: &Tensor, tp: Option<&ProcessGroup>) -> Result<Tensor> {
        let hidden = self.embed(pixel_values)?;
        let hidden = self.forward_layers(&hidden, tp)?;
        self.classify(&hidden)
    }
}

/// Refuses degrees a classifier of `shape` (from `file`, named in the errors) cannot be split
/// into, naming the `xfuser classify` flags: the tensor-parallel degree must divide the heads
/// (each rank holds whole heads), and every pipeline stage needs a layer.
pub fn check_degrees(
    shape: &ModelShape,
    tensor_parallel_degree: usize,
    pipeline_parallel_degree: usize,
    file: &Path,
) -> Result<()> {
    let (heads, layers) = (shape.num_attention_heads, shape.num_layers);
    if tensor_parallel_degree == 0 || !heads.is_multiple_of(tensor_parallel_degree) {
        return Err(Error::invalid(format!(
            "--tensor-parallel-degree {tensor_parallel_degree} does not divide the {heads} \
             attention heads of {} (each rank holds whole heads); use a divisor of {heads}",
            file.display()
        )));
    }
    if pipeline_parallel_degree == 0 || pipeline_parallel_degree > layers {
        return Err(Error::invalid(format!(
            "--pipeline-parallel-degree {pipeline_parallel_degree} does not fit the {layers} \
             encoder layers of {} (every stage needs at least one); use 1 to {layers}",
            file.display()
        )));
    }
    Ok(())
}
