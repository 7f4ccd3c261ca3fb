//! What Adam, SGD and the EMA share about their per-variable state (Adam's moments, SGD's momentum, the
//! EMA's average): unique variable names, which variables take the fast in-place CPU path, and loading a
//! saved state back (one check that names every mismatch, then the values in variable order).

use std::collections::{BTreeMap, HashSet};

use candle_core::{DType, Tensor, Var};

/// The gradient of a weight with every filter's mean taken out: for rank 2 and up (`[out, in]`, `[out, in,
/// k, k]`), `g - mean(g[o, ..])` for each output `o`, so each filter's update sums to zero (Yong, Huang,
/// Hua and Zhang, "Gradient Centralization", ECCV 2020); vectors (biases, BatchNorm) as they are.
pub(crate) fn centralized(g: &Tensor, on: bool) -> Result<Tensor> {
    if !on || g.rank() < 2 {
        return Ok(g.clone());
    }
    let flat = g.flatten_from(1)?;
    Ok(flat
        .broadcast_sub(&flat.mean_keepdim(1)?)?
        .reshape(g.shape())?)
}

/// For `#[serde(skip_serializing_if)]`: a switch left off is not written.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

use crate::{OptimError, Result};

/// `vars` as given, or the first name that occurs twice (names key checkpoints, so they must be unique).
pub(crate) fn unique_names(vars: Vec<(String, Var)>) -> Result<Vec<(String, Var)>> {
    let mut seen = HashSet::new();
    for (name, _) in &vars {
        if !seen.insert(name.as_str()) {
            return Err(OptimError::DuplicateVar { name: name.clone() });
        }
    }
    Ok(vars)
}

/// True when the variable can take the fast in-place path (contiguous f32 on the CPU).
pub(crate) fn is_fast(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32 && var.layout().is_contiguous()
}

/// Checks `saved` (variable name -> saved buffers) against `vars` (name and variable, in order): every
/// variable present, each of its buffers (`lens`) as long as the variable, and no saved variable unknown
/// here. `what` names the saved thing ("moments", "momentum buffer", "average") and `owner` whose state it
/// is ("optimiser", "moving average"). Then returns the saved entries in the order of `vars`.
pub(crate) fn take_in_order<'a, T>(
    vars: impl Iterator<Item = (&'a str, &'a Var)> + Clone,
    mut saved: BTreeMap<String, T>,
    lens: impl Fn(&T) -> Vec<usize>,
    what: &str,
    owner: &str,
) -> Result<Vec<T>> {
    for (name, var) in vars.clone() {
        let mismatch = |reason: String| OptimError::StateMismatch {
            name: name.to_string(),
            reason,
        };
        let Some(entry) = saved.get(name) else {
            return Err(mismatch(format!(
                "variable missing from the saved {owner} state"
            )));
        };
        let n = var.elem_count();
        let lens = lens(entry);
        if lens.iter().any(|&l| l != n) {
            let counts: Vec<String> = lens.iter().map(usize::to_string).collect();
            return Err(mismatch(format!(
                "saved {what} has {} values, the variable {:?} has {n}",
                counts.join(" / "),
                var.dims()
            )));
        }
    }
    if let Some(extra) = saved
        .keys()
        .find(|k| !vars.clone().any(|(name, _)| name == k.as_str()))
    {
        return Err(OptimError::StateMismatch {
            name: extra.clone(),
            reason: format!("saved {owner} state has a variable this {owner} does not"),
        });
    }
    Ok(vars.filter_map(|(name, _)| saved.remove(name)).collect())
}

/// Saved values as a tensor of `var`'s shape, dtype and device.
pub(crate) fn tensor_like(values: Vec<f32>, var: &Var) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)
}

/// Helpers shared by the optimisers' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor, Var};

    /// Named variables from (name, values, shape).
    pub(crate) fn vars_from(data: &[(&str, Vec<f32>, &[usize])]) -> Vec<(String, Var)> {
        data.iter()
            .map(|(n, d, s)| {
                let t = Tensor::from_vec(d.clone(), *s, &Device::Cpu).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    /// The largest absolute difference of two tensors of one shape.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    pub(crate) fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}
