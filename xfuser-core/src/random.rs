//! A CPU random generator that reproduces `torch.Generator().manual_seed(s)` and
//! `torch.randn(shape, generator=g)` in float32.
//!
//! Being written in this session (issue 2, step 5): until it lands, drawing noise is an error.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
}

impl Generator {
    pub fn manual_seed(seed: u64) -> Self {
        Self { seed }
    }

    pub fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let _ = (self.seed, shape);
        Err(Error::Unsupported("torch-compatible randn is not implemented yet".into()))
    }

    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let data = self.randn(shape)?;
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}
