//! The linear probe: one L2-regularised logistic regression per label on L2-normalised frozen
//! image features, in scikit-learn's parameterisation (`LogisticRegression(C, solver="lbfgs")`):
//! minimise `C * sum_i logloss_i + 0.5 * ||w||^2` over the weights `w` and an unpenalised
//! intercept. We minimise the same objective divided by `C * n` (a mean log-loss plus
//! `||w||^2 / (2 C n)`, as scikit-learn does internally), so that the gradient tolerance means
//! the same at every `C` and size. Fitted by argmin's L-BFGS (Moré-Thuente line search) with our
//! own loss and gradient (f64 sums over the f32 features, the loss compensated and written without
//! cancellation, so that the line search still sees progress at gradient norms near 1e-10), from
//! zero, stopping when the gradient's L2 norm falls under `tol` (1e-8 by default; scikit-learn's
//! default is 1e-4 on the largest component), when an iteration changes the cost by less than
//! f64's epsilon, after `max_iter` iterations, or when the line search gives up.
//!
//! Rows whose truth is masked (`None`) are left out of that label's fit and AUC. The strength
//! `C` is chosen per label on the validation split, from a log-spaced grid, by that label's
//! validation AUC (ties go to the smaller `C`, the stronger penalty). A label whose validation
//! split lacks a class gets the `C` that maximises the validation macro AUC of the fitted labels.
//! A label with one class (or no row) in the training split is not fitted: it predicts its
//! training prior (0.5 when it has no unmasked row), and the report says so. The chosen model is
//! the one fitted on the training split (no refit on train + validation).
//!
//! Features are L2-normalised here, per row, in f64; a row of zeros is refused.

use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use argmin::core::{CostFunction, Executor, Gradient, State, TerminationReason};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use rayon::prelude::*;
use serde::Serialize;

use crate::auc::roc_auc;
use crate::predictions::Predictions;

/// One split's frozen image features with their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// `n x d` row-major features (any scale: rows are L2-normalised by the probe).
    pub x: Vec<f32>,
    pub d: usize,
    /// `n x L` row-major truth; `None` = masked.
    pub truth: Vec<Option<bool>>,
    pub labels: Vec<String>,
    pub images: Vec<String>,
    pub patients: Vec<String>,
}

impl FeatureSet {
    pub fn rows(&self) -> usize {
        self.images.len()
    }

    /// Shapes agree, labels are named once, every feature is finite and no row is all zeros.
    pub fn validate(&self) -> Result<()> {
        let (n, l, d) = (self.rows(), self.labels.len(), self.d);
        ensure!(d > 0, "features: d = 0");
        ensure!(l > 0, "features: no label");
        ensure!(self.x.len() == n * d, "features: {} values for {n} images x d = {d}", self.x.len());
        ensure!(self.truth.len() == n * l, "features: {} truth cells for {n} images x {l} labels", self.truth.len());
        ensure!(self.patients.len() == n, "features: {} patients for {n} images", self.patients.len());
        for (k, label) in self.labels.iter().enumerate() {
            ensure!(!self.labels[..k].contains(label), "features: label {label:?} appears twice");
        }
        for (i, row) in self.x.chunks_exact(d).enumerate() {
            ensure!(row.iter().all(|v| v.is_finite()), "features: image {:?} has a non-finite feature", self.images[i]);
            ensure!(row.iter().any(|&v| v != 0.0), "features: image {:?} has all-zero features", self.images[i]);
        }
        Ok(())
    }

