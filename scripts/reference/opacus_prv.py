"""Reference ε values from Opacus' PRV accountant (Gopi et al., NeurIPS 2021) for the test
that Tessera's PRV accountant (secagg/src/prv.rs) matches it within 1% on a grid of
(q, σ, steps, δ), and on compositions of runs with different q and σ.

Run once by a developer, in a virtual environment with torch and opacus (scripts/bench-train
creates one, .venv-bench):
    .venv-bench/bin/python scripts/reference/opacus_prv.py > secagg/tests/data/opacus_prv.json
Committed. Each case records Opacus' `get_epsilon` (the upper bound, eps_error 0.01,
delta_error δ/1000), and the estimate and lower bound of the same discrete PRV.
"""
import importlib.metadata
import itertools
import json
import warnings

from opacus.accountants import PRVAccountant

warnings.simplefilter("ignore")
version = importlib.metadata.version("opacus")


def bounds(history, delta):
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    delta_error = delta / 1000
    dprv = acc._get_dprv(eps_error=0.01, delta_error=delta_error)
    lower, estimate, upper = dprv.compute_epsilon(delta, delta_error, 0.01)
    return {"epsilon": float(upper), "estimate": float(estimate), "lower": float(lower)}


cases = []
for q, sigma, steps, delta in itertools.product([0.001, 0.01, 0.05, 0.2], [0.6, 0.8, 1.0, 1.5, 3.0], [1, 100, 1000], [1e-5, 1e-6]):
    try:
        b = bounds([(sigma, q, steps)], delta)
    except (RuntimeError, ValueError) as e:  # Opacus cannot bound it: skipped, and said so
        b = {"error": str(e)}
    cases.append({"q": q, "sigma": sigma, "steps": steps, "delta": delta, **b})
mixed = []
for phases in [[(0.01, 1.0, 500), (0.05, 1.5, 200)], [(0.2, 0.8, 30), (0.001, 0.5, 3000)], [(0.05, 0.9, 40), (0.05, 0.9, 40), (0.1, 1.2, 40)]]:
    mixed.append({"phases": [list(p) for p in phases], "delta": 1e-5, **bounds([(s, q, t) for q, s, t in phases], 1e-5)})
print('{"opacus": %s,' % json.dumps(version))
print(' "cases": [\n  ' + ",\n  ".join(json.dumps(c) for c in cases) + "],")
print(' "mixed": [\n  ' + ",\n  ".join(json.dumps(c) for c in mixed) + "]}")
