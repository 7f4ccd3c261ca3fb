//! Random affine augmentation of 28x28 images: rotation, scale and shift about the image centre, applied
//! as one inverse map with bilinear or nearest-neighbour sampling (zero outside the image), written
//! straight to `f32 / 255`; optionally composed with an elastic distortion ([`crate::ElasticConfig`]) in
//! the same sampling pass. The batcher may then erase a rectangle of each image or mix the batch's images
//! in pairs ([`crate::EraseConfig`], [`crate::MixConfig`]).

use rand::Rng;

use crate::elastic::{Displacement, ElasticConfig};
use crate::error::{DataError, Result};
use crate::mix::{EraseConfig, MixConfig};
use crate::stroke::ThicknessConfig;
use crate::{IMAGE_PIXELS, IMAGE_SIDE};

/// How much to perturb each training image. `Default` is off: no rotation, no shift, scale 1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// Rotation is uniform in `[-max_rotation_deg, max_rotation_deg]` degrees.
    pub max_rotation_deg: f32,
    /// Shift is uniform in `[-max_shift_px, max_shift_px]` pixels, drawn separately for x and y.
    pub max_shift_px: f32,
    /// Zoom factor is uniform in `[scale_range.0, scale_range.1]` (> 1 enlarges the digit).
    pub scale_range: (f32, f32),
    /// How the warped image samples the source (default bilinear; configs saved before this field
    /// existed read as bilinear).
    pub interpolation: Interpolation,
    /// An elastic distortion after the affine map (`None`, the default, = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elastic: Option<ElasticConfig>,
    /// Random erasing of a rectangle of each warped image (`None`, the default, = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erase: Option<EraseConfig>,
    /// Mixup or CutMix of the images of each batch in pairs (`None`, the default, = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mix: Option<MixConfig>,
    /// Stroke thickness changed after the warp, before erasing (`None`, the default, = off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thickness: Option<ThicknessConfig>,
}

/// How [`warp_into_with`] samples the source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Bilinear weights of the four neighbours (smooth; blurs strokes slightly at sub-pixel offsets).
    #[default]
    Bilinear,
    /// The nearest source pixel (keeps the crisp strokes of the test images; edges move in whole pixels).
    Nearest,
}

impl std::str::FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bilinear" => Ok(Self::Bilinear),
            "nearest" => Ok(Self::Nearest),
            _ => Err(format!("unknown interpolation '{s}' (bilinear or nearest)")),
        }
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            max_rotation_deg: 0.0,
            max_shift_px: 0.0,
            scale_range: (1.0, 1.0),
            interpolation: Interpolation::Bilinear,
            elastic: None,
            erase: None,
            mix: None,
            thickness: None,
        }
    }
}

impl AugmentConfig {
    /// True when every draw leaves the images as they are (the default): no warp, thickness change,
    /// erasing or mixing.
    pub fn is_identity(&self) -> bool {
        !self.warps()
            && self.thickness.is_none_or(|t| t.is_identity())
            && self.erase.is_none_or(|e| e.is_identity())
            && self.mix.is_none()
    }

    /// True when images are warped (an affine map or an elastic distortion that moves something).
    pub fn warps(&self) -> bool {
        !(self.is_affine_identity() && self.elastic.is_none_or(|e| e.is_identity()))
    }

    fn is_affine_identity(&self) -> bool {
        self.max_rotation_deg == 0.0 && self.max_shift_px == 0.0 && self.scale_range == (1.0, 1.0)
    }

