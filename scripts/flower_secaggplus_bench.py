#!/usr/bin/env python3
"""Time Flower's own SecAgg+ primitives next to Tessera's, at the same m, n, k, dropout.

Run through ``scripts/bench-flower`` (which makes the ``.venv-flower`` virtual
environment with a pinned ``flwr``). Everything here calls Flower's real code:

* Client side: the stage functions of Flower's client mod
  ``flwr.client.mod.secure_aggregation.secaggplus_mod`` (``_setup``, ``_share_keys``,
  ``_collect_masked_vectors``, ``_unmask``), i.e. exactly what ``secaggplus_mod`` runs
  after unpacking a message. The timed client operation is ``_collect_masked_vectors``:
  Fernet-decrypt the shares, deserialize the update, weight and quantize it, add the
  self mask and one pairwise mask per neighbour (``pseudo_rand_gen``, numpy arithmetic),
  take it mod 2^32 and serialize the result. The masking part alone (from "Add private
  mask" to ``parameters_mod``) is timed separately by calling the same public functions
  in the same order.
* Server side: ``SecAggPlusWorkflow.collect_masked_vectors_stage`` and ``unmask_stage``
  are methods tied to a Grid and a Context, so their bodies are replayed with the same
  public functions in the same sequence (``bytes_to_ndarray``, ``parameters_addition``,
  ``parameters_mod``; ``combine_shares``, ``pseudo_rand_gen``, ``generate_shared_key``,
  ``bytes_to_private_key``/``bytes_to_public_key``, ``parameters_subtraction``,
  ``factor_extract``, ``dequantize``). Message passing is left out on both sides.

Workflow parameters are Flower's defaults (clipping_range 8.0, quantization_range 2^22,
modulus_range 2^32, max_weight 1000); num_shares = k + 1 (Flower counts the client
itself among its "neighbours"), reconstruction_threshold = Tessera's share threshold.

At large m only ``--reps`` survivors run ``_collect_masked_vectors`` on the full update
(timed); the other survivors run it on a 1-element update so that they decrypt and
store their shares exactly as they would (their shares are what the server needs), and
the server aggregate is the sum of the full-size masked vectors. The unmasking then does
exactly the work it would do in a real round (same secrets, same number of PRG streams,
same vector shape) but its output is not the true mean. Correctness of the wiring is
checked separately with ``--validate-m`` (default 1000): a full round in which every
survivor masks its full update and the released mean is compared with the true mean.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

import flwr
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

# The package re-exports the mod *function* under the module's name; load the module.
mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SecAggPlusWorkflow defaults.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
MAX_WEIGHT = 1000.0
NUM_EXAMPLES = 100


def log(msg: str) -> None:
    print(f"[flower] {msg}", file=sys.stderr, flush=True)


def now() -> float:
    return time.perf_counter()


def update_for(i: int, m: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).uniform(-1.0, 1.0, size=m).astype(np.float32)


def masking_only(state: Any, srcs: list[int], quantized: list[np.ndarray]) -> list[np.ndarray]:
    """The tail of ``_collect_masked_vectors``, from "Add private mask" to the mod."""
    dimensions_list = [a.shape for a in quantized]
    private_mask = pseudo_rand_gen(state.rd_seed, state.mod_range, dimensions_list)
    quantized = parameters_addition(quantized, private_mask)
    for node_id in srcs:
        shared_key = generate_shared_key(
            bytes_to_private_key(state.sk1),
            bytes_to_public_key(state.public_keys_dict[node_id][0]),
        )
        pairwise_mask = pseudo_rand_gen(shared_key, state.mod_range, dimensions_list)
        if state.nid > node_id:
            quantized = parameters_addition(quantized, pairwise_mask)
        else:
            quantized = parameters_subtraction(quantized, pairwise_mask)
    return parameters_mod(quantized, state.mod_range)


def flower_round(m: int, n: int, k: int, threshold: int, dropout: float, reps: int, full: bool) -> dict[str, Any]:
    """One SecAgg+ round through Flower's functions; returns timings (seconds)."""
    rnd = random.Random(42)
    num_shares = k + 1
    nids = list(range(1, n + 1))
    setup_cfg = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: num_shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: CLIPPING_RANGE,
        Key.TARGET_RANGE: QUANTIZATION_RANGE,
        Key.MOD_RANGE: MODULUS_RANGE,
        Key.MAX_WEIGHT: MAX_WEIGHT,
    }
    # setup_stage: the shuffled ring of num_shares (self included).
    order = nids[:]
    rnd.shuffle(order)
    half = num_shares >> 1
    nid_to_neighbours = {
        nid: {order[(idx + off) % n] for off in range(-half, half + 1)} for idx, nid in enumerate(order)
    }
    d = round(n * dropout)
    dead = {nids[j * n // d] for j in range(d)} if d else set()
    alive = [nid for nid in nids if nid not in dead]

    t0 = now()
    states: dict[int, Any] = {}
    pks: dict[int, list[bytes]] = {}
    for nid in nids:
        st = mod.SecAggPlusState()
        st.nid = nid
        res = mod._setup(st, dict(setup_cfg))  # pylint: disable=protected-access
        states[nid] = st
        pks[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
    # share_keys_stage
    fwd_ct: dict[int, list[bytes]] = {nid: [] for nid in nids}
    fwd_src: dict[int, list[int]] = {nid: [] for nid in nids}
    for nid in nids:
        cfg = {str(v): pks[v] for v in nid_to_neighbours[nid]}
        res = mod._share_keys(states[nid], cfg)  # pylint: disable=protected-access
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
            fwd_ct[dst].append(ct)
            fwd_src[dst].append(nid)
    log(f"m={m}: setup and share keys for {n} clients in {now() - t0:.1f} s")

    # collect_masked_vectors_stage: the dead clients never answer.
    client_s: list[float] = []
    masking_only_s: list[float] = []
    fold_s: list[float] = []
    masked_vector = None
    updates = {}
    timed = alive if full else alive[:reps]
    for nid in alive:
        cfg = {Key.CIPHERTEXT_LIST: fwd_ct[nid], Key.SOURCE_LIST: fwd_src[nid]}
        if nid in timed:
            upd = update_for(nid, m)
            if full:
                updates[nid] = upd
            params = ndarrays_to_parameters([upd])
            t = now()
            res = mod._collect_masked_vectors(states[nid], cfg, NUM_EXAMPLES, params)  # pylint: disable=protected-access
            client_s.append(now() - t)
            if len(masking_only_s) < reps:
                # Inputs of the masking tail, prepared as _collect_masked_vectors does.
                st = states[nid]
                q_ratio = round(NUM_EXAMPLES / st.max_weight * st.target_range)
                qp = quantize(parameters_multiply([upd], q_ratio / st.target_range), st.clipping_range, st.target_range)
                qp = factor_combine(q_ratio, qp)
                t = now()
                masking_only(st, fwd_src[nid], qp)
                masking_only_s.append(now() - t)
                del qp
            # Server: fold the received vector (collect_masked_vectors_stage).
            bytes_list = res[Key.MASKED_PARAMETERS]
            t = now()
            client_masked_vec = [bytes_to_ndarray(b) for b in bytes_list]
            if masked_vector is None:
                masked_vector = client_masked_vec
            else:
                masked_vector = parameters_addition(masked_vector, client_masked_vec)
            fold_s.append(now() - t)
            del res, bytes_list, client_masked_vec, params
            if len(client_s) % 10 == 0 or len(client_s) == len(timed):
                log(f"m={m}: {len(client_s)} client(s) masked, last {client_s[-1]:.3f} s")
        else:
            mod._collect_masked_vectors(  # pylint: disable=protected-access
                states[nid], cfg, NUM_EXAMPLES, ndarrays_to_parameters([np.zeros(1, dtype=np.float32)])
            )
    t = now()
    masked_vector = parameters_mod(masked_vector, MODULUS_RANGE)
    fold_mod_s = now() - t

    # One PRG stream of Flower over m+1 elements, for reference.
    shapes = [(1,), (m,)]
    prg_samples = []
    for _ in range(3):
        t = now()
        pseudo_rand_gen(os.urandom(32), MODULUS_RANGE, shapes)
        prg_samples.append(now() - t)
    prg_s = statistics.median(prg_samples)

    # unmask_stage: survivors reveal shares, then the server reconstructs and unmasks.
    active = set(alive)
    replies = []
    for nid in alive:
        neigh = nid_to_neighbours[nid]
        cfg = {Key.ACTIVE_NODE_ID_LIST: list(neigh & active), Key.DEAD_NODE_ID_LIST: list(neigh & dead)}
        replies.append(mod._unmask(states[nid], cfg))  # pylint: disable=protected-access
    log(f"m={m}: unmasking ({len(alive)} self masks, {len(dead)} dropped clients)")
    streams = 0
    # Where the unmasking time goes (perf_counter around each call; same sequence).
    part = {"shamir": 0.0, "key_agreement": 0.0, "prg": 0.0, "arithmetic": 0.0}

    def timed_call(bucket: str, fn: Any, *a: Any) -> Any:
        t1 = now()
        r = fn(*a)
        part[bucket] += now() - t1
        return r

    t = now()
    collected: dict[int, list[bytes]] = {nid: [] for nid in nids}
    for res in replies:
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
    for nid, share_list in collected.items():
        if len(share_list) < threshold:
            raise RuntimeError("not enough shares")
        secret = timed_call("shamir", combine_shares, share_list)
        if nid in active:
            private_mask = timed_call("prg", pseudo_rand_gen, secret, MODULUS_RANGE, get_parameters_shape(masked_vector))
            masked_vector = timed_call("arithmetic", parameters_subtraction, masked_vector, private_mask)
            streams += 1
        else:
            neighbours = set(nid_to_neighbours[nid])
            neighbours.remove(nid)
            for neighbor_nid in neighbours:
                shared_key = timed_call(
                    "key_agreement",
                    lambda: generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[neighbor_nid][0])),
                )
                pairwise_mask = timed_call("prg", pseudo_rand_gen, shared_key, MODULUS_RANGE, get_parameters_shape(masked_vector))
                if nid > neighbor_nid:
                    masked_vector = timed_call("arithmetic", parameters_addition, masked_vector, pairwise_mask)
                else:
                    masked_vector = timed_call("arithmetic", parameters_subtraction, masked_vector, pairwise_mask)
                streams += 1
    recon = parameters_mod(masked_vector, MODULUS_RANGE)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = QUANTIZATION_RANGE / q_total_ratio
    aggregated = dequantize(recon, CLIPPING_RANGE, QUANTIZATION_RANGE)
    offset = -(len(active) - 1) * CLIPPING_RANGE
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    unmask_s = now() - t

    out: dict[str, Any] = {
        "impl": "flower",
        "flwr": flwr.__version__,
        "m": m,
        "n": n,
        "k": k,
        "num_shares": num_shares,
        "threshold": threshold,
        "dropped": len(dead),
        "client_stage_s": statistics.median(client_s),
        "client_stage_samples": len(client_s),
        "client_masking_only_s": statistics.median(masking_only_s),
        "fold_one_s": statistics.median(fold_s),
        "fold_mod_s": fold_mod_s,
        "prg_stream_s": prg_s,
        "server_unmask_s": unmask_s,
        "unmask_streams": streams,
        "unmask_shamir_s": part["shamir"],
        "unmask_key_agreement_s": part["key_agreement"],
        "unmask_prg_s": part["prg"],
        "unmask_arithmetic_s": part["arithmetic"],
    }
    if full:
        truth = np.mean([updates[nid] for nid in alive], axis=0)
        err = float(np.max(np.abs(aggregated[0] - truth)))
        out["validation_max_abs_error"] = err
        out["validation_ok"] = err < 1e-3
    return out


def tessera(m: int, n: int, k: int, reps: int, stream: bool) -> dict[str, Any]:
    cmd = [
        "cargo", "bench", "-q", "-p", "tessera-secagg", "--bench", "masking", "--",
        *(["--stream"] if stream else []),
        "--compare", f"m={m},n={n},k={k},reps={reps}",
    ]
    log("running " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def fmt(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="100000,1000000,6815744", help="comma-separated vector lengths")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--k", type=int, default=46, help="neighbours (Tessera's default for n=100 is 46)")
    ap.add_argument("--threshold", type=int, default=26, help="share threshold (Tessera's default for n=100 is 26)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=3, help="Flower clients timed on the full update")
    ap.add_argument("--validate-m", type=int, default=1000, help="m of the full-round correctness check (0: skip)")
    ap.add_argument("--json-out", default="", help="also write all results here")
    ap.add_argument("--stream", action="store_true",
                    help="Tessera's aggregator folds each input from a spooled file, as tessera-server does")
    args = ap.parse_args()
    ms = [int(x.replace("_", "")) for x in args.m.split(",") if x]

    log(f"flwr {flwr.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    results: list[dict[str, Any]] = []
    if args.validate_m:
        v = flower_round(args.validate_m, args.n, args.k, args.threshold, args.dropout, args.reps, full=True)
        log(f"validation at m={args.validate_m}: max |mean error| = {v['validation_max_abs_error']:.2e}")
        if not v["validation_ok"]:
            raise SystemExit("Flower round did not reproduce the mean: the harness is wired wrong")
        results.append({"validation": v})
    rows = []
    for m in ms:
        f = flower_round(m, args.n, args.k, args.threshold, args.dropout, args.reps, full=False)
        log(json.dumps(f))
        t = tessera(m, args.n, args.k, args.reps, args.stream)
        log(json.dumps(t))
        results.append({"flower": f, "tessera": t})
        rows.append((f, t))

    print(f"\nFlower {flwr.__version__} vs Tessera, n={args.n}, k={args.k}, threshold={args.threshold}, "
          f"{round(args.n * args.dropout)} clients drop after sharing keys\n")
    print("| m | operation | Flower | Tessera | Flower / Tessera |")
    print("|---:|---|---:|---:|---:|")
    for f, t in rows:
        m = f["m"]
        tess_client = t["client_quantize_s"] + t["client_mask_s"]
        items = [
            ("client: Flower `_collect_masked_vectors` vs Tessera `Quantizer::quantize` + `handle_share_bundle`",
             f["client_stage_s"], tess_client),
            (f"client masking only: Flower PRG + add/sub + mod ({args.k + 1} streams) vs Tessera `handle_share_bundle`",
             f["client_masking_only_s"], t["client_mask_s"]),
            ("client masking kernel: Flower as above vs Tessera `prg::apply_masks` alone",
             f["client_masking_only_s"], t["mask_kernel_s"]),
            ("one PRG stream over m+1 words: `pseudo_rand_gen` vs `prg::keystream`",
             f["prg_stream_s"], t["keystream_stream_s"]),
            ("server fold of one masked input: `bytes_to_ndarray` + `parameters_addition` vs "
             + ("`handle_masked_input_stream` from a spooled file" if args.stream else "`handle_masked_input`")
             + " (incl. SHA-256 + Ed25519 verify)",
             f["fold_one_s"], t["fold_one_s"]),
            (f"server unmask, {f['dropped']} dropped (Flower {f['unmask_streams']} streams, Tessera {t['unmask_streams']})",
             f["server_unmask_s"], t["server_unmask_s"]),
        ]
        for name, fv, tv in items:
            print(f"| {m} | {name} | {fmt(fv)} | {fmt(tv)} | {fv / tv:.1f}× |")
        print(f"| {m} | &nbsp;&nbsp;Flower unmask breakdown: Shamir {fmt(f['unmask_shamir_s'])}, "
              f"ECDH {fmt(f['unmask_key_agreement_s'])}, PRG {fmt(f['unmask_prg_s'])}, "
              f"numpy add/sub {fmt(f['unmask_arithmetic_s'])} | | | |")
    print(f"\nFlower client times: median of {args.reps} clients; Tessera client times: median of all "
          f"{rows[0][1]['client_mask_samples'] if rows else 0} surviving clients; unmasking: one round each.")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
