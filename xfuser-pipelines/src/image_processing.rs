//! transformers' `ViTImageProcessor` (`preprocessor_config.json`): resize to size.height ×
//! size.width with the configured PIL filter, rescale by `rescale_factor`, normalize by
//! `image_mean` / `image_std`, channels first.
//!
//! The resize is PIL's (`Image.resize`, which transformers' PIL backend calls, and which
//! torchvision's antialiased uint8 resize reproduces), written here by hand because no crate
//! reproduces it to the 8-bit level: PIL resamples in two separable passes, horizontal first,
//! with 22-bit fixed-point weights, and rounds to 8 bits after each pass; the `image` crate's
//! `resize` runs vertical first in f32 without the intermediate rounding, so a resized pixel
//! differs by a level here and there, which moves a classifier's logits by far more than the
//! float error of its forward. A resize to the image's own size is a copy, as in PIL.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use xfuser_core::config::read_json_config;
use xfuser_core::engine::RgbImage;
use xfuser_core::{Error, Result};

/// PIL's resampling filters that the processor supports, by their `resample` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 2: the triangle filter, support 1 (scaled by the reduction factor when shrinking).
    Bilinear,
    /// 3: Keys' cubic with a = −0.5, support 2 (scaled likewise).
    Bicubic,
}

impl Resample {
    /// The filter of PIL code `code` (`PIL.Image.Resampling`); None for the others.
    pub fn from_pil(code: u32) -> Option<Self> {
        match code {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => (1.0 - x).max(0.0),
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of PIL's fixed-point resampling weights (32 − 8 − 2: a sum of 8-bit
/// pixels times weights stays inside an i32).
const PRECISION_BITS: u32 = 22;

/// The input pixels one output pixel reads along an axis, and their fixed-point weights.
#[derive(Debug, Clone)]
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// The taps of every output pixel when an axis of `input` pixels is resampled to `output`:
/// the filter is centred on the output pixel's centre mapped into the input, widened by the
/// reduction factor when shrinking (antialiasing), its weights normalized to sum to 1 and then
/// rounded to fixed point.
fn taps(input: usize, output: usize, filter: Resample) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let widen = scale.max(1.0);
    let support = filter.support() * widen;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // `as` truncates toward zero, as C's (int) cast in PIL; negative starts clamp to 0.
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
            let raw: Vec<f64> = (start..end)
                .map(|i| filter.weight((i as f64 - center + 0.5) / widen))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let rounding = if w < 0.0 { -0.5 } else { 0.5 };
                    (w * one + rounding) as i32
                })
                .collect();
            Taps { start, weights }
        })
        .collect()
}