    /// Rejects non-finite or negative ranges and non-positive or reversed scales.
    pub fn validate(&self) -> Result<()> {
        let AugmentConfig {
            max_rotation_deg: r,
            max_shift_px: t,
            scale_range: (s0, s1),
            interpolation: _,
            elastic,
            erase,
            mix,
            thickness,
        } = *self;
        if let Some(t) = thickness {
            t.validate()?;
        }
        if let Some(e) = elastic {
            e.validate()?;
        }
        if let Some(e) = erase {
            e.validate()?;
        }
        if let Some(m) = mix {
            m.validate()?;
        }
        let ok = r.is_finite()
            && r >= 0.0
            && t.is_finite()
            && t >= 0.0
            && s0.is_finite()
            && s1.is_finite()
            && s0 > 0.0
            && s0 <= s1;
        if ok {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "augmentation {self:?}: need max_rotation_deg >= 0, max_shift_px >= 0, 0 < scale_range.0 <= scale_range.1, all finite"
            )))
        }
    }

    /// Draws one transform: four uniforms from `rng`, in the order rotation, scale, shift x, shift y.
    pub fn sample(&self, rng: &mut impl Rng) -> Affine {
        let (u_rot, u_scale, u_x, u_y): (f32, f32, f32, f32) =
            (rng.random(), rng.random(), rng.random(), rng.random());
        let (s0, s1) = self.scale_range;
        Affine {
            rotation_deg: (2.0 * u_rot - 1.0) * self.max_rotation_deg,
            scale: s0 + u_scale * (s1 - s0),
            shift_x: (2.0 * u_x - 1.0) * self.max_shift_px,
            shift_y: (2.0 * u_y - 1.0) * self.max_shift_px,
        }
    }
}

/// One concrete transform: `dst = centre + shift + scale * R(rotation) * (src - centre)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Rotation in degrees; positive turns the digit clockwise on screen (see [`warp_into`]).
    pub rotation_deg: f32,
    /// Zoom factor (> 1 enlarges).
    pub scale: f32,
    /// Shift to the right, in pixels.
    pub shift_x: f32,
    /// Shift downwards, in pixels.
    pub shift_y: f32,
}

impl Default for Affine {
    fn default() -> Self {
        Self {
            rotation_deg: 0.0,
            scale: 1.0,
            shift_x: 0.0,
            shift_y: 0.0,
        }
    }
}

/// `i as f32 / 255.0` for every byte, computed once (a division per pixel is measurably slower).
fn div255_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| i as f32 / 255.0))
}

/// Row stride of the zero-padded copy of the source used for sampling: at least one pixel of zeros on
/// each side (28 + 2 = 30 needed), rounded to 32 so that the buffer holds 1024 values and indices masked
/// with `PAD_MASK` need no bounds checks in the inner loop.
const PAD: usize = 32;
const PAD_LEN: usize = PAD * PAD;
const PAD_MASK: usize = PAD_LEN - 1;

/// Applies `t` to one 28x28 `u8` image, writing `pixel / 255` values to `dst` (784 floats).
///
/// Each output pixel samples the source at the inverse-mapped position with bilinear weights; positions
/// outside the image read zero. The identity transform reproduces `src[i] as f32 / 255.0` exactly.
/// The rotation matrix is applied in (x = column, y = row) coordinates with y pointing down, so a
/// positive angle turns the digit clockwise on screen. If either slice is shorter than 784, `dst` is
/// left unchanged (callers in this crate always pass whole images).
pub fn warp_into(src: &[u8], dst: &mut [f32], t: &Affine) {
    warp_into_with(src, dst, t, Interpolation::Bilinear)
}

/// [`warp_into`] with the given sampling: `Nearest` reads the source pixel nearest to the inverse-mapped
/// position (the one whose bilinear weight is largest) instead of blending four.
pub fn warp_into_with(src: &[u8], dst: &mut [f32], t: &Affine, interpolation: Interpolation) {
    warp_field_into(src, dst, t, None, interpolation)
}