    /// 1 / ||x_i|| per row, in f64.
    fn inverse_norms(&self) -> Vec<f64> {
        self.x
            .chunks_exact(self.d)
            .map(|row| 1.0 / row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
            .collect()
    }

    /// Rows where label `l` is unmasked, with their 0/1 truth.
    fn unmasked(&self, l: usize) -> (Vec<usize>, Vec<bool>) {
        let nl = self.labels.len();
        (0..self.rows()).filter_map(|i| self.truth[i * nl + l].map(|t| (i, t))).unzip()
    }
}

/// The probe's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeConfig {
    /// Inverse regularisation strengths `C` to choose from (any order; sorted ascending).
    pub grid: Vec<f64>,
    /// L-BFGS iterations at most per fit.
    pub max_iter: u64,
    /// Stop when the L2 norm of the gradient of the mean objective is below this.
    pub tol: f64,
    /// L-BFGS memory (scipy's default is 10).
    pub memory: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { grid: log_grid(-3.0, 3.0, 13), max_iter: 1000, tol: 1e-8, memory: 10 }
    }
}

/// `count` values from `10^lo_exp` to `10^hi_exp`, evenly spaced in log10.
pub fn log_grid(lo_exp: f64, hi_exp: f64, count: usize) -> Vec<f64> {
    match count {
        0 => vec![],
        1 => vec![10f64.powf(lo_exp)],
        _ => (0..count).map(|k| 10f64.powf(lo_exp + (hi_exp - lo_exp) * k as f64 / (count - 1) as f64)).collect(),
    }
}

/// One fitted logistic regression (weights on the L2-normalised features).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogisticFit {
    pub c: f64,
    pub w: Vec<f64>,
    pub intercept: f64,
    pub iterations: u64,
    /// L-BFGS converged: the gradient norm fell below `tol`, or an iteration changed the cost
    /// by less than f64's epsilon (the rounding floor; `grad_norm` says how close it got).
    pub converged: bool,
    /// L2 norm of the mean objective's gradient at the solution.
    pub grad_norm: f64,
    /// Why L-BFGS stopped (argmin's words).
    pub stopped: String,
}

