"""L2-regularised logistic regression fitted on data streamed in chunks.

The objective, its scaling and the L-BFGS settings are scikit-learn's LogisticRegression(solver=
"lbfgs") ones, so a streamed fit lands on the same optimum as an in-memory scikit-learn fit:

    (1 / sum(w)) * [ sum_i w_i * loss_i + ||coef||^2 / (2 C) ]     (intercept not penalised)

with the binomial loss for two classes (one coefficient row for the second class) and the
multinomial loss otherwise. Each function evaluation reads the data once, one chunk at a time,
so memory is bounded by the chunk (one shard), not by the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit, log_expit, logsumexp, softmax

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class LinearSolution:
    coef: np.ndarray  # (1, d) for two classes, (k, d) otherwise, as scikit-learn's coef_
    intercept: np.ndarray
    iterations: int
    converged: bool


def _binomial(w: np.ndarray, chunks: Chunks, sample_weight: np.ndarray) -> tuple[float, np.ndarray]:
    coef, bias = w[:-1], w[-1]
    loss = 0.0
    grad = np.zeros_like(w)
    for x, y in chunks():
        x = np.asarray(x, np.float64)
        weight = sample_weight[y]
        target = (y == 1).astype(np.float64)
        z = x @ coef + bias
        loss -= float(np.sum(weight * (target * log_expit(z) + (1 - target) * log_expit(-z))))
        residual = weight * (expit(z) - target)
        grad[:-1] += x.T @ residual
        grad[-1] += residual.sum()
    return loss, grad


def _multinomial(w: np.ndarray, chunks: Chunks, sample_weight: np.ndarray, classes: int) -> tuple[float, np.ndarray]:
    w = w.reshape(classes, -1)
    coef, bias = w[:, :-1], w[:, -1]
    loss = 0.0
    grad = np.zeros_like(w)
    for x, y in chunks():
        x = np.asarray(x, np.float64)
        weight = sample_weight[y]
        z = x @ coef.T + bias
        loss += float(np.sum(weight * (logsumexp(z, axis=1) - z[np.arange(len(y)), y])))
        residual = softmax(z, axis=1)
        residual[np.arange(len(y)), y] -= 1.0
        residual *= weight[:, None]
        grad[:, :-1] += residual.T @ x
        grad[:, -1] += residual.sum(axis=0)
    return loss, grad.ravel()


def fit_logistic(chunks: Chunks, dimension: int, classes: int, C: float, class_weight: np.ndarray,
                 weight_sum: float, tol: float = 1e-4, max_iter: int = 1000,
                 start: LinearSolution | None = None) -> LinearSolution:
    """Minimise the objective above. `class_weight[k]` weighs every example of class k;
    `weight_sum` is the sum of the weights over all examples. `start` warm-starts the solver."""
    rows = 1 if classes == 2 else classes
    w0 = np.zeros(rows * (dimension + 1))
    if start is not None:
        w0 = np.concatenate([start.coef, start.intercept[:, None]], axis=1).ravel()
    l2 = 1.0 / C

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        if classes == 2:
            loss, grad = _binomial(w, chunks, class_weight)
            coef = w[:-1]
            penalty_grad = np.append(coef, 0.0)
        else:
            loss, grad = _multinomial(w, chunks, class_weight, classes)
            matrix = w.reshape(classes, -1)
            coef = matrix[:, :-1]
            penalty_grad = np.concatenate([coef, np.zeros((classes, 1))], axis=1).ravel()
        value = (loss + 0.5 * l2 * float(np.sum(coef * coef))) / weight_sum
        return value, (grad + l2 * penalty_grad) / weight_sum

    result = optimize.minimize(
        objective, w0, method="L-BFGS-B", jac=True,
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
    )
    matrix = result.x.reshape(rows, dimension + 1)
    return LinearSolution(matrix[:, :-1].copy(), matrix[:, -1].copy(), int(result.nit), bool(result.success))