/// [`warp_into_with`] followed by a displacement field, in one sampling pass: output pixel `p` samples
/// the source at `A^-1(p + d(p))`, i.e. the affine-warped image distorted by `d` (no field: exactly
/// [`warp_into_with`]).
pub fn warp_field_into(
    src: &[u8],
    dst: &mut [f32],
    t: &Affine,
    field: Option<&Displacement>,
    interpolation: Interpolation,
) {
    let nearest = interpolation == Interpolation::Nearest;
    let (Some(src), Some(dst)) = (src.get(..IMAGE_PIXELS), dst.get_mut(..IMAGE_PIXELS)) else {
        tracing::warn!(
            src = src.len(),
            dst = dst.len(),
            "warp_into: slices shorter than 784"
        );
        return;
    };
    let pad = padded(src);
    let c = (IMAGE_SIDE as f32 - 1.0) / 2.0; // 13.5: the centre between pixels 13 and 14
    let (sin, cos) = t.rotation_deg.to_radians().sin_cos();
    let a = cos / t.scale;
    let b = sin / t.scale;
    // Inverse map: src = c + (1/scale) * R(-θ) * (dst - c - shift), in padded coordinates (+1).
    let dx0 = -c - t.shift_x;
    #[cfg(target_arch = "x86_64")]
    let simd = std::is_x86_feature_detected!("avx512f");
    for (y, dst_row) in dst.chunks_exact_mut(IMAGE_SIDE).enumerate() {
        let dy = y as f32 - c - t.shift_y;
        let row = Row {
            u0: c + 1.0 + a * dx0 + b * dy,
            v0: c + 1.0 - b * dx0 + a * dy,
            a,
            b,
            field: field.map(|f| {
                let r = y * IMAGE_SIDE..(y + 1) * IMAGE_SIDE;
                (&f.dx[r.clone()], &f.dy[r])
            }),
            nearest,
        };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F is present (checked above).
            unsafe { warp512::row(&pad, dst_row, &row) };
            continue;
        }
        row.sample(&pad, dst_row);
    }
}

/// The image as `pixel / 255` in the middle of a zero `PAD x PAD` grid (one pixel of zeros above and
/// to the left).
fn padded(src: &[u8]) -> [f32; PAD_LEN] {
    let lut = div255_table();
    let mut pad = [0f32; PAD_LEN];
    for (row, src_row) in src.chunks_exact(IMAGE_SIDE).take(IMAGE_SIDE).enumerate() {
        let start = (row + 1) * PAD + 1;
        for (p, &s) in pad[start..start + IMAGE_SIDE].iter_mut().zip(src_row) {
            *p = lut[s as usize];
        }
    }
    pad
}

/// One output row of [`warp_field_into`]: output column `x` samples the padded source at
/// `(u0 + a x, v0 - b x)`, moved by the row's displacements if any.
struct Row<'a> {
    u0: f32,
    v0: f32,
    a: f32,
    b: f32,
    /// This row's `(dx, dy)` displacements (28 each).
    field: Option<(&'a [f32], &'a [f32])>,
    nearest: bool,
}

/// The last padded index that still has a right (or lower) neighbour: sampling positions are inside
/// when `0 <= u, v < 29`.
const LIMIT: f32 = (IMAGE_SIDE + 1) as f32;

impl Row<'_> {
    /// The portable sampler (and the reference of [`warp512::row`], which gives the same bits).
    fn sample(&self, pad: &[f32; PAD_LEN], dst_row: &mut [f32]) {
        let (a, b) = (self.a, self.b);
        for (x, out) in dst_row.iter_mut().enumerate() {
            let xf = x as f32;
            let (mut u, mut v) = (self.u0 + a * xf, self.v0 - b * xf);
            if let Some((fx, fy)) = self.field {
                // The inverse map is linear: a displacement (ex, ey) of the output position moves the
                // source position by R(-θ) (ex, ey) / scale.
                let (ex, ey) = (fx[x], fy[x]);
                u += a * ex + b * ey;
                v += a * ey - b * ex;
            }
            *out = if u >= 0.0 && v >= 0.0 && u < LIMIT && v < LIMIT {
                let (x0, y0) = (u as usize, v as usize);
                let (fx, fy) = (u - x0 as f32, v - y0 as f32);
                // x0, y0 <= 28, so every index is below 29 * 32 + 30 < 1024: the masks change nothing.
                let i = y0 * PAD + x0;
                if self.nearest {
                    let j = i + (fy >= 0.5) as usize * PAD + (fx >= 0.5) as usize;
                    *out = pad[j & PAD_MASK];
                    continue;
                }
                let (p00, p01) = (pad[i & PAD_MASK], pad[(i + 1) & PAD_MASK]);
                let (p10, p11) = (pad[(i + PAD) & PAD_MASK], pad[(i + PAD + 1) & PAD_MASK]);
                let top = p00 + fx * (p01 - p00);
                let bottom = p10 + fx * (p11 - p10);
                top + fy * (bottom - top)
            } else {
                0.0
            };
        }
    }
}

