"""Reference ε values from Opacus' RDP accountant for the test that Tessera's record-level
accountant (secagg/src/rdp.rs) matches it within 1% on a grid of (q, σ, steps, δ).

Run once by a developer (needs numpy, scipy and the opacus package, which may be
installed without its torch dependency: `pip install numpy scipy && pip install
--no-deps opacus`):
    python scripts/reference/opacus_accountant.py > secagg/tests/data/opacus_rdp.json
The analysis module is loaded from its file, so `import torch` (opacus/__init__.py) is
never run. Committed.
"""
import importlib.metadata
import importlib.util
import warnings
import itertools
import json
import pathlib
import sys

spec = importlib.util.find_spec("opacus")
root = pathlib.Path(spec.submodule_search_locations[0])
version = importlib.metadata.version("opacus")


def load(name, path):
    s = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m


warnings.simplefilter("ignore")  # "optimal order is the largest alpha": part of what is compared
rdp = load("opacus_rdp", root / "accountants" / "analysis" / "rdp.py")
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # RDPAccountant.DEFAULT_ALPHAS

cases = []
for q, sigma, steps, delta in itertools.product(
    [0.001, 0.01, 0.05, 0.2, 0.5], [0.5, 0.8, 1.0, 1.5, 3.0], [1, 100, 1000, 10000], [1e-5, 1e-6]
):
    r = rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, order = rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=delta)
    cases.append({"q": q, "sigma": sigma, "steps": steps, "delta": delta, "epsilon": float(eps), "order": float(order)})
# Composition of two phases (different q and σ), as a client's rounds compose.
mixed = []
for (q1, s1, t1), (q2, s2, t2) in [((0.01, 1.0, 500), (0.05, 1.5, 200)), ((0.2, 0.8, 30), (0.001, 0.5, 3000))]:
    r = rdp.compute_rdp(q=q1, noise_multiplier=s1, steps=t1, orders=ORDERS) + rdp.compute_rdp(
        q=q2, noise_multiplier=s2, steps=t2, orders=ORDERS
    )
    eps, _ = rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=1e-5)
    mixed.append({"phases": [[q1, s1, t1], [q2, s2, t2]], "delta": 1e-5, "epsilon": float(eps)})
# One case per line, so a regenerated file diffs readably.
print('{"opacus": %s,' % json.dumps(version))
print(' "cases": [\n  ' + ",\n  ".join(json.dumps(c) for c in cases) + "],")
print(' "mixed": [\n  ' + ",\n  ".join(json.dumps(c) for c in mixed) + "]}")
