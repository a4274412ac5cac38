//! Resolution binning of diffusers' PixArt pipelines (`pipeline_pixart_alpha.py`,
//! `pipeline_pixart_sigma.py`): a requested size is mapped to the closest of the sizes the model
//! was trained on, the image is generated there, then resized and center-cropped back
//! (`PixArtImageProcessor.classify_height_width_bin` / `resize_and_crop_tensor`).

use candle_core::Tensor;
use xfuser_core::{Error, Result};

/// One entry of an aspect-ratio table: diffusers' dict key (height / width, as text) and the
/// (height, width) it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AspectRatioBin {
    pub key: &'static str,
    pub height: usize,
    pub width: usize,
}

impl AspectRatioBin {
    /// The key as Python's `float(key)` reads it (both round correctly to the nearest f64).
    pub fn ratio(&self) -> f64 {
        self.key
            .parse()
            .expect("aspect-ratio keys are decimal literals (checked by a test)")
    }
}

const fn bin(key: &'static str, height: usize, width: usize) -> AspectRatioBin {
    AspectRatioBin { key, height, width }
}

/// The table PixArt-α's pipeline bins with, chosen by the transformer's `sample_size`.
pub fn pixart_alpha_bins(sample_size: usize) -> Result<&'static [AspectRatioBin]> {
    match sample_size {
        128 => Ok(ASPECT_RATIO_1024_BIN),
        64 => Ok(ASPECT_RATIO_512_BIN),
        32 => Ok(ASPECT_RATIO_256_BIN),
        other => Err(Error::invalid(format!(
            "resolution binning: no PixArt-α aspect-ratio table for transformer sample_size \
             {other} (known: 128, 64, 32); disable binning to use this model"
        ))),
    }
}

/// The table PixArt-Σ's pipeline bins with: PixArt-α's, plus the 2048 one for sample_size 256.
pub fn pixart_sigma_bins(sample_size: usize) -> Result<&'static [AspectRatioBin]> {
    match sample_size {
        256 => Ok(ASPECT_RATIO_2048_BIN),
        128 | 64 | 32 => pixart_alpha_bins(sample_size),
        other => Err(Error::invalid(format!(
            "resolution binning: no PixArt-Σ aspect-ratio table for transformer sample_size \
             {other} (known: 256, 128, 64, 32); disable binning to use this model"
        ))),
    }
}

/// The (height, width) of the bin whose ratio is closest to `height / width`; on a tie the
/// earlier entry wins, as with Python's `min` over the dict keys.
pub fn classify_height_width_bin(
    height: usize,
    width: usize,
    ratios: &[AspectRatioBin],
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || ratios.is_empty() {
        return Err(Error::invalid(format!(
            "classify_height_width_bin: need a non-empty table and a positive size, got \
             {height}x{width} and {} bins",
            ratios.len()
        )));
    }
    // Python's int / int is the correctly rounded quotient, as is this for sizes below 2^53.
    let ar = height as f64 / width as f64;
    let mut best = &ratios[0];
    let mut best_distance = (best.ratio() - ar).abs();
    for candidate in &ratios[1..] {
        let distance = (candidate.ratio() - ar).abs();
        if distance < best_distance {
            best = candidate;
            best_distance = distance;
        }
    }
    Ok((best.height, best.width))
}

/// Scales `images` (B, C, H, W) by the smallest factor that covers `new_height` x `new_width`
/// (bilinear, `align_corners=False`, no antialias, as `F.interpolate` in diffusers), then
/// center-crops to exactly that size. A no-op when the size already matches.
///
/// candle's `upsample_bilinear2d` uses torch's `align_corners=False` source-index rule
/// (`scale = in / out`, `src = scale * (dst + 0.5) - 0.5`, clamped at 0), so it is used as is.
///
/// One deliberate difference: diffusers computes the resized size as `int(size * ratio)`, which
/// for about 2% of requested sizes truncates `size * (new / size)` to `new - 1`; its crop then
/// slices with a negative start and returns a one-pixel-wide image. Here the resized size is
/// never smaller than the target, so the output always has the requested size.
pub fn resize_and_crop_tensor(
    images: &Tensor,
    new_width: usize,
    new_height: usize,
) -> Result<Tensor> {
    let (_b, _c, orig_height, orig_width) = images.dims4()?;
    if new_width == 0 || new_height == 0 {
        return Err(Error::invalid(format!(
            "resize_and_crop_tensor: target size {new_height}x{new_width} (HxW) must be positive"
        )));
    }
    if orig_height == new_height && orig_width == new_width {
        return Ok(images.clone());
    }
    let ratio = f64::max(
        new_height as f64 / orig_height as f64,
        new_width as f64 / orig_width as f64,
    );
    // `as usize` truncates toward zero like Python's int() on these positive values.
    let resized_width = ((orig_width as f64 * ratio) as usize).max(new_width);
    let resized_height = ((orig_height as f64 * ratio) as usize).max(new_height);
    let resized = images.upsample_bilinear2d(resized_height, resized_width, false)?;
    let start_x = (resized_width - new_width) / 2;
    let start_y = (resized_height - new_height) / 2;
    Ok(resized
        .narrow(2, start_y, new_height)?
        .narrow(3, start_x, new_width)?)
}