/// [`Row::sample`] 16 columns at a time (a 28-pixel row is a full vector and a 12-lane one), the four
/// neighbours fetched with gathers: the same operations in the same order on every lane (separate
/// multiplies and adds, no fused multiply-add; truncation for the integer part; ordered comparisons, so
/// a NaN position reads zero as in the scalar code), hence the same bits.
#[cfg(target_arch = "x86_64")]
mod warp512 {
    use super::{Row, LIMIT, PAD, PAD_LEN};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(pad: &[f32; PAD_LEN], dst_row: &mut [f32], r: &Row) {
        let (a, b) = (_mm512_set1_ps(r.a), _mm512_set1_ps(r.b));
        let (u0, v0) = (_mm512_set1_ps(r.u0), _mm512_set1_ps(r.v0));
        let (zero, half, limit) = (
            _mm512_setzero_ps(),
            _mm512_set1_ps(0.5),
            _mm512_set1_ps(LIMIT),
        );
        let lanes = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let n = dst_row.len().min(
            r.field
                .map_or(usize::MAX, |(fx, fy)| fx.len().min(fy.len())),
        );
        let base = pad.as_ptr();
        let mut x0 = 0;
        while x0 < n {
            let take = (n - x0).min(16);
            let m: __mmask16 = if take == 16 {
                0xffff
            } else {
                (1u16 << take) - 1
            };
            let xf = _mm512_add_ps(lanes, _mm512_set1_ps(x0 as f32));
            let mut u = _mm512_add_ps(u0, _mm512_mul_ps(a, xf));
            let mut v = _mm512_sub_ps(v0, _mm512_mul_ps(b, xf));
            if let Some((fx, fy)) = r.field {
                // SAFETY: lanes `< take` only, inside both slices (`x0 + take <= n`).
                let (ex, ey) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(m, fx.as_ptr().add(x0)),
                        _mm512_maskz_loadu_ps(m, fy.as_ptr().add(x0)),
                    )
                };
                u = _mm512_add_ps(u, _mm512_add_ps(_mm512_mul_ps(a, ex), _mm512_mul_ps(b, ey)));
                v = _mm512_add_ps(v, _mm512_sub_ps(_mm512_mul_ps(a, ey), _mm512_mul_ps(b, ex)));
            }
            let inside = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(u, zero)
                & _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, zero)
                & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(u, limit)
                & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, limit)
                & m;
            let (xi, yi) = (_mm512_cvttps_epi32(u), _mm512_cvttps_epi32(v));
            let (fx, fy) = (
                _mm512_sub_ps(u, _mm512_cvtepi32_ps(xi)),
                _mm512_sub_ps(v, _mm512_cvtepi32_ps(yi)),
            );
            // Inside lanes: 0 <= xi, yi <= 28, so `i + PAD + 1 < PAD_LEN`; other lanes are not read.
            let i = _mm512_add_epi32(_mm512_slli_epi32::<5>(yi), xi);
            const _: () = assert!(PAD == 32);
            // SAFETY (every gather below): only `inside` lanes are read, at indices below `PAD_LEN`.
            let gather =
                |idx: __m512i| unsafe { _mm512_mask_i32gather_ps::<4>(zero, inside, idx, base) };
            let out = if r.nearest {
                let j = _mm512_mask_add_epi32(
                    i,
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fy, half),
                    i,
                    _mm512_set1_epi32(PAD as i32),
                );
                let j = _mm512_mask_add_epi32(
                    j,
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fx, half),
                    j,
                    _mm512_set1_epi32(1),
                );
                gather(j)
            } else {
                let (p00, p01) = (gather(i), gather(_mm512_add_epi32(i, _mm512_set1_epi32(1))));
                let (p10, p11) = (
                    gather(_mm512_add_epi32(i, _mm512_set1_epi32(PAD as i32))),
                    gather(_mm512_add_epi32(i, _mm512_set1_epi32(PAD as i32 + 1))),
                );
                let top = _mm512_add_ps(p00, _mm512_mul_ps(fx, _mm512_sub_ps(p01, p00)));
                let bottom = _mm512_add_ps(p10, _mm512_mul_ps(fx, _mm512_sub_ps(p11, p10)));
                _mm512_add_ps(top, _mm512_mul_ps(fy, _mm512_sub_ps(bottom, top)))
            };
            // SAFETY: lanes `< take` only, inside `dst_row` (`x0 + take <= n <= dst_row.len()`).
            unsafe {
                _mm512_mask_storeu_ps(
                    dst_row.as_mut_ptr().add(x0),
                    m,
                    _mm512_maskz_mov_ps(inside, out),
                )
            };
            x0 += take;
        }
    }
}

