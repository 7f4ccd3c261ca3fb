//! The statistics of a paired-seed comparison, as pure functions.
//!
//! A candidate and the baseline are trained on the same seeds, so each seed gives one paired difference
//! `d_i = candidate_i - baseline_i` of final validation accuracy (the seed fixes the initial weights, the
//! shuffles and the augmentation, which removes most of the run-to-run noise both runs share). Over `n`
//! seeds: the mean `d̄`, the sample standard deviation `s` (n - 1 in the denominator), the standard error
//! `s / √n`, and the Student-t interval `d̄ ± t(1 - α/2, n - 1) · s / √n`.
//!
//! **The sequential rule** (Bonferroni over looks). The seeds are run in rounds and the differences are
//! looked at after each round, `K` looks in all, at the seed counts [`default_looks`] or the plan gives.
//! Every look uses the two-sided interval at confidence `1 - α / K`, where `1 - α` is the stated
//! confidence: a candidate whose interval lies wholly below zero is *worse* and stops, one whose interval
//! lies wholly above zero is *better* and stops too (unless told to go on), and the others continue to the
//! next round, up to the plan's last seed. By the Bonferroni inequality, a candidate with no true effect
//! gets a verdict (better or worse) at some look with probability at most `α`, so each verdict holds at the
//! stated confidence however many looks were taken. The rule is conservative (Pocock's constant level,
//! e.g., would be less strict), which is the price of stopping early without a table of boundaries.

use serde::{Deserialize, Serialize};

use crate::compare::stats;

/// The verdict of one look at a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The interval lies wholly above zero.
    Better,
    /// The interval lies wholly below zero.
    Worse,
    /// The interval contains zero.
    Undecided,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Undecided => "undecided",
        })
    }
}

/// The paired differences of one candidate against the baseline, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedStats {
    /// Number of pairs (seeds).
    pub n: usize,
    /// Mean difference.
    pub mean: f64,
    /// Sample standard deviation of the differences (n - 1 in the denominator).
    pub sd: f64,
    /// Standard error of the mean, `sd / √n`.
    pub se: f64,
    /// The two-sided confidence of `interval`.
    pub confidence: f64,
    /// Student-t interval of the mean difference: `mean ± t(1 - (1 - confidence) / 2, n - 1) · se`.
    pub interval: (f64, f64),
    /// What the interval says.
    pub verdict: Verdict,
}

/// Summarises paired differences with a two-sided Student-t interval at `confidence` (in (0, 1)).
/// `None` below two differences (no spread to estimate) or for a confidence outside (0, 1).
pub fn paired_stats(diffs: &[f64], confidence: f64) -> Option<PairedStats> {
    if diffs.len() < 2 || !(confidence > 0.0 && confidence < 1.0) {
        return None;
    }
    let (mean, sd, _, _) = stats(diffs)?;
    let sd = sd?;
    let n = diffs.len();
    let se = sd / (n as f64).sqrt();
    let half = t_quantile(1.0 - (1.0 - confidence) / 2.0, (n - 1) as f64) * se;
    let interval = (mean - half, mean + half);
    Some(PairedStats {
        n,
        mean,
        sd,
        se,
        confidence,
        interval,
        verdict: verdict(interval),
    })
}

/// Better when the interval lies wholly above zero, worse when wholly below, else undecided.
pub fn verdict((low, high): (f64, f64)) -> Verdict {
    if low > 0.0 {
        Verdict::Better
    } else if high < 0.0 {
        Verdict::Worse
    } else {
        Verdict::Undecided
    }
}

/// The confidence each of `looks` looks uses so that the verdicts hold at `confidence` over all of them
/// (Bonferroni): `1 - (1 - confidence) / looks`.
pub fn per_look_confidence(confidence: f64, looks: usize) -> f64 {
    1.0 - (1.0 - confidence) / looks.max(1) as f64
}

/// The seed counts to look at when a plan names none, for `seeds` seeds in all: 3, then doubling (6, 12,
/// 24, ...), and always the last seed; a single look at `seeds` when there are 3 or fewer.
pub fn default_looks(seeds: usize) -> Vec<usize> {
    let mut looks = Vec::new();
    let mut n = 3;
    while n < seeds {
        looks.push(n);
        n *= 2;
    }
    looks.push(seeds);
    looks
}

/// Whether a candidate goes on after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Train it on the next round's seeds.
    Continue,
    /// Done: this is its verdict.
    Stop(Verdict),
}

/// The sequential rule at one look: stop a worse candidate, stop a better one when `stop_when_better`,
/// and stop every candidate at the `last` look.
pub fn decide(stats: &PairedStats, last: bool, stop_when_better: bool) -> Decision {
    match stats.verdict {
        Verdict::Worse => Decision::Stop(Verdict::Worse),
        Verdict::Better if stop_when_better => Decision::Stop(Verdict::Better),
        v if last => Decision::Stop(v),
        _ => Decision::Continue,
    }
}