/// diffusers' `ASPECT_RATIO_256_BIN`: (ratio key, height, width), in its order.
pub const ASPECT_RATIO_256_BIN: &[AspectRatioBin] = &[
    bin("0.25", 128, 512),
    bin("0.28", 128, 464),
    bin("0.32", 144, 448),
    bin("0.33", 144, 432),
    bin("0.35", 144, 416),
    bin("0.4", 160, 400),
    bin("0.42", 160, 384),
    bin("0.48", 176, 368),
    bin("0.5", 176, 352),
    bin("0.52", 176, 336),
    bin("0.57", 192, 336),
    bin("0.6", 192, 320),
    bin("0.68", 208, 304),
    bin("0.72", 208, 288),
    bin("0.78", 224, 288),
    bin("0.82", 224, 272),
    bin("0.88", 240, 272),
    bin("0.94", 240, 256),
    bin("1.0", 256, 256),
    bin("1.07", 256, 240),
    bin("1.13", 272, 240),
    bin("1.21", 272, 224),
    bin("1.29", 288, 224),
    bin("1.38", 288, 208),
    bin("1.46", 304, 208),
    bin("1.67", 320, 192),
    bin("1.75", 336, 192),
    bin("2.0", 352, 176),
    bin("2.09", 368, 176),
    bin("2.4", 384, 160),
    bin("2.5", 400, 160),
    bin("3.0", 432, 144),
    bin("4.0", 512, 128),
];

/// diffusers' `ASPECT_RATIO_512_BIN`: (ratio key, height, width), in its order.
pub const ASPECT_RATIO_512_BIN: &[AspectRatioBin] = &[
    bin("0.25", 256, 1024),
    bin("0.28", 256, 928),
    bin("0.32", 288, 896),
    bin("0.33", 288, 864),
    bin("0.35", 288, 832),
    bin("0.4", 320, 800),
    bin("0.42", 320, 768),
    bin("0.48", 352, 736),
    bin("0.5", 352, 704),
    bin("0.52", 352, 672),
    bin("0.57", 384, 672),
    bin("0.6", 384, 640),
    bin("0.68", 416, 608),
    bin("0.72", 416, 576),
    bin("0.78", 448, 576),
    bin("0.82", 448, 544),
    bin("0.88", 480, 544),
    bin("0.94", 480, 512),
    bin("1.0", 512, 512),
    bin("1.07", 512, 480),
    bin("1.13", 544, 480),
    bin("1.21", 544, 448),
    bin("1.29", 576, 448),
    bin("1.38", 576, 416),
    bin("1.46", 608, 416),
    bin("1.67", 640, 384),
    bin("1.75", 672, 384),
    bin("2.0", 704, 352),
    bin("2.09", 736, 352),
    bin("2.4", 768, 320),
    bin("2.5", 800, 320),
    bin("3.0", 864, 288),
    bin("4.0", 1024, 256),
];