/// Augments one 28x28 `u8` image into `dst` as `f32 / 255`, drawing a transform from `cfg` with `rng`.
///
/// Without a warp (the default) nothing is drawn and `dst[i] == src[i] as f32 / 255.0` exactly;
/// otherwise four uniforms are drawn per image (then, with an elastic distortion, its `2 * 784`), so the
/// result depends only on `cfg` and the rng state. Erasing and mixing are the batcher's
/// ([`crate::Batcher`]), from rngs of their own.
pub fn augment_into(src: &[u8], dst: &mut [f32], cfg: &AugmentConfig, rng: &mut impl Rng) {
    if !cfg.warps() {
        for (d, &s) in dst.iter_mut().zip(src.iter().take(IMAGE_PIXELS)) {
            *d = s as f32 / 255.0;
        }
        return;
    }
    let t = cfg.sample(rng);
    match cfg.elastic.filter(|e| !e.is_identity()) {
        Some(e) => {
            let field = e.sample(rng);
            warp_field_into(src, dst, &t, Some(&field), cfg.interpolation);
        }
        None => warp_into_with(src, dst, &t, cfg.interpolation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A 10x6 bar of 200s with a bright corner, centred-ish.
    fn blob() -> Vec<u8> {
        let mut img = vec![0u8; 784];
        for y in 9..19 {
            for x in 11..17 {
                img[y * 28 + x] = 200;
            }
        }
        img[9 * 28 + 11] = 255;
        img
    }

    fn div255(src: &[u8]) -> Vec<f32> {
        src.iter().map(|&p| p as f32 / 255.0).collect()
    }

    #[test]
    fn identity_is_exact() {
        let src: Vec<u8> = (0..784).map(|i| (i * 31 % 256) as u8).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut dst = vec![f32::NAN; 784];
        augment_into(&src, &mut dst, &AugmentConfig::default(), &mut rng);
        assert_eq!(dst, div255(&src));
        // The general warp with an identity transform is exact too.
        let mut dst2 = vec![f32::NAN; 784];
        warp_into(&src, &mut dst2, &Affine::default());
        assert_eq!(dst2, div255(&src));
    }

    #[test]
    fn integer_shift_moves_pixels() {
        let src = blob();
        let mut dst = vec![0.0; 784];
        let t = Affine {
            shift_x: 3.0,
            shift_y: -2.0,
            ..Affine::default()
        };
        warp_into(&src, &mut dst, &t);
        for y in 0..28 {
            for x in 0..28 {
                let (sx, sy) = (x as i32 - 3, y as i32 + 2);
                let want = if (0..28).contains(&sx) && (0..28).contains(&sy) {
                    src[sy as usize * 28 + sx as usize] as f32 / 255.0
                } else {
                    0.0
                };
                assert_eq!(dst[y * 28 + x], want, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn rotation_by_90_degrees_turns_the_grid() {
        let src = blob();
        let mut dst = vec![0.0; 784];
        warp_into(
            &src,
            &mut dst,
            &Affine {
                rotation_deg: 90.0,
                ..Affine::default()
            },
        );
        // Clockwise on screen about (13.5, 13.5): src (x, y) lands on (27 - y, x).
        for y in 0..28 {
            for x in 0..28 {
                let want = src[y * 28 + x] as f32 / 255.0;
                let got = dst[x * 28 + (27 - y)];
                assert!((got - want).abs() < 1e-4, "src ({x}, {y}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn keeps_mass_and_is_deterministic() {
        let src = blob();
        let mass: f32 = div255(&src).iter().sum();
        let cfg = AugmentConfig {
            max_rotation_deg: 15.0,
            max_shift_px: 2.0,
            scale_range: (1.0, 1.0),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut changed = 0;
        for _ in 0..50 {
            let mut dst = vec![0.0; 784];
            augment_into(&src, &mut dst, &cfg, &mut rng);
            let m: f32 = dst.iter().sum();
            assert!((m - mass).abs() / mass < 0.05, "mass {m} vs {mass}");
            assert!(dst.iter().all(|&v| (0.0..=1.0).contains(&v)));
            changed += (dst != div255(&src)) as usize;
        }
        assert!(changed >= 49, "only {changed} of 50 images changed");
        // Scaling by s multiplies mass by about s^2.
        let mut dst = vec![0.0; 784];
        warp_into(
            &src,
            &mut dst,
            &Affine {
                scale: 1.2,
                ..Affine::default()
            },
        );
        let m: f32 = dst.iter().sum();
        assert!(
            (m / mass - 1.44).abs() < 0.1,
            "scaled mass ratio {}",
            m / mass
        );

        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut out = vec![0.0; 784 * 4];
            for d in out.chunks_exact_mut(784) {
                augment_into(&src, d, &cfg, &mut rng);
            }
            out
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn nearest_sampling_copies_source_pixels() {
        let src = blob();
        let values: std::collections::BTreeSet<u32> =
            div255(&src).iter().map(|v| v.to_bits()).collect();
        let t = Affine {
            rotation_deg: 7.0,
            scale: 1.07,
            shift_x: 0.6,
            shift_y: -1.3,
        };
        let mut near = vec![0.0; 784];
        warp_into_with(&src, &mut near, &t, Interpolation::Nearest);
        // Every output is one of the source's values (or the zero outside): nothing is blended.
        assert!(near
            .iter()
            .all(|v| *v == 0.0 || values.contains(&v.to_bits())));
        let mut bilinear = vec![0.0; 784];
        warp_into(&src, &mut bilinear, &t);
        assert!(bilinear
            .iter()
            .any(|v| *v != 0.0 && !values.contains(&v.to_bits())));
        // Both put the digit in the same place: the images agree up to the blending.
        let diff: f32 = near.iter().zip(&bilinear).map(|(a, b)| (a - b).abs()).sum();
        let mass: f32 = bilinear.iter().sum();
        assert!(
            diff / mass < 0.5,
            "nearest vs bilinear differ by {}",
            diff / mass
        );
        // A whole-pixel shift is exact with both, and the identity copies the image.
        let shift = Affine {
            shift_x: 2.0,
            ..Affine::default()
        };
        let mut a = vec![0.0; 784];
        let mut b = vec![0.0; 784];
        warp_into_with(&src, &mut a, &shift, Interpolation::Nearest);
        warp_into(&src, &mut b, &shift);
        assert_eq!(a, b);
        warp_into_with(&src, &mut a, &Affine::default(), Interpolation::Nearest);
        assert_eq!(a, div255(&src));
        assert_eq!(
            "nearest".parse::<Interpolation>(),
            Ok(Interpolation::Nearest)
        );
        assert!("cubic".parse::<Interpolation>().is_err());
    }

    #[test]
    fn sample_stays_in_range() {
        let cfg = AugmentConfig {
            max_rotation_deg: 10.0,
            max_shift_px: 2.5,
            scale_range: (0.9, 1.1),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..1000 {
            let t = cfg.sample(&mut rng);
            assert!(t.rotation_deg.abs() <= 10.0);
            assert!(t.shift_x.abs() <= 2.5 && t.shift_y.abs() <= 2.5);
            assert!((0.9..=1.1).contains(&t.scale));
        }
    }

    #[test]
    fn validate_rejects_bad_configs() {
        assert!(AugmentConfig::default().validate().is_ok());
        for bad in [
            AugmentConfig {
                max_rotation_deg: -1.0,
                ..Default::default()
            },
            AugmentConfig {
                max_shift_px: f32::NAN,
                ..Default::default()
            },
            AugmentConfig {
                scale_range: (0.0, 1.0),
                ..Default::default()
            },
            AugmentConfig {
                scale_range: (1.2, 1.1),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(DataError::Config(_))),
                "{bad:?}"
            );
        }
        let json = serde_json::to_string(&AugmentConfig::default()).unwrap();
        assert_eq!(
            serde_json::from_str::<AugmentConfig>(&json).unwrap(),
            AugmentConfig::default()
        );
        let partial: AugmentConfig = serde_json::from_str(r#"{"max_rotation_deg": 10.0}"#).unwrap();
        assert_eq!(partial.scale_range, (1.0, 1.0));
    }

    #[test]
    fn elastic_distortion_composes_with_the_affine_map() {
        let src = blob();
        let affine = AugmentConfig {
            max_rotation_deg: 10.0,
            max_shift_px: 2.0,
            scale_range: (0.9, 1.1),
            ..Default::default()
        };
        let run = |cfg: &AugmentConfig, seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut out = vec![0.0; 784 * 3];
            for d in out.chunks_exact_mut(784) {
                augment_into(&src, d, cfg, &mut rng);
            }
            out
        };
        // Zero alpha is the identity: the same images and draws as no elastic distortion at all.
        let zero = AugmentConfig {
            elastic: Some(ElasticConfig::new(0.0)),
            ..affine
        };
        assert_eq!(run(&zero, 5), run(&affine, 5));
        let only_zero = AugmentConfig {
            elastic: Some(ElasticConfig::new(0.0)),
            ..Default::default()
        };
        assert!(only_zero.is_identity());
        // Deterministic per seed, and different from the affine map alone.
        let elastic = AugmentConfig {
            elastic: Some(ElasticConfig::new(6.0)),
            ..affine
        };
        assert!(!elastic.is_identity());
        assert_eq!(run(&elastic, 5), run(&elastic, 5));
        assert_ne!(run(&elastic, 5), run(&elastic, 6));
        assert_ne!(run(&elastic, 5), run(&affine, 5));
        // One image by hand: the affine transform is drawn first, then the field, and the output is
        // the source sampled at A^-1(p + d(p)) (checked against a zero field and a constant one).
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut got = vec![0.0; 784];
        augment_into(&src, &mut got, &elastic, &mut rng);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let t = elastic.sample(&mut rng);
        let field = ElasticConfig::new(6.0).sample(&mut rng);
        let mut want = vec![0.0; 784];
        warp_field_into(&src, &mut want, &t, Some(&field), Interpolation::Bilinear);
        assert_eq!(got, want);
        let still = Displacement {
            dx: [0.0; 784],
            dy: [0.0; 784],
        };
        let (mut a, mut b) = (vec![0.0; 784], vec![0.0; 784]);
        warp_field_into(&src, &mut a, &t, Some(&still), Interpolation::Bilinear);
        warp_into(&src, &mut b, &t);
        assert_eq!(a, b, "a zero field changes nothing");
        // A constant field of (+2, -1) samples 2 px right and 1 px up: the digit moves left and down.
        let shift = Displacement {
            dx: [2.0; 784],
            dy: [-1.0; 784],
        };
        warp_field_into(
            &src,
            &mut a,
            &Affine::default(),
            Some(&shift),
            Interpolation::Bilinear,
        );
        warp_into(
            &src,
            &mut b,
            &Affine {
                shift_x: -2.0,
                shift_y: 1.0,
                ..Affine::default()
            },
        );
        assert_eq!(a, b);
        // Still a valid image, of about the same mass.
        let mass: f32 = div255(&src).iter().sum();
        let m: f32 = got.iter().sum();
        assert!(got.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!((m / mass - 1.0).abs() < 0.3, "mass ratio {}", m / mass);
        // Bad elastic settings are refused by the augmentation's validation.
        let bad = AugmentConfig {
            elastic: Some(ElasticConfig::new(-1.0)),
            ..affine
        };
        assert!(matches!(bad.validate(), Err(DataError::Config(_))));
        // Configs without the field read as no elastic distortion, and None is not written.
        let json = serde_json::to_string(&affine).unwrap();
        assert!(!json.contains("elastic"), "{json}");
        let back: AugmentConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, affine);
        let json = serde_json::to_string(&elastic).unwrap();
        assert_eq!(
            serde_json::from_str::<AugmentConfig>(&json).unwrap(),
            elastic
        );
    }

    /// The AVX-512 row sampler gives the portable sampler's bits: rows inside, across and outside the
    /// image, exact integer and half-pixel positions, the edges of the sampling range, displacements,
    /// both interpolations, and NaN positions (zeros).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_rows_give_the_scalar_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let src: Vec<u8> = (0..IMAGE_PIXELS).map(|_| rng.random()).collect();
        let pad = padded(&src);
        let fx: Vec<f32> = (0..IMAGE_SIDE)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let fy: Vec<f32> = (0..IMAGE_SIDE)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let mut rows: Vec<(f32, f32, f32, f32)> = (0..2000)
            .map(|_| {
                let th: f32 = rng.random_range(-1.0..1.0);
                let s: f32 = rng.random_range(0.7..1.4);
                let u0 = rng.random_range(-8.0..36.0);
                let v0 = rng.random_range(-8.0..36.0);
                (th.cos() / s, th.sin() / s, u0, v0)
            })
            .collect();
        rows.extend([
            (1.0, 0.0, 1.0, 1.0),
            (1.0, 0.0, 0.0, 0.0),
            (1.0, 0.0, -0.0, 28.0),
            (1.0, 0.0, 1.5, 28.5),
            (1.0, 0.0, 1.0, 29.0),
            (1.0, 0.0, 1.0, 28.999_998),
            (0.5, 0.0, 14.0, -1e-7),
            (1.0, 0.0, 0.5, 0.5),
            (f32::NAN, 0.0, 1.0, 1.0),
            (1.0, 0.0, f32::INFINITY, 1.0),
        ]);
        for (k, &(a, b, u0, v0)) in rows.iter().enumerate() {
            for nearest in [false, true] {
                for field in [None, Some((&fx[..], &fy[..]))] {
                    let row = Row {
                        u0,
                        v0,
                        a,
                        b,
                        field,
                        nearest,
                    };
                    let (mut want, mut got) = ([7f32; IMAGE_SIDE], [7f32; IMAGE_SIDE]);
                    row.sample(&pad, &mut want);
                    // SAFETY: AVX-512F checked above.
                    unsafe { warp512::row(&pad, &mut got, &row) };
                    let bits = |r: &[f32]| r.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "row {k} (a {a}, b {b}, u0 {u0}, v0 {v0}), nearest {nearest}, field {}",
                        field.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn short_slices_do_not_panic() {
        let mut dst = vec![0.5; 10];
        warp_into(&[0; 784], &mut dst, &Affine::default());
        assert_eq!(dst, vec![0.5; 10]);
    }
}
