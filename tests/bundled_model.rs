//! The bundled model draws what it is asked for: `xfuser generate` with no `--model` runs the
//! trained tiny PixArt-α (tests/fixtures/pipelines/tiny-pixart-shapes, made by
//! scripts/train_tiny_pixart.py) on prompts across its palette, and the decoded PNGs are
//! checked: the border's colour is the background asked for, the centre's colour is the
//! shape's. Then the same with each step cache at its default threshold: at least 30 % of the
//! transformer steps skipped, the colours still right, and the PSNR against the uncached
//! pictures printed (docs/trained-model.md records it).

use std::path::Path;
use std::process::Command;
use xfuser::core::testing::TempDir;

/// The palette the model was trained on.
const PALETTE: [(&str, [f64; 3]); 6] = [
    ("red", [255.0, 0.0, 0.0]),
    ("green", [0.0, 255.0, 0.0]),
    ("blue", [0.0, 0.0, 255.0]),
    ("yellow", [255.0, 255.0, 0.0]),
    ("white", [255.0, 255.0, 255.0]),
    ("black", [0.0, 0.0, 0.0]),
];

/// (shape colour, shape, background colour): every colour as a shape and as a background,
/// every shape.
const ASKED: [(&str, &str, &str); 8] = [
    ("red", "circle", "blue"),
    ("green", "square", "black"),
    ("blue", "triangle", "white"),
    ("yellow", "circle", "green"),
    ("white", "square", "red"),
    ("black", "triangle", "yellow"),
    ("yellow", "square", "blue"),
    ("white", "circle", "black"),
];

/// Pictures with both colours right, of 8, that the test requires.
const MUST_PASS: usize = 7;

/// Runs `xfuser generate` on the bundled model with the prompts of [`ASKED`] and `extra`
/// flags; returns the RGB pixels of each picture (in prompt order), their side and stderr.
fn generate(out: &Path, extra: &[&str]) -> (Vec<Vec<u8>>, usize, String) {
    let prompts: Vec<String> = ASKED
        .iter()
        .map(|(colour, shape, background)| {
            format!("a {colour} {shape} on a {background} background")
        })
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xfuser"));
    cmd.args(["generate", "--quiet", "--output-dir"])
        .arg(out)
        .arg("--prompt")
        .args(&prompts)
        .args(extra);
    let run = cmd.output().expect("run xfuser");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "xfuser failed: {stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), ASKED.len(), "stdout: {stdout}");
    let mut side = 0;
    let images = paths
        .iter()
        .map(|p| {
            let img = image::open(p).expect("png").to_rgb8();
            assert_eq!(img.width(), img.height(), "{p}: not square");
            side = img.width() as usize;
            img.into_raw()
        })
        .collect();
    (images, side, stderr)
}

/// Mean RGB of the pixels `keep(x, y)` selects.
fn mean_rgb(pixels: &[u8], side: usize, keep: impl Fn(usize, usize) -> bool) -> [f64; 3] {
    let mut sum = [0.0; 3];
    let mut n = 0.0;
    for y in 0..side {
        for x in 0..side {
            if keep(x, y) {
                let i = 3 * (y * side + x);
                for c in 0..3 {
                    sum[c] += pixels[i + c] as f64;
                }
                n += 1.0;
            }
        }
    }
    sum.map(|s| s / n)
}

fn nearest(rgb: [f64; 3]) -> &'static str {
    let dist = |p: [f64; 3]| (0..3).map(|c| (rgb[c] - p[c]).powi(2)).sum::<f64>();
    PALETTE
        .iter()
        .min_by(|a, b| dist(a.1).total_cmp(&dist(b.1)))
        .map(|(name, _)| *name)
        .expect("a palette")
}

/// What one picture was asked for and what it shows.
struct Verdict {
    asked: String,
    border: [f64; 3],
    centre: [f64; 3],
    right: bool,
}

/// For each picture: the mean colours of its border (the outer 4 pixels) and centre (the middle
/// 1/8 of the side, inside a triangle too), and whether their nearest palette colours are the
/// background and the shape colour asked for.
fn judge(images: &[Vec<u8>], side: usize) -> Vec<Verdict> {
    let border = 4.min(side / 8);
    let half = (side / 16).max(1);
    let (lo, hi) = (side / 2 - half, side / 2 + half);
    images
        .iter()
        .zip(ASKED)
        .map(|(pixels, (colour, shape, background))| {
            let edge = mean_rgb(pixels, side, |x, y| {
                x < border || y < border || x >= side - border || y >= side - border
            });
            let centre = mean_rgb(pixels, side, |x, y| {
                (lo..hi).contains(&x) && (lo..hi).contains(&y)
            });
            Verdict {
                asked: format!("{colour} {shape} on {background}"),
                border: edge,
                centre,
                right: nearest(edge) == background && nearest(centre) == colour,
            }
        })
        .collect()
}

fn passes(verdicts: &[Verdict], what: &str) -> usize {
    let rgb = |c: [f64; 3]| format!("[{:.0}, {:.0}, {:.0}]", c[0], c[1], c[2]);
    for v in verdicts {
        println!(
            "{what}: {}: centre {} = {}, border {} = {}: {}",
            v.asked,
            rgb(v.centre),
            nearest(v.centre),
            rgb(v.border),
            nearest(v.border),
            if v.right { "ok" } else { "WRONG" }
        );
    }
    verdicts.iter().filter(|v| v.right).count()
}

/// PSNR (dB) of `b` against `a`, over all pictures.
fn psnr(a: &[Vec<u8>], b: &[Vec<u8>]) -> f64 {
    let (mut se, mut n) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            se += (*p as f64 - *q as f64).powi(2);
            n += 1.0;
        }
    }
    let mse = se / n;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

/// "cache: computed K of N transformer steps" -> (K, N).
fn cache_line(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("cache: computed "))
        .unwrap_or_else(|| panic!("no cache line in stderr: {stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[0].parse().unwrap(), words[2].parse().unwrap())
}

#[test]
fn the_bundled_model_draws_what_it_is_asked_and_the_caches_keep_it() {
    let tmp = TempDir::new("colours");
    let (plain, side, _) = generate(&tmp.join("plain"), &[]);
    let right = passes(&judge(&plain, side), "uncached");
    println!("uncached: {right} of {} right", ASKED.len());
    assert!(
        right >= MUST_PASS,
        "the bundled model drew {right} of {} pictures right",
        ASKED.len()
    );

    for flag in ["--use-fbcache", "--use-teacache"] {
        let dir = tmp.join(flag.trim_start_matches('-'));
        let (cached, _, stderr) = generate(&dir, &[flag]);
        let (computed, steps) = cache_line(&stderr);
        let right = passes(&judge(&cached, side), flag);
        println!(
            "{flag}: computed {computed} of {steps} steps, {right} of {} right, PSNR vs \
             uncached {:.1} dB",
            ASKED.len(),
            psnr(&plain, &cached)
        );
        assert!(
            (steps - computed) * 10 >= steps * 3,
            "{flag}: skipped {} of {steps} steps, fewer than 30 %",
            steps - computed
        );
        assert!(
            right >= MUST_PASS,
            "{flag}: {right} of {} right",
            ASKED.len()
        );
    }
}