/// diffusers' `ASPECT_RATIO_1024_BIN`: (ratio key, height, width), in its order.
pub const ASPECT_RATIO_1024_BIN: &[AspectRatioBin] = &[
    bin("0.25", 512, 2048),
    bin("0.28", 512, 1856),
    bin("0.32", 576, 1792),
    bin("0.33", 576, 1728),
    bin("0.35", 576, 1664),
    bin("0.4", 640, 1600),
    bin("0.42", 640, 1536),
    bin("0.48", 704, 1472),
    bin("0.5", 704, 1408),
    bin("0.52", 704, 1344),
    bin("0.57", 768, 1344),
    bin("0.6", 768, 1280),
    bin("0.68", 832, 1216),
    bin("0.72", 832, 1152),
    bin("0.78", 896, 1152),
    bin("0.82", 896, 1088),
    bin("0.88", 960, 1088),
    bin("0.94", 960, 1024),
    bin("1.0", 1024, 1024),
    bin("1.07", 1024, 960),
    bin("1.13", 1088, 960),
    bin("1.21", 1088, 896),
    bin("1.29", 1152, 896),
    bin("1.38", 1152, 832),
    bin("1.46", 1216, 832),
    bin("1.67", 1280, 768),
    bin("1.75", 1344, 768),
    bin("2.0", 1408, 704),
    bin("2.09", 1472, 704),
    bin("2.4", 1536, 640),
    bin("2.5", 1600, 640),
    bin("3.0", 1728, 576),
    bin("4.0", 2048, 512),
];

/// diffusers' `ASPECT_RATIO_2048_BIN`: (ratio key, height, width), in its order.
pub const ASPECT_RATIO_2048_BIN: &[AspectRatioBin] = &[
    bin("0.25", 1024, 4096),
    bin("0.26", 1024, 3968),
    bin("0.27", 1024, 3840),
    bin("0.28", 1024, 3712),
    bin("0.32", 1152, 3584),
    bin("0.33", 1152, 3456),
    bin("0.35", 1152, 3328),
    bin("0.4", 1280, 3200),
    bin("0.42", 1280, 3072),
    bin("0.48", 1408, 2944),
    bin("0.5", 1408, 2816),
    bin("0.52", 1408, 2688),
    bin("0.57", 1536, 2688),
    bin("0.6", 1536, 2560),
    bin("0.68", 1664, 2432),
    bin("0.72", 1664, 2304),
    bin("0.78", 1792, 2304),
    bin("0.82", 1792, 2176),
    bin("0.88", 1920, 2176),
    bin("0.94", 1920, 2048),
    bin("1.0", 2048, 2048),
    bin("1.07", 2048, 1920),
    bin("1.13", 2176, 1920),
    bin("1.21", 2176, 1792),
    bin("1.29", 2304, 1792),
    bin("1.38", 2304, 1664),
    bin("1.46", 2432, 1664),
    bin("1.67", 2560, 1536),
    bin("1.75", 2688, 1536),
    bin("2.0", 2816, 1408),
    bin("2.09", 2944, 1408),
    bin("2.4", 3072, 1280),
    bin("2.5", 3200, 1280),
    bin("2.89", 3328, 1152),
    bin("3.0", 3456, 1152),
    bin("3.11", 3584, 1152),
    bin("3.62", 3712, 1024),
    bin("3.75", 3840, 1024),
    bin("3.88", 3968, 1024),
    bin("4.0", 4096, 1024),
];

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const TABLES: [&[AspectRatioBin]; 4] = [
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
        ASPECT_RATIO_2048_BIN,
    ];

    #[test]
    fn keys_parse_and_increase() {
        for table in TABLES {
            let ratios: Vec<f64> = table.iter().map(|b| b.ratio()).collect();
            assert!(ratios.windows(2).all(|w| w[0] < w[1]), "{ratios:?}");
        }
    }

    #[test]
    fn tables_by_sample_size() {
        assert_eq!(pixart_alpha_bins(128).unwrap(), ASPECT_RATIO_1024_BIN);
        assert_eq!(pixart_alpha_bins(32).unwrap(), ASPECT_RATIO_256_BIN);
        assert!(pixart_alpha_bins(256).is_err());
        assert_eq!(pixart_sigma_bins(256).unwrap(), ASPECT_RATIO_2048_BIN);
        assert_eq!(pixart_sigma_bins(64).unwrap(), ASPECT_RATIO_512_BIN);
        let err = pixart_sigma_bins(48).unwrap_err().to_string();
        assert!(err.contains("sample_size 48"), "{err}");
    }

    #[test]
    fn truncated_size_still_gives_requested_size() {
        // 88 * (15 / 88) = 14.999...: diffusers would crop to width 1 here.
        let x = Tensor::zeros((1, 3, 8, 88), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = resize_and_crop_tensor(&x, 15, 1).unwrap();
        assert_eq!(y.dims(), &[1, 3, 1, 15]);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let x = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(resize_and_crop_tensor(&x, 0, 4).is_err());
        assert!(classify_height_width_bin(0, 4, ASPECT_RATIO_256_BIN).is_err());
    }
}
