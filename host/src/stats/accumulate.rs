//! One pass over a subset input, batch by batch, accumulating every requested statistic.

use gs_plugin_api::{StatKind, StatsRequest};

use super::InputStats;

/// `XᵀX` accumulation `h += xᵀx` for `x: [rows, k]` into `h: [k, k]` (f64), provided by the
/// compute device so that no statistics code runs its own GEMM.
pub type XtxAccumulate<'a> = dyn FnMut(&[f32], usize, usize, &mut [f64]) + 'a;

/// Running statistics of one subset input `X: [tokens, k]`.
#[derive(Debug)]
pub struct Accumulator {
    request: StatsRequest,
    k: usize,
    tokens: u64,
    absmax: Vec<f32>,
    min: Vec<f32>,
    max: Vec<f32>,
    sum_abs: Vec<f64>,
    hessian: Option<Vec<f64>>,
}

impl Accumulator {
    /// Channel statistics are always kept (they are cheap); the Hessian only when requested.
    pub fn new(request: StatsRequest, k: usize) -> Self {
        Self {
            request,
            k,
            tokens: 0,
            absmax: vec![0.0; k],
            min: vec![f32::INFINITY; k],
            max: vec![f32::NEG_INFINITY; k],
            sum_abs: vec![0.0; k],
            hessian: request
                .contains(StatKind::HESSIAN)
                .then(|| vec![0.0; k * k]),
        }
    }

    /// Adds a batch `x: [rows, k]` (row-major).
    pub fn observe(&mut self, x: &[f32], xtx: &mut XtxAccumulate<'_>) {
        let rows = x.len() / self.k.max(1);
        debug_assert_eq!(rows * self.k, x.len());
        for row in x.chunks_exact(self.k) {
            for (j, &v) in row.iter().enumerate() {
                self.absmax[j] = self.absmax[j].max(v.abs());
                self.min[j] = self.min[j].min(v);
                self.max[j] = self.max[j].max(v);
                self.sum_abs[j] += f64::from(v.abs());
            }
        }
        if let Some(h) = self.hessian.as_mut() {
            xtx(x, rows, self.k, h);
        }
        self.tokens += rows as u64;
    }

    /// The finished statistics; the Hessian is summed over tokens (not averaged), in f32.
    pub fn finish(self) -> InputStats {
        let n = self.tokens.max(1) as f64;
        let mut computed =
            StatsRequest::ABSMAX | StatsRequest::MIN | StatsRequest::MAX | StatsRequest::MEAN_ABS;
        if self.hessian.is_some() {
            computed = computed | StatsRequest::HESSIAN;
        }
        debug_assert!(computed.0 & self.request.0 == self.request.0 || self.tokens == 0);
        InputStats {
            k: self.k,
            tokens: self.tokens,
            computed,
            mean_abs: self.sum_abs.iter().map(|s| (s / n) as f32).collect(),
            absmax: self.absmax,
            min: self.min,
            max: self.max,
            hessian: self
                .hessian
                .map(|h| h.into_iter().map(|v| v as f32).collect())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive `h += xᵀx`, the definition.
    fn naive_xtx(x: &[f32], rows: usize, k: usize, h: &mut [f64]) {
        for r in 0..rows {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += f64::from(x[r * k + i]) * f64::from(x[r * k + j]);
                }
            }
        }
    }

    #[test]
    fn statistics_over_two_batches_equal_the_definitions() {
        // X = [[1, -2], [3, 0.5]] then [[-4, 2]]: 3 tokens, 2 channels.
        let mut a = Accumulator::new(StatsRequest::HESSIAN, 2);
        a.observe(&[1.0, -2.0, 3.0, 0.5], &mut naive_xtx);
        a.observe(&[-4.0, 2.0], &mut naive_xtx);
        let s = a.finish();
        assert_eq!(s.tokens, 3);
        assert_eq!(s.absmax, [4.0, 2.0]);
        assert_eq!(s.min, [-4.0, -2.0]);
        assert_eq!(s.max, [3.0, 2.0]);
        // mean |x|: (1+3+4)/3, (2+0.5+2)/3
        assert_eq!(s.mean_abs, [8.0 / 3.0, 1.5]);
        // XᵀX: [1+9+16, -2+1.5-8; ·, 4+0.25+4]
        assert_eq!(s.hessian, [26.0, -8.5, -8.5, 8.25]);
        assert!(s.computed.contains(StatKind::HESSIAN));
    }

    #[test]
    fn the_hessian_is_only_built_when_requested() {
        let mut a = Accumulator::new(StatsRequest::ABSMAX, 3);
        a.observe(&[1.0, 2.0, 3.0], &mut |_, _, _, _| panic!("not requested"));
        let s = a.finish();
        assert!(s.hessian.is_empty() && !s.computed.contains(StatKind::HESSIAN));
    }
}
