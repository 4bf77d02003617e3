"""Levenberg–Marquardt (``qeq_unroll.lm``) on a least-squares problem with a known minimum:
Rosenbrock's valley, r(x) = (10 (x₁ − x₀²), 1 − x₀), minimum r = 0 at (1, 1)."""

import numpy as np

from qeq_unroll import lm


def residual(x):
    return np.array([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


def jacobian(x):
    return np.array([[-20.0 * x[0], 10.0], [-1.0, 0.0]])


def normal(x):
    r, j = residual(x), jacobian(x)
    return j.T @ j, j.T @ r, float(r @ r)


def value(x):
    return float(residual(x) @ residual(x))


def test_reaches_the_minimum_of_a_curved_valley_and_stops_there():
    x, damping, path = np.array([0.01, 5.0]), lm.START_DAMPING, []  # the first Gauss–Newton step is 5 long
    for _ in range(100):
        new, damping, loss, moved = lm.iterate(normal, value, x, damping)
        path.append(np.max(np.abs(new - x)))
        x = new
        if not moved:
            break
    assert not moved and len(path) < 60  # it says when it has reached the minimum
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-8)
    assert max(path) <= lm.MAX_STEP * (1 + 1e-12)  # every step inside the trust region
    assert lm.iterate(normal, value, x, damping)[3] is False  # and stays there


def test_a_negligible_decrease_is_no_progress():
    """A step that lowers the loss by rounding only (1e-15 relative) is taken but ends the fit."""
    flat = (np.eye(2), np.array([1e-3, 0.0]), 1.0)
    x, _, loss, moved = lm.iterate(lambda x: flat, lambda x: 1.0 - 1e-15, np.zeros(2), 1e-3)
    assert loss < 1.0 and not moved


def test_the_step_is_the_damped_gauss_newton_step():
    a, g, _ = normal(np.array([0.5, 0.0]))
    step = lm.solve(a, g, 0.0)
    np.testing.assert_allclose(a @ step, -g, rtol=1e-12)  # undamped: Gauss–Newton
    damped = lm.solve(a, g, 1e6)
    np.testing.assert_allclose(damped, -g / (1e6 * np.diag(a)), rtol=1e-5)  # heavily damped: scaled gradient descent