/// What a label predicts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum LabelModel {
    Logistic(LogisticFit),
    /// A label with one class (or none) in the training split predicts this constant.
    Constant {
        p: f64,
        reason: String,
    },
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^z) without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// f64 dot product of f32 features with f64 weights, in eight interleaved partial sums (so it
/// vectorises; the order is fixed, so results do not depend on threads).
fn dot(x: &[f32], w: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let tail: f64 = xc.remainder().iter().zip(wc.remainder()).map(|(&a, &b)| a as f64 * b).sum();
    for (xs, ws) in xc.zip(wc) {
        for k in 0..8 {
            acc[k] += xs[k] as f64 * ws[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

impl LabelModel {
    /// Probability of the positive class for one row of features with its inverse norm.
    fn probability(&self, row: &[f32], inv_norm: f64) -> f64 {
        match self {
            LabelModel::Logistic(f) => sigmoid(inv_norm * dot(row, &f.w) + f.intercept),
            LabelModel::Constant { p, .. } => *p,
        }
    }

    /// Probabilities for every row of `set`.
    pub fn predict(&self, set: &FeatureSet) -> Result<Vec<f64>> {
        set.validate()?;
        if let LabelModel::Logistic(f) = self {
            ensure!(f.w.len() == set.d, "probe: fitted on d = {}, features have d = {}", f.w.len(), set.d);
        }
        let inv = set.inverse_norms();
        Ok(set.x.par_chunks_exact(set.d).zip(inv.par_iter()).map(|(row, &s)| self.probability(row, s)).collect())
    }
}

/// A point with its cost and gradient.
type Evaluation = (Vec<f64>, f64, Vec<f64>);

/// One label's objective over its unmasked training rows; parameters are `[w (d), intercept]`.
struct Objective<'a> {
    x: &'a [f32],
    d: usize,
    inv_norm: &'a [f64],
    rows: &'a [usize],
    y: &'a [bool],
    c: f64,
    /// The last point evaluated with its cost and gradient: argmin asks for the two separately,
    /// and at the same point, after every line search.
    last: Mutex<Option<Evaluation>>,
}

impl Objective<'_> {
    /// Mean log-loss + ||w||^2 / (2 C n) and its gradient.
    fn evaluate(&self, p: &[f64]) -> (f64, Vec<f64>) {
        let d = self.d;
        let (w, b) = (&p[..d], p[d]);
        let n = self.rows.len() as f64;
        // The loss is summed with Neumaier's compensation: near the optimum the line search
        // compares costs that differ in their last digits.
        let (mut loss, mut compensation) = (0.0f64, 0.0f64);
        let mut grad = vec![0.0; d + 1];
        for (&i, &t) in self.rows.iter().zip(self.y) {
            let row = &self.x[i * d..(i + 1) * d];
            let s = self.inv_norm[i];
            let z = s * dot(row, w) + b;
            // -log p(y | z) = softplus(-z) for a positive, softplus(z) for a negative, and
            // sigmoid(z) - y = -sigmoid(-z) for a positive: no cancellation on confident rows.
            let term = softplus(if t { -z } else { z });
            let next = loss + term;
            compensation += if loss.abs() >= term.abs() { (loss - next) + term } else { (term - next) + loss };
            loss = next;
            let r = if t { -sigmoid(-z) } else { sigmoid(z) };
            let rs = r * s;
            for (g, &v) in grad[..d].iter_mut().zip(row) {
                *g += rs * v as f64;
            }
            grad[d] += r;
        }
        let reg = 1.0 / (self.c * n);
        let w2: f64 = w.iter().map(|v| v * v).sum();
        for (g, &wj) in grad[..d].iter_mut().zip(w) {
            *g = *g / n + reg * wj;
        }
        grad[d] /= n;
        ((loss + compensation) / n + 0.5 * reg * w2, grad)
    }

    fn cached(&self, p: &[f64]) -> (f64, Vec<f64>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((q, cost, grad)) = last.as_ref() {
            if q.as_slice() == p {
                return (*cost, grad.clone());
            }
        }
        let (cost, grad) = self.evaluate(p);
        *last = Some((p.to_vec(), cost, grad.clone()));
        (cost, grad)
    }
}

impl CostFunction for Objective<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> Result<f64, argmin::core::Error> {
        Ok(self.cached(p).0)
    }
}

impl Gradient for Objective<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> Result<Vec<f64>, argmin::core::Error> {
        Ok(self.cached(p).1)
    }
}

fn check_config(cfg: &ProbeConfig) -> Result<()> {
    ensure!(!cfg.grid.is_empty(), "probe: the C grid is empty");
    ensure!(
        cfg.grid.iter().all(|c| c.is_finite() && *c > 0.0),
        "probe: every C must be positive and finite: {:?}",
        cfg.grid
    );
    ensure!(cfg.tol > 0.0 && cfg.tol.is_finite(), "probe: tol {} must be positive", cfg.tol);
    ensure!(cfg.max_iter > 0 && cfg.memory > 0, "probe: max_iter and memory must be at least 1");
    Ok(())
}

