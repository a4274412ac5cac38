//! A CPU random generator that reproduces `torch.Generator().manual_seed(s)` followed by
//! `torch.randn(shape, generator=g)` in float32, bit for bit, so that a pipeline seeded here
//! starts from the same latents as diffusers' `randn_tensor` with a CPU generator.
//!
//! Written by hand, Mersenne Twister included: no crate reproduces torch's stream, which is
//! mt19937 plus torch's own conversions and Box–Muller layouts:
//!
//! * The engine is the standard 32-bit mt19937, seeded with the low 32 bits of the seed
//!   (`manual_seed(2**32 + 5)` draws what `manual_seed(5)` draws; `initial_seed` keeps all 64).
//! * Tensors of 16 elements or more (`normal_fill` in ATen's `DistributionTemplates.h`) take one
//!   u32 per element, keep its low 24 bits as a float in [0, 1), then transform blocks of 16 in
//!   place: elements 0..8 of a block hold the uniforms for the radii, 8..16 those for the
//!   angles, and the block's cosines land in 0..8, its sines in 8..16. A size that is not a
//!   multiple of 16 draws 16 fresh uniforms and recomputes the last 16 elements, overwriting
//!   part of the last full block.
//! * On x86 that transform runs in AVX2 (also on AVX-512 machines: ATen does not dispatch
//!   `normal_stub` to AVX-512) with the Cephes-style `log` and `sincos` polynomials of
//!   `avx_mathfun.h`, not libm; GCC contracts some of their multiply-adds into FMAs. The scalar
//!   functions below repeat those operations in the same order with the same fusions, so the
//!   result matches torch exactly (checked against a GCC build of the header for every one of
//!   the 2^24 possible inputs). torch on ARM, or with `ATEN_CPU_CAPABILITY=default`, uses libm
//!   and differs in the last bits; this module follows x86, where the goldens come from.
//! * Tensors of fewer than 16 elements take the scalar path: per element a double normal from
//!   two 53-bit uniforms (two u32 each), of which the sine half is cached in the generator and
//!   returned by the next scalar draw — even one made by a later `randn` call. A vectorised
//!   fill neither reads nor clears that cache; reseeding clears it.

use std::fmt;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A torch-compatible CPU generator. `Clone` forks the stream: both copies then draw the same.
#[derive(Clone)]
pub struct Generator {
    initial_seed: u64,
    engine: Mt19937,
    /// The second value of the last scalar Box–Muller pair (torch's `next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl fmt::Debug for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generator")
            .field("initial_seed", &self.initial_seed)
            .field("position", &self.engine.next)
            .field("cached_normal", &self.cached_normal)
            .finish()
    }
}

