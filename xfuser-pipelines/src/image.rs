//! From decoded images to files: diffusers' `VaeImageProcessor.postprocess`
//! (`image_processor.py`) for the `np` and `pil` output types, and PNG writing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use xfuser_core::engine::RgbImage;
use xfuser_core::{Error, Result};

/// `(x * 0.5 + 0.5).clamp(0, 1)` in `images`' dtype, as diffusers' `denormalize`.
pub fn denormalize(images: &Tensor) -> Result<Tensor> {
    Ok(images.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
}

/// `postprocess(images, output_type="np")`: (B, C, H, W) in [-1, 1] space -> (B, H, W, C) f32
/// in [0, 1], on the CPU.
pub fn postprocess_np(images: &Tensor) -> Result<Tensor> {
    let images = denormalize(images)?;
    // (B, C, H, W) -> (B, H, W, C); diffusers casts to float after permuting, which is the
    // same values.
    Ok(images
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?)
}

/// `numpy_to_pil`'s pixels: `(x * 255).round().astype(uint8)` of a (B, H, W, C) f32 image in
/// [0, 1], as a U8 tensor of the same shape.
pub fn np_to_u8(images: &Tensor) -> Result<Tensor> {
    let shape = images.shape().clone();
    let values = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // numpy multiplies in f32 and rounds half to even; the cast then saturates nothing, since
    // the input was clamped to [0, 1].
    let bytes: Vec<u8> = values
        .iter()
        .map(|&x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect();
    Ok(Tensor::from_vec(bytes, shape, &Device::Cpu)?)
}

/// `postprocess(images, output_type="pil")` as pixels: (B, C, H, W) in [-1, 1] space ->
/// (B, H, W, C) u8.
pub fn postprocess_u8(images: &Tensor) -> Result<Tensor> {
    np_to_u8(&postprocess_np(images)?)
}

/// `postprocess(images, output_type="pil")`: one image per batch entry, RGB for 3 channels and
/// grayscale for 1, as diffusers' `numpy_to_pil`.
pub fn postprocess_pil(images: &Tensor) -> Result<Vec<::image::DynamicImage>> {
    u8_to_images(&postprocess_u8(images)?)
}

/// Splits a (B, H, W, C) u8 tensor into images; C must be 1 or 3.
pub fn u8_to_images(pixels: &Tensor) -> Result<Vec<::image::DynamicImage>> {
    let (batch, height, width, channels) = pixels.dims4()?;
    if pixels.dtype() != DType::U8 || !(channels == 1 || channels == 3) {
        return Err(Error::invalid(format!(
            "expected a (B, H, W, 1 or 3) u8 image tensor, got {:?} {:?}",
            pixels.dims(),
            pixels.dtype()
        )));
    }
    let (w, h) = (width as u32, height as u32);
    (0..batch)
        .map(|i| {
            let data = pixels.get(i)?.flatten_all()?.to_vec1::<u8>()?;
            let image = if channels == 3 {
                ::image::RgbImage::from_raw(w, h, data).map(::image::DynamicImage::ImageRgb8)
            } else {
                ::image::GrayImage::from_raw(w, h, data).map(::image::DynamicImage::ImageLuma8)
            };
            image.ok_or_else(|| Error::invalid("image buffer size does not match its shape"))
        })
        .collect()
}

/// Splits a (B, H, W, 3) u8 tensor into the engine's RGB images.
pub fn u8_to_rgb(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, height, width, channels) = pixels.dims4()?;
    if pixels.dtype() != DType::U8 || channels != 3 {
        return Err(Error::invalid(format!(
            "expected a (B, H, W, 3) u8 image tensor, got {:?} {:?}",
            pixels.dims(),
            pixels.dtype()
        )));
    }
    (0..batch)
        .map(|i| {
            Ok(RgbImage {
                width,
                height,
                data: pixels.get(i)?.flatten_all()?.to_vec1::<u8>()?,
            })
        })
        .collect()
}

/// The engine's RGB image as an `image` crate image.
fn rgb_to_dynamic(image: &RgbImage) -> Result<::image::DynamicImage> {
    let buffer =
        ::image::RgbImage::from_raw(image.width as u32, image.height as u32, image.data.clone())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "image buffer of {} bytes does not hold {}x{} RGB pixels",
                    image.data.len(),
                    image.width,
                    image.height
                ))
            })?;
    Ok(::image::DynamicImage::ImageRgb8(buffer))
}

/// [`save_png`] for the engine's RGB images.
pub fn save_rgb_png(image: &RgbImage, path: &Path) -> Result<()> {
    save_png(&rgb_to_dynamic(image)?, path)
}

/// [`encode_png`] for the engine's RGB images: the bytes [`save_rgb_png`] writes.
pub fn encode_rgb_png(image: &RgbImage) -> Result<Vec<u8>> {
    encode_png(&rgb_to_dynamic(image)?)
}

/// `image` as PNG bytes. Every PNG this crate writes or serves is encoded here, so a file
/// written by the CLI and an image sent by the server for the same request are identical.
pub fn encode_png(image: &::image::DynamicImage) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, ::image::ImageFormat::Png)
        .map_err(|e| Error::invalid(format!("encoding PNG: {e}")))?;
    Ok(bytes.into_inner())
}

/// Writes `image` to `path` as PNG, atomically: it is written to a temporary file in the same
/// folder and renamed over `path`, so `path` holds either its old contents or the whole new
/// image, and no partial file is left behind on error.
pub fn save_png(image: &::image::DynamicImage, path: &Path) -> Result<()> {
    let tmp = temp_path_beside(path)?;
    let written = write_png(image, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        // Best effort: the temporary file may not exist if creating it was what failed.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_png(image: &::image::DynamicImage, tmp: &Path) -> Result<()> {
    let bytes = encode_png(image)?;
    let mut file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(tmp, e))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))
}

/// `dir/.name.tmp-<pid>-<n>`: hidden, in the same folder (so the rename stays on one file
/// system), and unique within and across processes.
fn temp_path_beside(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even() {
        // 0.5 / 255 * 255 and 2.5 / 255 * 255 land on .5 exactly in f32 for these values.
        let x = Tensor::new(&[[[[0.0f32, 1.0, 0.5]]]], &Device::Cpu).unwrap();
        let u = np_to_u8(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(u, vec![0, 255, 128]); // 127.5 -> 128 (even)
    }

    #[test]
    fn temp_names_are_hidden_and_distinct() {
        let a = temp_path_beside(Path::new("out/img.png")).unwrap();
        let b = temp_path_beside(Path::new("out/img.png")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("out")));
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".img.png.tmp-"));
        assert!(temp_path_beside(Path::new("/")).is_err());
    }
}
