#!/usr/bin/env python3
"""The linear-probe fixture: scikit-learn's LogisticRegression on seeded features (developer
script; CI never runs Python). The Rust test `eval/tests/probe_sklearn.rs` fits the same data.

Data: 600 train / 200 valid / 200 test images, d = 32 Gaussian features with a common offset
(so that the L2 normalisation matters), three labels with different prevalence and signal:
"common" (about half positive, strong signal), "rare" (about 15%, strong), "weak" (about 40%,
weak signal, 15% of its cells masked). Features are L2-normalised, rounded to 4 decimals (the
file stays small; the probe normalises them again) and stored. scikit-learn then sees exactly what
the Rust probe sees: the stored values as f32, widened to f64, each row divided by its f64 norm.

For each C in 0.01, 1, 100 and each label, LogisticRegression(C, solver="lbfgs", max_iter=10000,
tol=1e-10) is fitted on the label's unmasked training rows; the fixture holds its coef, intercept,
iterations, validation and test probabilities and AUCs. scikit-learn stops on scipy's relative
cost change (ftol = 64 eps) before the gradient reaches tol = 1e-10 (its gradient norm there,
`sklearn_grad_norm`, is up to ~4e-8 on this data), which leaves its probabilities up to ~3e-7
from the exact optimum. So each fit also holds `refined`: scipy's L-BFGS-B continued from
scikit-learn's solution with ftol = 0 and gtol = 1e-15 on the same objective, the optimum to ~1e-10
in gradient norm, for a tight check of the Rust optimiser. Run from the repository root, in a venv
with numpy and scikit-learn (scipy comes with it):

  python scripts/make_probe_fixture.py   # writes eval/tests/fixtures/probe_sklearn.json
"""

import json
import pathlib

import numpy as np
import sklearn
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

SEED = 20261128
SIZES = {"train": 600, "valid": 200, "test": 200}
D = 32
LABELS = ["common", "rare", "weak"]
OFFSET = [0.0, -4.0, -0.45]  # logit offsets: prevalence ~50%, ~15%, ~40%
STRENGTH = [3.0, 3.0, 0.7]  # signal along each label's direction
MASKED = [0.0, 0.0, 0.15]  # share of masked cells per label
GRID = [0.01, 1.0, 100.0]
OUT = pathlib.Path("eval/tests/fixtures/probe_sklearn.json")


def objective(x, y, c):
    """scikit-learn's objective divided by C n: mean log-loss + ||w||^2 / (2 C n), and its gradient."""
    n, d = x.shape

    def f(p):
        w, b = p[:d], p[d]
        z = x @ w + b
        r = 1.0 / (1.0 + np.exp(-z)) - y
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 / (c * n) * (w @ w)
        return loss, np.concatenate([x.T @ r / n + w / (c * n), [r.mean()]])

    return f


def main():
    rng = np.random.default_rng(SEED)
    n = sum(SIZES.values())
    z = rng.standard_normal((n, D))
    directions = rng.standard_normal((len(LABELS), D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    logits = np.array(OFFSET) + np.array(STRENGTH) * (z @ directions.T)
    truth = (rng.random((n, len(LABELS))) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    truth[rng.random((n, len(LABELS))) < np.array(MASKED)] = np.nan

    x = z + 0.8  # a common offset: the rows' norms differ, normalisation changes directions
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.round(x, 4)
    # What both sides fit on: the stored value as f32, widened, normalised in f64.
    x_fit = x.astype(np.float32).astype(np.float64)
    x_fit /= np.linalg.norm(x_fit, axis=1, keepdims=True)

    bounds = np.cumsum([0] + list(SIZES.values()))
    split = {name: slice(bounds[k], bounds[k + 1]) for k, name in enumerate(SIZES)}

    fits = []
    for c in GRID:
        fit = {"c": c, "coef": [], "intercept": [], "n_iter": [], "sklearn_grad_norm": [], "valid_proba": [],
               "test_proba": [], "valid_auc": [], "test_auc": [], "refined": {"coef": [], "intercept": [], "grad_norm": []}}
        for l in range(len(LABELS)):
            y_tr = truth[split["train"], l]
            keep = ~np.isnan(y_tr)
            model = LogisticRegression(C=c, solver="lbfgs", max_iter=10000, tol=1e-10)
            model.fit(x_fit[split["train"]][keep], y_tr[keep].astype(int))
            fit["coef"].append(model.coef_[0].tolist())
            fit["intercept"].append(float(model.intercept_[0]))
            fit["n_iter"].append(int(model.n_iter_[0]))
            f = objective(x_fit[split["train"]][keep], y_tr[keep], c)
            p = np.concatenate([model.coef_[0], model.intercept_])
            fit["sklearn_grad_norm"].append(float(np.linalg.norm(f(p)[1])))
            res = minimize(f, p, jac=True, method="L-BFGS-B", options={"ftol": 0.0, "gtol": 1e-15, "maxiter": 10000})
            fit["refined"]["coef"].append(res.x[:D].tolist())
            fit["refined"]["intercept"].append(float(res.x[D]))
            fit["refined"]["grad_norm"].append(float(np.linalg.norm(f(res.x)[1])))
            for name in ("valid", "test"):
                proba = model.predict_proba(x_fit[split[name]])[:, 1]
                y = truth[split[name], l]
                m = ~np.isnan(y)
                fit[f"{name}_proba"].append(proba.tolist())
                fit[f"{name}_auc"].append(float(roc_auc_score(y[m].astype(int), proba[m])))
        fits.append(fit)

    def cells(t):
        return [[None if np.isnan(v) else int(v) for v in row] for row in t]

    doc = {
        "about": "scripts/make_probe_fixture.py: scikit-learn LogisticRegression(lbfgs) on seeded features",
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "d": D,
        "labels": LABELS,
        "grid": GRID,
        # Features to 4 decimals, flat row-major per split; truth 1 / 0 / null (masked).
        "splits": {
            name: {"x": [float(v) for v in x[s].ravel()], "truth": cells(truth[s])} for name, s in split.items()
        },
        "fits": fits,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, separators=(",", ":"))
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(text) / 1024:.0f} KiB)")
    for name in SIZES:
        t = truth[split[name]]
        print(name, "positives", np.nansum(t, axis=0).astype(int).tolist(), "masked", np.isnan(t).sum(axis=0).tolist())
    for fit in fits:
        print(f"C={fit['c']:g}: valid AUC", [round(a, 4) for a in fit["valid_auc"]], "test AUC",
              [round(a, 4) for a in fit["test_auc"]], "iterations", fit["n_iter"], "gradient norm",
              [f"{g:.1e}" for g in fit["sklearn_grad_norm"]], "refined", [f"{g:.1e}" for g in fit["refined"]["grad_norm"]])


if __name__ == "__main__":
    main()