/// Fits label `l` of `set` at strength `c` on its unmasked rows, or returns its constant prior
/// when those rows hold one class or none.
fn fit_rows(set: &FeatureSet, inv_norm: &[f64], l: usize, c: f64, cfg: &ProbeConfig) -> Result<LabelModel> {
    let (rows, y) = set.unmasked(l);
    let positives = y.iter().filter(|&&t| t).count();
    if rows.is_empty() {
        return Ok(LabelModel::Constant { p: 0.5, reason: "no unmasked row in the training split".into() });
    }
    if positives == 0 || positives == rows.len() {
        let p = positives as f64 / rows.len() as f64;
        let class = if positives == 0 { "negative" } else { "positive" };
        return Ok(LabelModel::Constant {
            p,
            reason: format!("every one of the {} unmasked training rows is {class}: predicts its prior", rows.len()),
        });
    }
    let objective = || Objective { x: &set.x, d: set.d, inv_norm, rows: &rows, y: &y, c, last: Mutex::new(None) };
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), cfg.memory)
        .with_tolerance_grad(cfg.tol)?
        // Also stop when an iteration changes the cost by less than one f64 epsilon: below that
        // the line search compares rounding noise and only burns evaluations.
        .with_tolerance_cost(f64::EPSILON)?;
    let result = Executor::new(objective(), solver)
        .configure(|s| s.param(vec![0.0; set.d + 1]).max_iters(cfg.max_iter))
        .timer(false)
        .run()
        .with_context(|| format!("probe: L-BFGS on label {:?} at C = {c}", set.labels[l]))?;
    let state = result.state();
    // The last point, not argmin's "best" (lowest cost): near the optimum the cost stops
    // changing in f64 while the gradient still shrinks, and a tie keeps an earlier point as best.
    // When the line search gives up, argmin's L-BFGS keeps no last point: take the best then.
    let p = state.get_param().or(state.get_best_param()).context("probe: L-BFGS returned no parameters")?.clone();
    // A fresh objective: argmin does not hand the problem back when its line search gives up.
    let (_, grad) = objective().evaluate(&p);
    let grad_norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    let stopped = state.get_termination_reason().map(|r| r.text().to_string()).unwrap_or_default();
    ensure!(p.iter().all(|v| v.is_finite()), "probe: L-BFGS diverged on label {:?} at C = {c}", set.labels[l]);
    Ok(LabelModel::Logistic(LogisticFit {
        c,
        intercept: p[set.d],
        w: p[..set.d].to_vec(),
        iterations: state.get_iter(),
        converged: grad_norm < cfg.tol
            || matches!(state.get_termination_reason(), Some(TerminationReason::SolverConverged)),
        grad_norm,
        stopped,
    }))
}

/// Fits one label at one strength (no validation): the building block of [`LinearProbe::fit`],
/// public for checks against other implementations.
pub fn fit_logistic(set: &FeatureSet, l: usize, c: f64, cfg: &ProbeConfig) -> Result<LabelModel> {
    set.validate()?;
    ensure!(l < set.labels.len(), "probe: label index {l} out of {} labels", set.labels.len());
    ensure!(c.is_finite() && c > 0.0, "probe: C = {c} must be positive and finite");
    fit_rows(set, &set.inverse_norms(), l, c, cfg)
}

/// What `probe.json` says about one label.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelReport {
    pub label: String,
    /// "logistic" or "constant".
    pub model: String,
    pub chosen_c: Option<f64>,
    /// How `chosen_c` was chosen (or why there is none).
    pub chosen_by: String,
    /// This label's validation AUC with the chosen model (None: a class is absent there).
    pub valid_auc: Option<f64>,
    /// This label's validation AUC at every grid value (empty for a constant label).
    pub valid_auc_by_c: Vec<Option<f64>>,
    pub iterations: Option<u64>,
    pub converged: Option<bool>,
    pub grad_norm: Option<f64>,
    pub train_positives: usize,
    pub train_negatives: usize,
    pub train_masked: usize,
    /// Set for a constant label: its predicted value.
    pub constant: Option<f64>,
    pub note: Option<String>,
}

/// Everything `probe.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeReport {
    pub grid: Vec<f64>,
    pub tol: f64,
    pub max_iter: u64,
    pub memory: usize,
    pub features: usize,
    pub train_images: usize,
    pub valid_images: usize,
    /// Validation macro AUC of the fitted (non-constant) labels at every grid value, the
    /// fallback criterion.
    pub valid_macro_auc_by_c: Vec<Option<f64>>,
    /// Validation macro AUC of the chosen models, over every label with both classes there.
    pub valid_macro_auc: Option<f64>,
    pub labels: Vec<LabelReport>,
}

/// A fitted linear probe: one model per label.
#[derive(Clone, Debug)]
pub struct LinearProbe {
    labels: Vec<String>,
    d: usize,
    models: Vec<LabelModel>,
    report: ProbeReport,
}