/// The `p` quantile of Student's t distribution with `df` degrees of freedom (`p` in (0, 1), `df` > 0),
/// found by bisection on [`t_cdf`] to about 1e-12 relative; NaN outside the domain.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && df > 0.0) {
        return f64::NAN;
    }
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while t_cdf(hi, df) < p {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-12 * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The cumulative distribution function of Student's t with `df` degrees of freedom:
/// `1 - I_x(df/2, 1/2) / 2` for `t >= 0`, with `x = df / (df + t²)` and `I` the regularised incomplete
/// beta function.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, x);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularised incomplete beta function `I_x(a, b)`, by its continued fraction (Numerical Recipes,
/// 6.4), using the symmetry `I_x(a, b) = 1 - I_{1-x}(b, a)` where the fraction converges slowly.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let even = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + even * d);
        c = guard(1.0 + even / c);
        h *= d * c;
        let odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + odd * d);
        c = guard(1.0 + odd / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |acc, (i, g)| acc + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn ln_gamma_matches_factorials_and_sqrt_pi() {
        for (x, fact) in [(1.0, 1.0f64), (2.0, 1.0), (5.0, 24.0), (10.0, 362_880.0)] {
            assert!(close(ln_gamma(x), fact.ln(), 1e-12), "ln Γ({x})");
        }
        let sqrt_pi = std::f64::consts::PI.sqrt();
        assert!(close(ln_gamma(0.5), sqrt_pi.ln(), 1e-12));
        assert!(close(ln_gamma(1.5), (0.5 * sqrt_pi).ln(), 1e-12));
    }

    #[test]
    fn t_cdf_has_closed_forms_at_one_and_two_degrees() {
        // df = 1 is the Cauchy distribution; df = 2 has F(t) = 1/2 + t / (2 √(2 + t²)).
        for t in [-3.0f64, -0.5, 0.0, 0.7, 2.0, 10.0] {
            let cauchy = 0.5 + f64::atan(t) / std::f64::consts::PI;
            assert!(close(t_cdf(t, 1.0), cauchy, 1e-12), "df 1, t {t}");
            let two = 0.5 + t / (2.0 * (2.0 + t * t).sqrt());
            assert!(close(t_cdf(t, 2.0), two, 1e-12), "df 2, t {t}");
        }
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        // Two-sided 95%, 99% and 90% critical values (e.g. NIST/SEMATECH e-Handbook, table 1.4.2.7.3).
        let table = [
            (0.975, 1.0, 12.706_205),
            (0.975, 2.0, 4.302_653),
            (0.975, 4.0, 2.776_445),
            (0.975, 9.0, 2.262_157),
            (0.975, 30.0, 2.042_272),
            (0.995, 9.0, 3.249_836),
            (0.995, 2.0, 9.924_843),
            (0.95, 5.0, 2.015_048),
            (0.9875, 4.0, 3.495_406),
        ];
        for (p, df, want) in table {
            let got = t_quantile(p, df);
            assert!(close(got, want, 2e-6), "t({p}, {df}) = {got}, want {want}");
            assert!(close(t_quantile(1.0 - p, df), -want, 2e-6));
        }
        assert_eq!(t_quantile(0.5, 3.0), 0.0);
        assert!(t_quantile(1.0, 3.0).is_nan() && t_quantile(0.9, 0.0).is_nan());
    }

    #[test]
    fn paired_interval_by_hand() {
        // d = 0.1, 0.3, 0.2: mean 0.2, s = √((0.01 + 0.01 + 0) / 2) = 0.1, se = 0.1 / √3 = 0.057735,
        // t(0.975, 2) = 4.302653: 0.2 ± 0.248414 = [-0.048414, 0.448414], which holds zero.
        let s = paired_stats(&[0.1, 0.3, 0.2], 0.95).unwrap();
        assert_eq!(s.n, 3);
        assert!(close(s.mean, 0.2, 1e-12));
        assert!(close(s.sd, 0.1, 1e-12));
        assert!(close(s.se, 0.057_735_03, 1e-8));
        assert!(close(s.interval.0, -0.048_414, 1e-6), "{:?}", s.interval);
        assert!(close(s.interval.1, 0.448_414, 1e-6), "{:?}", s.interval);
        assert_eq!(s.verdict, Verdict::Undecided);
        // At 80% (t(0.9, 2) = 1.885618): 0.2 ± 0.108866 = [0.091134, 0.308866], better.
        let s = paired_stats(&[0.1, 0.3, 0.2], 0.80).unwrap();
        assert!(close(s.interval.0, 0.091_134, 1e-6), "{:?}", s.interval);
        assert_eq!(s.verdict, Verdict::Better);
        // Mirrored differences are worse.
        let s = paired_stats(&[-0.1, -0.3, -0.2], 0.80).unwrap();
        assert_eq!(s.verdict, Verdict::Worse);
        assert!(paired_stats(&[0.1], 0.95).is_none());
        assert!(paired_stats(&[0.1, 0.2], 1.0).is_none());
    }

    #[test]
    fn bonferroni_levels_and_default_looks() {
        assert!(close(per_look_confidence(0.95, 1), 0.95, 1e-15));
        assert!(close(per_look_confidence(0.95, 2), 0.975, 1e-15));
        assert!(close(per_look_confidence(0.95, 4), 0.9875, 1e-15));
        assert_eq!(default_looks(2), vec![2]);
        assert_eq!(default_looks(3), vec![3]);
        assert_eq!(default_looks(5), vec![3, 5]);
        assert_eq!(default_looks(8), vec![3, 6, 8]);
        assert_eq!(default_looks(12), vec![3, 6, 12]);
        assert_eq!(default_looks(20), vec![3, 6, 12, 20]);
    }

    #[test]
    fn the_rule_stops_worse_always_better_when_asked_and_everyone_last() {
        let at = |v: Verdict| PairedStats {
            n: 3,
            mean: 0.0,
            sd: 0.0,
            se: 0.0,
            confidence: 0.95,
            interval: (0.0, 0.0),
            verdict: v,
        };
        use Decision::*;
        use Verdict::*;
        assert_eq!(decide(&at(Worse), false, false), Stop(Worse));
        assert_eq!(decide(&at(Better), false, true), Stop(Better));
        assert_eq!(decide(&at(Better), false, false), Continue);
        assert_eq!(decide(&at(Undecided), false, true), Continue);
        assert_eq!(decide(&at(Undecided), true, true), Stop(Undecided));
        assert_eq!(decide(&at(Better), true, false), Stop(Better));
    }
}
