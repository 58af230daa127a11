"""Reference ε values of the distributed Skellam mechanism, from Google's own accounting
code, for the test that Tessera's accountant (secagg/src/skellam.rs) matches it within 1%.

The reference is `distributed_dp/accounting_utils.py` of github.com/google-research/federated
(commit 5e27a86323a35c2018fb97fbbe755c7ade9370ab, the code behind TFF's distributed DP
aggregators). It is not copied here: download it and pass its path. It imports
`tensorflow_privacy` only for `compute_rdp` and `get_privacy_spent`; this script provides
those two from Google's `dp-accounting` package (the library TensorFlow Privacy's
accountants moved to), so TensorFlow is not needed:

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install numpy scipy dp-accounting
    /tmp/venv-ref/bin/python scripts/reference/tff_skellam.py PATH/TO/accounting_utils.py \
        > secagg/tests/data/tff_skellam.json

Run once by a developer; the output is committed.
"""
import importlib.metadata
import importlib.util
import itertools
import json
import math
import sys
import types

from dp_accounting.rdp import rdp_privacy_accountant as rdp


def _get_privacy_spent(orders, rdp_vec, target_delta):
    eps, order = rdp.compute_epsilon(orders, rdp_vec, target_delta)
    return eps, target_delta, order


def _compute_rdp(q, noise_multiplier, steps, orders):
    raise NotImplementedError("the Skellam reference does not use the Gaussian accountant")


shim = types.ModuleType("tensorflow_privacy")
shim.get_privacy_spent = _get_privacy_spent
shim.compute_rdp = _compute_rdp
sys.modules["tensorflow_privacy"] = shim

spec = importlib.util.spec_from_file_location("accounting_utils", sys.argv[1])
au = importlib.util.module_from_spec(spec)
spec.loader.exec_module(au)


def release(scale, central_stddev, l2_clip, beta, dim, q, steps):
    return {"scale": scale, "central_stddev": central_stddev, "l2_clip": l2_clip, "beta": beta, "dim": dim, "sample_rate": q, "steps": steps}


cases = []
for scale, central_stddev, beta, dim, q, steps, delta in itertools.product(
    [10.0, 300.0],
    [0.5, 2.0, 8.0, 32.0],
    [0.0, math.exp(-0.5)],
    [1000, 184320],
    [1.0, 0.1],
    [1, 50],
    [1e-5, 1e-3],
):
    # Noise well below the rounding's own spread gives ε beyond any use; skip those.
    eps, order = au.skellam_epsilon(scale, central_stddev, 1.0, beta, dim, q, steps, delta)
    if not math.isfinite(eps) or eps > 1e3:
        continue
    cases.append({"release": release(scale, central_stddev, 1.0, beta, dim, q, steps), "delta": delta, "epsilon": float(eps), "order": int(order)})

calibration = []
for target, scale, n, dim, q, steps in [
    (1.0, 300.0, 4, 184320, 1.0, 3),
    (8.0, 300.0, 4, 184320, 1.0, 10),
    (4.0, 100.0, 100, 10000, 0.1, 100),
    (50.0, 1000.0, 16, 1000000, 1.0, 3),
]:
    beta = math.exp(-0.5)
    local = au.skellam_local_stddev(target, scale, 1.0, n, beta, dim, q, steps, 1e-5)
    calibration.append({
        "release": release(scale, 1.0, 1.0, beta, dim, q, steps),
        "delta": 1e-5,
        "target_epsilon": target,
        "central_stddev": float(local * math.sqrt(n)),
    })

json.dump({
    "source": "google-research/federated distributed_dp/accounting_utils.py @ 5e27a86323a35c2018fb97fbbe755c7ade9370ab; dp-accounting " + importlib.metadata.version("dp-accounting"),
    "epsilon": cases,
    "calibration": calibration,
}, sys.stdout, indent=1)
print()