/// First index of the largest defined value (ties go to the earlier, smaller C).
fn argmax(values: &[Option<f64>]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (k, v) in values.iter().enumerate() {
        if let Some(v) = *v {
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((k, v));
            }
        }
    }
    best.map(|(k, _)| k)
}

impl LinearProbe {
    /// Fits every label at every grid value on `train` (in parallel over label x C), picks each
    /// label's C on `valid` (see the module doc).
    pub fn fit(train: &FeatureSet, valid: &FeatureSet, cfg: &ProbeConfig) -> Result<LinearProbe> {
        train.validate().context("probe: training split")?;
        valid.validate().context("probe: validation split")?;
        check_config(cfg)?;
        ensure!(
            train.labels == valid.labels,
            "probe: the splits' labels differ ({:?} against {:?})",
            train.labels,
            valid.labels
        );
        ensure!(train.d == valid.d, "probe: the splits' feature sizes differ ({} against {})", train.d, valid.d);
        let mut grid = cfg.grid.clone();
        grid.sort_by(f64::total_cmp);
        grid.dedup();
        let nl = train.labels.len();
        let (inv_train, inv_valid) = (train.inverse_norms(), valid.inverse_norms());

        let jobs: Vec<(usize, usize)> = (0..nl).flat_map(|l| (0..grid.len()).map(move |k| (l, k))).collect();
        let fits: Vec<LabelModel> =
            jobs.par_iter().map(|&(l, k)| fit_rows(train, &inv_train, l, grid[k], cfg)).collect::<Result<_>>()?;
        let fit_at = |l: usize, k: usize| &fits[l * grid.len() + k];

        // Validation AUC of every (label, C).
        let valid_cols: Vec<(Vec<usize>, Vec<bool>)> = (0..nl).map(|l| valid.unmasked(l)).collect();
        let valid_auc = |model: &LabelModel, l: usize| -> Option<f64> {
            let (rows, truth) = &valid_cols[l];
            let scores: Vec<f64> = rows
                .iter()
                .map(|&i| model.probability(&valid.x[i * valid.d..(i + 1) * valid.d], inv_valid[i]))
                .collect();
            roc_auc(&scores, truth)
        };
        let auc_by_c: Vec<Vec<Option<f64>>> = (0..nl)
            .map(|l| match fit_at(l, 0) {
                LabelModel::Constant { .. } => vec![],
                _ => (0..grid.len()).map(|k| valid_auc(fit_at(l, k), l)).collect(),
            })
            .collect();
        let macro_by_c: Vec<Option<f64>> = (0..grid.len())
            .map(|k| {
                let defined: Vec<f64> = auc_by_c.iter().filter_map(|a| a.get(k).copied().flatten()).collect();
                (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
            })
            .collect();

        let mut models = Vec::with_capacity(nl);
        let mut reports = Vec::with_capacity(nl);
        for (l, label_auc_by_c) in auc_by_c.iter().enumerate() {
            let (rows, y) = train.unmasked(l);
            let positives = y.iter().filter(|&&t| t).count();
            let mut report = LabelReport {
                label: train.labels[l].clone(),
                model: "logistic".into(),
                chosen_c: None,
                chosen_by: String::new(),
                valid_auc: None,
                valid_auc_by_c: label_auc_by_c.clone(),
                iterations: None,
                converged: None,
                grad_norm: None,
                train_positives: positives,
                train_negatives: rows.len() - positives,
                train_masked: train.rows() - rows.len(),
                constant: None,
                note: None,
            };
            let model = match fit_at(l, 0) {
                LabelModel::Constant { p, reason } => {
                    report.model = "constant".into();
                    report.chosen_by = "not fitted: one class in the training split".into();
                    report.constant = Some(*p);
                    report.note = Some(reason.clone());
                    fit_at(l, 0).clone()
                }
                LabelModel::Logistic(_) => {
                    let k = if let Some(k) = argmax(label_auc_by_c) {
                        report.chosen_by = "this label's validation AUC".into();
                        k
                    } else if let Some(k) = argmax(&macro_by_c) {
                        report.chosen_by =
                            "validation macro AUC (this label lacks a class in the validation split)".into();
                        k
                    } else {
                        bail!(
                            "probe: cannot choose C for label {:?}: no fitted label has both classes in the validation split ({} images)",
                            train.labels[l],
                            valid.rows()
                        );
                    };
                    let model = fit_at(l, k).clone();
                    if let LabelModel::Logistic(f) = &model {
                        report.chosen_c = Some(f.c);
                        report.iterations = Some(f.iterations);
                        report.converged = Some(f.converged);
                        report.grad_norm = Some(f.grad_norm);
                        if !f.converged {
                            report.note = Some(format!("L-BFGS stopped before the gradient tolerance: {}", f.stopped));
                        }
                    }
                    model
                }
            };
            report.valid_auc = valid_auc(&model, l);
            models.push(model);
            reports.push(report);
        }
        let defined: Vec<f64> = reports.iter().filter_map(|r| r.valid_auc).collect();
        let report = ProbeReport {
            grid,
            tol: cfg.tol,
            max_iter: cfg.max_iter,
            memory: cfg.memory,
            features: train.d,
            train_images: train.rows(),
            valid_images: valid.rows(),
            valid_macro_auc_by_c: macro_by_c,
            valid_macro_auc: (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64),
            labels: reports,
        };
        Ok(LinearProbe { labels: train.labels.clone(), d: train.d, models, report })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The chosen model of every label, in label order.
    pub fn models(&self) -> &[LabelModel] {
        &self.models
    }

    /// Probabilities for every image and label of `set`, with its truth, as [`Predictions`].
    pub fn predict(&self, set: &FeatureSet) -> Result<Predictions> {
        set.validate()?;
        ensure!(set.labels == self.labels, "probe: fitted on labels {:?}, features have {:?}", self.labels, set.labels);
        ensure!(set.d == self.d, "probe: fitted on d = {}, features have d = {}", self.d, set.d);
        let inv = set.inverse_norms();
        let scores: Vec<f64> = set
            .x
            .par_chunks_exact(set.d)
            .zip(inv.par_iter())
            .flat_map_iter(|(row, &s)| self.models.iter().map(move |m| m.probability(row, s)))
            .collect();
        Ok(Predictions {
            images: set.images.clone(),
            patients: set.patients.clone(),
            labels: set.labels.clone(),
            scores,
            truth: set.truth.clone(),
        })
    }

    /// The structured report (per label: chosen C, how, validation AUC, the grid, iterations,
    /// convergence).
    pub fn summary(&self) -> &ProbeReport {
        &self.report
    }

    /// The report as JSON, what goes to `probe.json`.
    pub fn report(&self) -> serde_json::Value {
        serde_json::to_value(&self.report).expect("the probe report holds only plain values")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn set(x: Vec<f32>, d: usize, truth: Vec<Option<bool>>, labels: &[&str]) -> FeatureSet {
        let n = x.len() / d;
        FeatureSet {
            x,
            d,
            truth,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            images: (0..n).map(|i| format!("img{i}")).collect(),
            patients: (0..n).map(|i| format!("p{}", i / 2)).collect(),
        }
    }

    /// A random split: label 0 follows feature 0, label 1 is all negative, label 2 masked on
    /// every third row and noisy.
    fn random_split(seed: u64, n: usize, d: usize) -> FeatureSet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let mut truth = Vec::new();
        for i in 0..n {
            let f = x[i * d] + 0.3 * x[i * d + 1];
            truth.push(Some(f + 0.3 * (rng.random::<f32>() - 0.5) > 0.0));
            truth.push(Some(false));
            truth.push((i % 3 != 0).then(|| rng.random_bool(if x[i * d + 2] > 0.0 { 0.7 } else { 0.3 })));
        }
        set(x, d, truth, &["signal", "never", "noisy"])
    }

    #[test]
    fn objective_gradient_matches_finite_differences() {
        let s = random_split(1, 50, 6);
        let inv = s.inverse_norms();
        let (rows, y) = s.unmasked(2);
        let obj = Objective { x: &s.x, d: 6, inv_norm: &inv, rows: &rows, y: &y, c: 0.7, last: Mutex::new(None) };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let p: Vec<f64> = (0..7).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        let (_, g) = obj.evaluate(&p);
        for j in 0..7 {
            let h = 1e-5;
            let (mut a, mut b) = (p.clone(), p.clone());
            a[j] += h;
            b[j] -= h;
            let fd = (obj.evaluate(&a).0 - obj.evaluate(&b).0) / (2.0 * h);
            assert!((fd - g[j]).abs() < 1e-8 + 1e-6 * g[j].abs(), "param {j}: {fd} vs {}", g[j]);
        }
        // The objective in scikit-learn's form, C * sum logloss + 0.5 ||w||^2, divided by C n.
        let (cost, _) = obj.evaluate(&p);
        let mut sum = 0.0;
        for (&i, &t) in rows.iter().zip(&y) {
            let z: f64 = (0..6).map(|j| s.x[i * 6 + j] as f64 * inv[i] * p[j]).sum::<f64>() + p[6];
            let prob = 1.0 / (1.0 + (-z).exp());
            sum -= if t { prob.ln() } else { (1.0 - prob).ln() };
        }
        let w2: f64 = p[..6].iter().map(|v| v * v).sum();
        let sklearn = 0.7 * sum + 0.5 * w2;
        let n = rows.len() as f64;
        assert!((cost - sklearn / (0.7 * n)).abs() < 1e-13, "{cost} vs {}", sklearn / (0.7 * n));
    }

    #[test]
    fn fit_reaches_a_stationary_point() {
        let s = random_split(3, 300, 8);
        let cfg = ProbeConfig { tol: 1e-9, ..ProbeConfig::default() };
        let LabelModel::Logistic(f) = fit_logistic(&s, 0, 10.0, &cfg).unwrap() else {
            panic!("label 0 has both classes")
        };
        // Converged to the requested gradient norm or to the rounding floor just above it.
        assert!(f.converged && f.grad_norm < 1e-8, "{f:?}");
        assert!(f.iterations > 2 && f.iterations < 200, "{}", f.iterations);
        // Feature 0 carries the signal.
        assert!(f.w[0] > 1.0 && f.w[0].abs() > f.w[3].abs(), "{:?}", f.w);
    }

    #[test]
    fn one_class_label_predicts_its_prior() {
        let s = random_split(4, 60, 5);
        let m = fit_logistic(&s, 1, 1.0, &ProbeConfig::default()).unwrap();
        assert!(matches!(&m, LabelModel::Constant { p, reason } if *p == 0.0 && reason.contains("negative")), "{m:?}");
        let p = m.predict(&s).unwrap();
        assert!(p.iter().all(|&v| v == 0.0));
        // A label with no unmasked row predicts 0.5.
        let mut masked = s.clone();
        for i in 0..masked.rows() {
            masked.truth[i * 3 + 2] = None;
        }
        assert!(
            matches!(fit_logistic(&masked, 2, 1.0, &ProbeConfig::default()).unwrap(), LabelModel::Constant { p, .. } if p == 0.5)
        );
    }

    #[test]
    fn probe_chooses_c_per_label_and_reports_it() {
        let (train, valid, test) = (random_split(5, 400, 8), random_split(6, 200, 8), random_split(7, 200, 8));
        let cfg = ProbeConfig { grid: log_grid(-2.0, 2.0, 5), ..ProbeConfig::default() };
        let probe = LinearProbe::fit(&train, &valid, &cfg).unwrap();
        let r = probe.summary();
        assert_eq!(r.grid.len(), 5);
        // Label 0: chosen by its own validation AUC, the best of the grid.
        let l0 = &r.labels[0];
        assert_eq!(l0.chosen_by, "this label's validation AUC");
        let best = l0.valid_auc_by_c.iter().flatten().fold(f64::MIN, |a, &b| a.max(b));
        assert_eq!(l0.valid_auc, Some(best));
        assert_eq!(l0.converged, Some(true));
        // Label 1: never positive in training -> constant 0, no C.
        assert_eq!(r.labels[1].model, "constant");
        assert_eq!(r.labels[1].chosen_c, None);
        assert_eq!(r.labels[1].constant, Some(0.0));
        assert_eq!(r.labels[2].train_masked, (0..400).filter(|i| i % 3 == 0).count());

        let pred = probe.predict(&test).unwrap();
        assert_eq!(pred.truth, test.truth);
        assert!(pred.scores.iter().all(|s| s.is_finite() && (0.0..=1.0).contains(s)));
        let m = pred.macro_auc().unwrap();
        // Label 1 has no positive in test: left out of the macro.
        assert_eq!(m.used, 2);
        assert!(m.per_label[0].unwrap() > 0.85, "{m:?}");
        let json = probe.report();
        assert_eq!(json["labels"][0]["chosen_c"], serde_json::json!(l0.chosen_c.unwrap()));
        assert!(json["labels"][1]["note"].as_str().unwrap().contains("prior"));

        // Thread count does not change the result.
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let again = one.install(|| LinearProbe::fit(&train, &valid, &cfg)).unwrap();
        assert_eq!(again.summary(), probe.summary());
    }

    #[test]
    fn label_without_validation_class_takes_the_macro_choice() {
        let train = random_split(8, 300, 6);
        let mut valid = random_split(9, 150, 6);
        // Label 2 all negative in validation.
        for i in 0..valid.rows() {
            if valid.truth[i * 3 + 2].is_some() {
                valid.truth[i * 3 + 2] = Some(false);
            }
        }
        let cfg = ProbeConfig { grid: log_grid(-2.0, 2.0, 5), ..ProbeConfig::default() };
        let probe = LinearProbe::fit(&train, &valid, &cfg).unwrap();
        let r = probe.summary();
        let l2 = &r.labels[2];
        assert!(l2.chosen_by.starts_with("validation macro AUC"), "{}", l2.chosen_by);
        assert!(l2.valid_auc_by_c.iter().all(Option::is_none));
        let k = argmax(&r.valid_macro_auc_by_c).unwrap();
        assert_eq!(l2.chosen_c, Some(r.grid[k]));
        // The macro of the fitted labels is label 0's AUC alone (label 1 is constant).
        assert_eq!(r.valid_macro_auc_by_c, r.labels[0].valid_auc_by_c);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let s = random_split(10, 20, 4);
        let mut zero = s.clone();
        zero.x[4..8].fill(0.0);
        assert!(fit_logistic(&zero, 0, 1.0, &ProbeConfig::default()).unwrap_err().to_string().contains("all-zero"));
        let mut nan = s.clone();
        nan.x[0] = f32::NAN;
        assert!(fit_logistic(&nan, 0, 1.0, &ProbeConfig::default()).unwrap_err().to_string().contains("non-finite"));
        assert!(fit_logistic(&s, 0, -1.0, &ProbeConfig::default()).is_err());
        let bad_grid = ProbeConfig { grid: vec![1.0, 0.0], ..ProbeConfig::default() };
        assert!(LinearProbe::fit(&s, &s, &bad_grid).is_err());
        let probe = LinearProbe::fit(&s, &s, &ProbeConfig { grid: vec![1.0], ..ProbeConfig::default() }).unwrap();
        let mut other = s.clone();
        other.labels[0] = "else".into();
        assert!(probe.predict(&other).unwrap_err().to_string().contains("labels"));
    }
}