impl Generator {
    /// `torch.Generator().manual_seed(seed)`.
    pub fn manual_seed(seed: u64) -> Self {
        Self {
            initial_seed: seed,
            engine: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// The seed given to `manual_seed`, all 64 bits (`torch.Generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.initial_seed
    }

    /// `torch.randn(shape, generator=self)` in float32, row-major.
    pub fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("randn: shape {shape:?} overflows usize")))?;
        let mut out = vec![0.0f32; numel];
        self.fill_randn(&mut out);
        Ok(out)
    }

    /// Fills `out` as `torch.randn(out.len(), generator=self)` would: the stream depends only on
    /// the number of elements, not on the shape.
    pub fn fill_randn(&mut self, out: &mut [f32]) {
        if out.len() >= 16 {
            self.fill_normal_vectorised(out);
        } else {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
        }
    }

    /// `torch.randn(shape, generator=self)` as a float32 tensor on `device`. The numbers are
    /// always drawn on the CPU, as diffusers does for a CPU generator.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let data = self.randn(shape)?;
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// torch's `normal_fill` for float32: all uniforms first, then Box–Muller in place.
    fn fill_normal_vectorised(&mut self, out: &mut [f32]) {
        debug_assert!(out.len() >= 16);
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        let mut blocks = out.chunks_exact_mut(16);
        for block in &mut blocks {
            box_muller_16(block);
        }
        if !blocks.into_remainder().is_empty() {
            // torch redraws the whole last window rather than the few elements left over.
            let start = out.len() - 16;
            let tail = &mut out[start..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
    }

    /// One value of torch's scalar `normal_distribution<double>` (mean 0, std 1).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        // torch names them the other way round: the first uniform is the angle's, and the
        // radius takes log1p(-u) so that u = 0 stays finite.
        let u_angle = self.uniform_f64();
        let u_radius = self.uniform_f64();
        let radius = (-2.0 * (-u_radius).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u_angle;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// Uniform in [0, 1) from the low 24 bits of one u32 (torch's `uniform_real<float>`).
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [0, 1) from the low 53 bits of a u64 made of two u32, the first one high
    /// (torch's `random64` and `uniform_real<double>`).
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.engine.next_u32());
        let lo = u64::from(self.engine.next_u32());
        let bits = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Box–Muller on one block of 16 uniforms: `u[j]` and `u[j + 8]` make the pair j, whose cosine
/// goes to j and sine to j + 8. Float32 throughout, as in torch's AVX2 `NormalFill16`.
fn box_muller_16(block: &mut [f32]) {
    // 2π rounded to float once, as `_mm256_set1_ps(2.0f * c10::pi<double>)` does.
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    let (radius_u, angle_u) = block.split_at_mut(8);
    for (r, a) in radius_u.iter_mut().zip(angle_u.iter_mut()) {
        // 1 - u is exact for a 24-bit u and lies in (0, 1], so the log is finite.
        let radius = (-2.0 * cephes_log(1.0 - *r)).sqrt();
        let (sin, cos) = cephes_sincos(TWO_PI * *a);
        *r = radius * cos;
        *a = radius * sin;
    }
}

/// Natural log of a positive, normal float the way `avx_mathfun.h`'s `log256_ps` computes it
/// (Cephes `logf`): x = m·2^e with m in [√½, √2), log(x) = e·ln2 + P(m - 1). `mul_add` marks
/// where GCC fuses; the other products are exact, so fusing them or not changes nothing.
fn cephes_log(x: f32) -> f32 {
    const SQRT_HALF: f32 = 0.707_106_77;
    // Minimax coefficients of Cephes' logf, as the header rounds them to float.
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_84e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_7e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    // ln 2 split in a part with few bits (so e·LN2_HI is exact) and the rest.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;

    let bits = x.to_bits();
    // Mantissa forced into [0.5, 1); the exponent counted for that range.
    let mantissa = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = mantissa - 1.0;
    if mantissa < SQRT_HALF {
        e -= 1.0;
        m += mantissa;
    }
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * LN2_LO);
    y -= z * 0.5;
    (m + y) + e * LN2_HI
}

/// (sin θ, cos θ) for 0 ≤ θ < 8192 the way `sincos256_ps` (Cephes `sinf`/`cosf`) computes
/// them: reduce by multiples of π/4 in three steps, then one polynomial near 0 for each.
fn cephes_sincos(theta: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    // -π/4 split in three so that the reduction keeps about 32 extra bits.
    const MINUS_DP: [f32; 3] = [-0.785_156_25, -2.418_756_5e-4, -3.774_895e-8];
    const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];

    let x = theta.abs();
    // Octant rounded up to even: j·π/4 is the nearest even multiple, which both polynomials
    // take as origin. Truncation, as `_mm256_cvttps_epi32`.
    let j = ((x * FOUR_OVER_PI) as i32 + 1) & !1;
    let jf = j as f32;
    let mut r = x;
    for dp in MINUS_DP {
        r = jf.mul_add(dp, r);
    }
    let z = r * r;

    let mut cos_poly = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]) * z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5)) + 1.0;
    let sin_poly = (SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]) * z).mul_add(r, r);

    // Octants 2, 3, 6, 7 (mod 8) swap the roles of the two polynomials.
    let (mut sin, mut cos) = if j & 2 == 0 {
        (sin_poly, cos_poly)
    } else {
        (cos_poly, sin_poly)
    };
    if (j & 4 != 0) != theta.is_sign_negative() {
        sin = -sin;
    }
    if (j - 2) & 4 == 0 {
        cos = -cos;
    }
    (sin, cos)
}