/// A fixed-point sum back to 8 bits, clamped.
fn clip8(acc: i32) -> u8 {
    if acc <= 0 {
        0
    } else if acc >= (256 << PRECISION_BITS) {
        255
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Resamples interleaved `channels`-channel pixels along one axis: pixel `i` of line `line`
/// (`lines` of them) is read at `index(line, i)`, output pixel `o` written at
/// `out_index(line, o)`.
fn resample_axis(
    src: &[u8],
    channels: usize,
    lines: usize,
    taps: &[Taps],
    index: impl Fn(usize, usize) -> usize,
    out_index: impl Fn(usize, usize) -> usize,
    out_len: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_len];
    for line in 0..lines {
        for (o, t) in taps.iter().enumerate() {
            for c in 0..channels {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in t.weights.iter().enumerate() {
                    acc += i32::from(src[index(line, t.start + k) * channels + c]) * w;
                }
                out[out_index(line, o) * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// `image` resized to `width` × `height` as PIL's `Image.resize(…, filter)` does: the
/// horizontal pass first, then the vertical, each rounding to 8 bits; an axis already at its
/// size is not resampled.
pub fn resize_rgb(image: &RgbImage, width: usize, height: usize, filter: Resample) -> RgbImage {
    let (w0, h0) = (image.width, image.height);
    let mut data = image.data.clone();
    if width != w0 {
        let t = taps(w0, width, filter);
        data = resample_axis(
            &data,
            3,
            h0,
            &t,
            |y, x| y * w0 + x,
            |y, x| y * width + x,
            width * h0 * 3,
        );
    }
    if height != h0 {
        let t = taps(h0, height, filter);
        data = resample_axis(
            &data,
            3,
            width,
            &t,
            |x, y| y * width + x,
            |x, y| y * width + x,
            width * height * 3,
        );
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// `size` of a processor config: only the fixed height × width form.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorSize {
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub shortest_edge: Option<usize>,
    pub longest_edge: Option<usize>,
}

/// The processor types whose options [`ImageProcessor`] implements.
pub const SUPPORTED_PROCESSORS: [&str; 3] = [
    "ViTImageProcessor",
    "ViTImageProcessorPil",
    "ViTImageProcessorFast",
];

/// `preprocessor_config.json` as transformers' ViT image processor reads it, with its
/// defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default)]
    pub image_processor_type: Option<String>,
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: Option<ProcessorSize>,
    #[serde(default = "bilinear")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "one_255th")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default)]
    pub image_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub image_std: Option<Vec<f64>>,
    #[serde(default)]
    pub do_center_crop: bool,
    #[serde(default)]
    pub do_pad: bool,
}

fn yes() -> bool {
    true
}
fn bilinear() -> u32 {
    2
}
fn one_255th() -> f64 {
    1.0 / 255.0
}

/// A checked [`ImageProcessorConfig`], ready to turn pictures into pixel values.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    /// (height, width) after the resize; None: images keep their size.
    size: Option<(usize, usize)>,
    resample: Resample,
    rescale: Option<f64>,
    /// Per channel (mean, std).
    normalize: Option<[(f64, f64); 3]>,
}

impl ImageProcessor {
    /// Reads `preprocessor_config.json` in the model folder `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("preprocessor_config.json");
        let config: ImageProcessorConfig = read_json_config(&file)?;
        Self::new(&config, &file)
    }

    /// Checks `config` (read from `file`, for errors): anything it asks for that is not
    /// implemented is refused, naming the field.
    pub fn new(config: &ImageProcessorConfig, file: &Path) -> Result<Self> {
        let field = |field: &str, message: String| Error::Config {
            file: file.to_path_buf(),
            field: field.into(),
            message,
        };
        if let Some(t) = &config.image_processor_type {
            if !SUPPORTED_PROCESSORS.contains(&t.as_str()) {
                return Err(field(
                    "image_processor_type",
                    format!(
                        "`{t}` is not supported; supported: {}",
                        SUPPORTED_PROCESSORS.join(", ")
                    ),
                ));
            }
        }
        if config.do_center_crop {
            return Err(field(
                "do_center_crop",
                "center cropping is not supported; only a resize to size.height × size.width"
                    .into(),
            ));
        }
        if config.do_pad {
            return Err(field("do_pad", "padding is not supported".into()));
        }
        let size =
            match (&config.size, config.do_resize) {
                (_, false) => None,
                (None, true) => Some((224, 224)),
                (Some(s), true) => match (s.height, s.width, s.shortest_edge, s.longest_edge) {
                    (Some(h), Some(w), None, None) if h > 0 && w > 0 => Some((h, w)),
                    _ => return Err(field(
                        "size",
                        "expected {\"height\": H, \"width\": W} with H, W ≥ 1 (shortest_edge / \
                         longest_edge resizing is not supported)"
                            .into(),
                    )),
                },
            };
        let resample = Resample::from_pil(config.resample).ok_or_else(|| {
            field(
                "resample",
                format!(
                    "PIL filter {} is not supported; supported: 2 (bilinear), 3 (bicubic)",
                    config.resample
                ),
            )
        })?;
        let normalize = match config.do_normalize {
            false => None,
            true => {
                let mean = three(&config.image_mean, "image_mean", &field)?;
                let std = three(&config.image_std, "image_std", &field)?;
                if let Some(s) = std.iter().find(|s| **s == 0.0 || !s.is_finite()) {
                    return Err(field("image_std", format!("{s} cannot divide")));
                }
                Some([(mean[0], std[0]), (mean[1], std[1]), (mean[2], std[2])])
            }
        };
        Ok(Self {
            size,
            resample,
            rescale: config.do_rescale.then_some(config.rescale_factor),
            normalize,
        })
    }

    /// (height, width) of the pixel values; None: each image's own.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        self.size
    }

    /// The resized 8-bit image, before rescaling and normalizing.
    pub fn resize(&self, image: &RgbImage) -> RgbImage {
        match self.size {
            Some((h, w)) if (h, w) != (image.height, image.width) => {
                resize_rgb(image, w, h, self.resample)
            }
            _ => image.clone(),
        }
    }

    /// The pixel values of `image`, (3, H, W) f32.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Tensor> {
        let resized = self.resize(image);
        let (h, w) = (resized.height, resized.width);
        let mut values = vec![0f32; 3 * h * w];
        for (c, plane) in values.chunks_exact_mut(h * w).enumerate() {
            for (i, v) in plane.iter_mut().enumerate() {
                let mut x = f64::from(resized.data[i * 3 + c]);
                if let Some(factor) = self.rescale {
                    x *= factor;
                }
                if let Some(n) = &self.normalize {
                    x = (x - n[c].0) / n[c].1;
                }
                *v = x as f32;
            }
        }
        Ok(Tensor::from_vec(values, (3, h, w), &Device::Cpu)?)
    }
}

/// Three per-channel values (one value stands for all three); None: transformers' default 0.5.
fn three(
    values: &Option<Vec<f64>>,
    name: &str,
    field: &impl Fn(&str, String) -> Error,
) -> Result<[f64; 3]> {
    match values.as_deref() {
        None => Ok([0.5; 3]),
        Some([v]) => Ok([*v; 3]),
        Some([a, b, c]) => Ok([*a, *b, *c]),
        Some(other) => Err(field(
            name,
            format!(
                "expected 3 values (one per RGB channel), got {}",
                other.len()
            ),
        )),
    }
}

/// Decodes the picture at `path` into 8-bit RGB (alpha dropped, grey replicated), as
/// `PIL.Image.open(path).convert("RGB")`.
pub fn read_rgb_image(path: &Path) -> Result<RgbImage> {
    let not_readable = |message: String| {
        Error::invalid(format!(
            "{}: not a readable picture ({message}); this build reads PNG",
            path.display()
        ))
    };
    // Error::invalid, not Error::io: the CLI prints an error's sources too, and an Io error
    // would name the OS error twice.
    let cannot_read = |e: std::io::Error| {
        Error::invalid(format!("{}: cannot read the picture: {e}", path.display()))
    };
    let reader = ::image::ImageReader::open(path)
        .map_err(cannot_read)?
        .with_guessed_format()
        .map_err(cannot_read)?;
    let decoded = reader.decode().map_err(|e| not_readable(e.to_string()))?;
    let rgb = decoded.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        return Err(not_readable("it has no pixels".into()));
    }
    Ok(RgbImage {
        width,
        height,
        data: rgb.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resize_to_the_same_size_is_a_copy() {
        let image = RgbImage {
            width: 2,
            height: 1,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        assert_eq!(resize_rgb(&image, 2, 1, Resample::Bicubic).data, image.data);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for filter in [Resample::Bilinear, Resample::Bicubic] {
            for (i, o) in [(64, 32), (28, 48), (52, 48), (7, 3)] {
                for t in taps(i, o, filter) {
                    let sum: i32 = t.weights.iter().sum();
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i32);
                    assert!(t.start + t.weights.len() <= i);
                }
            }
        }
    }
}
