//! Parity of the image side of the PixArt pipelines with diffusers 0.42.1: VAE decode,
//! postprocess, resolution binning (goldens from `scripts/fixtures/vae.py`), plus PNG writing
//! and the errors bad inputs give.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::testing::{fixtures_dir, load_goldens, max_abs_diff, rel_l2};
use xfuser_pipelines::binning::{
    classify_height_width_bin, resize_and_crop_tensor, AspectRatioBin, ASPECT_RATIO_1024_BIN,
    ASPECT_RATIO_2048_BIN, ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
};
use xfuser_pipelines::image::{postprocess_np, postprocess_pil, postprocess_u8, save_png};
use xfuser_pipelines::vae::AutoencoderKL;

fn vae_dir() -> PathBuf {
    fixtures_dir().join("pipelines/tiny-pixart-alpha/vae")
}

fn goldens(name: &str) -> HashMap<String, Tensor> {
    load_goldens(&fixtures_dir().join("vae").join(name)).unwrap()
}

fn bins_json() -> serde_json::Value {
    let path = fixtures_dir().join("vae/bins.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn max_u8_diff(a: &Tensor, b: &Tensor) -> u8 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// A scratch folder of this test's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xfuser-vae-image-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies the fixture VAE into a scratch folder, with `edit` applied to its config.
fn vae_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = scratch(name);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        vae_dir().join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    AutoencoderKL::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn decode_matches_diffusers() {
    let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.vae_scale_factor(), 8);
    let g = goldens("decode.safetensors");
    for case in ["b1", "b2"] {
        let latents = &g[&format!("{case}.latents")];
        let decoded = vae.decode_latents(latents).unwrap();
        let want = &g[&format!("{case}.decoded")];
        let err = rel_l2(&decoded, want).unwrap();
        println!("{case}: decode rel L2 {err:.3e}");
        assert!(err <= 1e-5, "{case}: decode rel L2 {err:.3e}");

        let pixels = postprocess_u8(&decoded).unwrap();
        let diff = max_u8_diff(&pixels, &g[&format!("{case}.pil")]);
        println!("{case}: max u8 difference {diff}");
        assert!(diff <= 1, "{case}: u8 image differs by {diff} levels");
        if let Some(want_np) = g.get(&format!("{case}.np")) {
            let err = max_abs_diff(&postprocess_np(&decoded).unwrap(), want_np).unwrap();
            println!("{case}: np max abs {err:.3e}");
            assert!(err <= 1e-5, "{case}: np max abs {err:.3e}");
        }
    }
}

#[test]
fn postprocess_matches_diffusers_exactly_on_the_same_input() {
    let g = goldens("decode.safetensors");
    let ramp = &g["ramp.decoded"];
    let np = postprocess_np(ramp).unwrap();
    assert_eq!(max_abs_diff(&np, &g["ramp.np"]).unwrap(), 0.0);
    assert_eq!(
        max_u8_diff(&postprocess_u8(ramp).unwrap(), &g["ramp.pil"]),
        0
    );
    // b1's decoded image as diffusers produced it: the postprocess alone is bit-exact.
    let decoded = &g["b1.decoded"];
    assert_eq!(
        max_abs_diff(&postprocess_np(decoded).unwrap(), &g["b1.np"]).unwrap(),
        0.0
    );
    assert_eq!(
        max_u8_diff(&postprocess_u8(decoded).unwrap(), &g["b1.pil"]),
        0
    );
}

#[test]
fn png_round_trip() {
    let g = goldens("decode.safetensors");
    let images = postprocess_pil(&g["b2.decoded"]).unwrap();
    assert_eq!(images.len(), 2);
    let dir = scratch("png");
    for (i, image) in images.iter().enumerate() {
        let path = dir.join(format!("image_{i}.png"));
        save_png(image, &path).unwrap();
        let back = image::open(&path).unwrap();
        assert_eq!(back.color(), image::ColorType::Rgb8);
        assert_eq!(back.to_rgb8(), image.to_rgb8(), "image {i}");
        // Overwriting goes through the same temp-and-rename.
        save_png(&images[1 - i], &path).unwrap();
        assert_eq!(
            image::open(&path).unwrap().to_rgb8(),
            images[1 - i].to_rgb8()
        );
    }
    let pixels = postprocess_u8(&g["b2.decoded"]).unwrap();
    let first = pixels
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(images[0].to_rgb8().into_raw(), first);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["image_0.png", "image_1.png"],
        "no temporary file left"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn saving_where_it_cannot_leaves_no_file() {
    let image = postprocess_pil(&goldens("decode.safetensors")["b1.decoded"])
        .unwrap()
        .remove(0);
    let dir = scratch("unwritable");
    let missing = dir.join("no/such/dir/out.png");
    let err = save_png(&image, &missing).unwrap_err().to_string();
    assert!(err.contains("no/such/dir"), "{err}");
    // The target is a folder: writing the temporary file works, the rename does not.
    let target = dir.join("a_folder.png");
    std::fs::create_dir(&target).unwrap();
    let err = save_png(&image, &target).unwrap_err().to_string();
    assert!(err.contains("a_folder.png"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["a_folder.png"], "no partial or temporary file left");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bin_tables_equal_diffusers() {
    let doc = bins_json();
    let tables: [(&str, &[AspectRatioBin]); 4] = [
        ("256", ASPECT_RATIO_256_BIN),
        ("512", ASPECT_RATIO_512_BIN),
        ("1024", ASPECT_RATIO_1024_BIN),
        ("2048", ASPECT_RATIO_2048_BIN),
    ];
    for (name, table) in tables {
        let want: Vec<(String, usize, usize)> =
            serde_json::from_value(doc["tables"][name].clone()).unwrap();
        let got: Vec<(String, usize, usize)> = table
            .iter()
            .map(|b| (b.key.to_string(), b.height, b.width))
            .collect();
        assert_eq!(got, want, "ASPECT_RATIO_{name}_BIN");
    }
}

#[test]
fn classify_matches_diffusers() {
    let doc = bins_json();
    let cases: Vec<(String, usize, usize, usize, usize)> =
        serde_json::from_value(doc["classify"].clone()).unwrap();
    assert!(cases.len() >= 60);
    for (table, h, w, bh, bw) in cases {
        let ratios = match table.as_str() {
            "256" => ASPECT_RATIO_256_BIN,
            "512" => ASPECT_RATIO_512_BIN,
            "1024" => ASPECT_RATIO_1024_BIN,
            "2048" => ASPECT_RATIO_2048_BIN,
            other => panic!("unknown table {other}"),
        };
        let got = classify_height_width_bin(h, w, ratios).unwrap();
        assert_eq!(got, (bh, bw), "table {table}, {h}x{w}");
    }
}

#[test]
fn resize_and_crop_matches_diffusers() {
    let doc = bins_json();
    let cases: Vec<(String, usize, usize)> = serde_json::from_value(doc["resize"].clone()).unwrap();
    let g = goldens("resize.safetensors");
    let mut worst = 0f64;
    for (name, new_width, new_height) in cases {
        let input = &g[&format!("{name}.input")];
        let got = resize_and_crop_tensor(input, new_width, new_height).unwrap();
        let want = &g[&format!("{name}.output")];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let err = max_abs_diff(&got, want).unwrap();
        assert!(err <= 1e-5, "{name}: max abs {err:.3e}");
        worst = worst.max(err);
    }
    println!("resize_and_crop: worst max abs {worst:.3e}");
}

#[test]
fn mistyped_config_field_is_named() {
    let dir = vae_copy("mistyped", |c| c["layers_per_block"] = "one".into());
    let err = load_err(&dir);
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("field `layers_per_block`"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_config_values_are_named() {
    let dir = vae_copy("block", |c| {
        c["up_block_types"][2] = "AttnUpDecoderBlock2D".into()
    });
    let err = load_err(&dir);
    assert!(err.contains("not supported"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("field `up_block_types`"), "{err}");
    assert!(err.contains("AttnUpDecoderBlock2D"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();

    let dir = vae_copy("attn", |c| c["mid_block_add_attention"] = false.into());
    let err = load_err(&dir);
    assert!(err.contains("field `mid_block_add_attention`"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = vae_copy("missing", |_| {});
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = "decoder.up_blocks.1.resnets.0.conv1.weight";
    assert!(tensors.remove(name).is_some());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains(name), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_latent_channels_are_rejected() {
    let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).unwrap();
    let latents = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode_latents(&latents).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
}

/// The candle bug `AutoencoderKL::decode` works around: if this starts failing, candle's CPU
/// matmul has been fixed and the VAE can decode whole batches again.
#[test]
fn candle_linear_on_transposed_batch_is_still_wrong() {
    use candle_nn::Module;
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 2. * 4. * 6., &dev)
        .unwrap()
        .reshape((2, 4, 6))
        .unwrap()
        .transpose(1, 2) // (2, 6, 4), not contiguous
        .unwrap();
    let w = Tensor::arange(0f32, 16., &dev)
        .unwrap()
        .reshape((4, 4))
        .unwrap();
    let linear = candle_nn::Linear::new(w, None);
    let strided = linear.forward(&x).unwrap();
    let contiguous = linear.forward(&x.contiguous().unwrap()).unwrap();
    assert!(max_abs_diff(&strided, &contiguous).unwrap() > 1.0);
}