/// The 32-bit Mersenne Twister as `std::mt19937` and torch's `at::mt19937` define it.
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; MT_N]>,
    /// Index of the next state word to temper; `MT_N` means the block must be regenerated.
    next: usize,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, next: MT_N }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..MT_N {
            // The last word pairs with the already regenerated s[0], as in the reference.
            let y = (s[i] & 0x8000_0000) | (s[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 0 { 0 } else { 0x9908_b0df };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixtures_dir, load_goldens};

    fn goldens() -> Vec<(String, Tensor)> {
        let path = fixtures_dir().join("randn/randn.safetensors");
        let mut all: Vec<_> = load_goldens(&path).unwrap().into_iter().collect();
        // Stream calls must be replayed in order; the zero-padded index sorts them.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// `seed{S}.{fresh|streamKK}.{AxBxC}` -> (S, kind, shape).
    fn parse_name(name: &str) -> (u64, &str, Vec<usize>) {
        let mut parts = name.split('.');
        let (seed, kind, shape) = (parts.next(), parts.next(), parts.next());
        let seed = seed.and_then(|s| s.strip_prefix("seed")).unwrap();
        let shape = shape.unwrap().split('x').map(|d| d.parse().unwrap());
        (seed.parse().unwrap(), kind.unwrap(), shape.collect())
    }

    fn max_abs_err(ours: &[f32], torch: &Tensor, name: &str) -> f32 {
        let torch = torch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), torch.len(), "{name}: length");
        let err = ours
            .iter()
            .zip(&torch)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-6, "{name}: max abs error {err:e}");
        // Stricter than the tolerance: the FMA placement in the Cephes functions only shows in
        // the last bit, and it is what makes the noise identical to torch's.
        let differing = ours
            .iter()
            .zip(&torch)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{name}: elements not bit-identical to torch");
        err
    }

    #[test]
    fn mt19937_matches_the_standard() {
        // The C++ standard fixes the 10000th output of a default-seeded std::mt19937.
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn fresh_generators_match_torch() {
        let mut checked = 0;
        let mut worst = 0.0f32;
        for (name, golden) in goldens() {
            let (seed, kind, shape) = parse_name(&name);
            if kind != "fresh" {
                continue;
            }
            assert_eq!(golden.dims(), shape.as_slice(), "{name}: stored shape");
            let ours = Generator::manual_seed(seed).randn(&shape).unwrap();
            worst = worst.max(max_abs_err(&ours, &golden, &name));
            checked += 1;
        }
        assert_eq!(checked, 55, "fresh goldens found");
        eprintln!("fresh: {checked} tensors, max abs error {worst:e}");
    }

    #[test]
    fn consecutive_calls_continue_the_stream_like_torch() {
        let mut current: Option<(u64, Generator)> = None;
        let mut checked = 0;
        let mut worst = 0.0f32;
        for (name, golden) in goldens() {
            let (seed, kind, shape) = parse_name(&name);
            if !kind.starts_with("stream") {
                continue;
            }
            if current.as_ref().map(|(s, _)| *s) != Some(seed) {
                current = Some((seed, Generator::manual_seed(seed)));
            }
            let generator = &mut current.as_mut().unwrap().1;
            let ours = generator.randn_tensor(&shape, &Device::Cpu).unwrap();
            assert_eq!(ours.dims(), golden.dims(), "{name}: shape");
            let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            worst = worst.max(max_abs_err(&ours, &golden, &name));
            checked += 1;
        }
        assert_eq!(checked, 55, "stream goldens found");
        eprintln!("stream: {checked} tensors, max abs error {worst:e}");
    }

    #[test]
    fn seed_uses_low_32_bits_but_keeps_all_64() {
        let mut a = Generator::manual_seed((1 << 32) + 5);
        let mut b = Generator::manual_seed(5);
        assert_eq!(a.initial_seed(), (1 << 32) + 5);
        assert_eq!(a.randn(&[40]).unwrap(), b.randn(&[40]).unwrap());
        assert_ne!(
            Generator::manual_seed(6).randn(&[40]).unwrap(),
            b.randn(&[40]).unwrap()
        );
    }

    #[test]
    fn clone_forks_the_stream_including_the_cached_normal() {
        let mut a = Generator::manual_seed(3);
        a.randn(&[1]).unwrap(); // leaves the sine half cached
        let mut b = a.clone();
        assert_eq!(a.randn(&[3]).unwrap(), b.randn(&[3]).unwrap());
        assert_eq!(a.randn(&[50]).unwrap(), b.randn(&[50]).unwrap());
    }

    #[test]
    fn cephes_functions_are_accurate() {
        // Guards the transcription of the constants: the polynomials are within a few ulps.
        for k in 1..=1000 {
            let x = k as f32 / 1000.0;
            assert!(
                (cephes_log(x) as f64 - (x as f64).ln()).abs() < 1e-6,
                "log {x}"
            );
            let t = x * std::f32::consts::TAU;
            let (s, c) = cephes_sincos(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 1e-6, "sin {t}");
            assert!((c as f64 - (t as f64).cos()).abs() < 1e-6, "cos {t}");
        }
    }

    #[test]
    fn zero_sized_and_overflowing_shapes() {
        let mut g = Generator::manual_seed(0);
        assert!(g.randn(&[2, 0, 3]).unwrap().is_empty());
        assert!(g.randn(&[usize::MAX, 2]).is_err());
        // Nothing was drawn: the stream still starts where a fresh one does.
        assert_eq!(
            g.randn(&[20]).unwrap(),
            Generator::manual_seed(0).randn(&[20]).unwrap()
        );
    }

    #[test]
    fn latent_sized_draw_is_fast() {
        let mut g = Generator::manual_seed(0);
        let start = std::time::Instant::now();
        let v = g.randn(&[4, 128, 128]).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(v.len(), 4 * 128 * 128);
        // A few milliseconds even unoptimised; the bound only catches accidental quadratic work.
        assert!(elapsed.as_secs_f64() < 2.0, "took {elapsed:?}");
    }
}
