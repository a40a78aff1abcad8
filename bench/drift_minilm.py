"""Drift models on a fine-tuned transformer's real drift (all-MiniLM-L6-v2 on code search).

    python -m bench.drift --encoder minilm --json      # records first if needed (~45 min on 2 cores)

Reads what `bench.minilm_drift_record` wrote (fine-tuning it first if the cache folder
is missing or incomplete): a fixed set of targets and the held-out test queries
encoded at step 0 (the stale vectors) and at every later checkpoint (the fresh ones),
plus every training step's positives as the loop computed them. At each checkpoint it
predicts every target's current vector with

  stale           the step-0 vectors (do nothing)
  nystrom         NystromDrift: kernel linear / rbf, landmarks uniform / kcenter /
                  leverage, m = 0.5 %, 1 %, 2 %, 5 %, 10 % of the targets (eval-mode
                  re-encodes of the landmarks: m extra encoder passes)
  corrector       CorrectorDrift, normalised output, trained on
                    online:    the positives the last steps encoded anyway (train-mode
                               vectors, dropout on; no extra encoder pass)
                    landmarks: m eval-mode re-encodes, as Nyström
                  with 0 Adam steps (the closed-form ridge map) and with --corrector-steps
  ceiling         the corrector fitted on EVERY target's fresh vector and scored on the
                  same targets (in-sample, ridge 1e-4): about the best any model of the
                  stale vector can do, whatever it costs

and reports, on the held-out queries (fresh query vectors in every row):

  rel_score_error, tv_mean  as bench.drift (scores centred per query; softmax at the
                            loss temperature 1/scale)
  recall@10                 of each query's positive among all targets
  ratios to stale           the acceptance figures (score error, TV)
  cost                      encoder passes as a share of a full re-encode (m / N), and
                            host seconds of the fit + prediction against the measured
                            seconds of a full re-encode; both extrapolated to 1M targets
                            (landmarks stay m; fit cost stays; prediction and re-encode
                            grow with N)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from dataclasses import asdict

import numpy as np

from bench._common import emit, log, machine
from bench.drift import softmax_gap
from bench.minilm_drift_record import RecordConfig, cache_folder, record
from treeidx import CorrectorDrift, NystromDrift
from treeidx.nystrom import choose_landmarks

SHARES = (0.005, 0.01, 0.02, 0.05, 0.1)
EXTRAPOLATE_N = 1_000_000


def load_recording(folder: str) -> dict:
    """Stale/fresh target and query vectors per checkpoint and the online pairs."""
    meta = json.load(open(os.path.join(folder, "meta.json")))
    tids = np.asarray(meta["target_ids"], np.int64)
    row = {int(t): i for i, t in enumerate(tids)}
    steps = sorted(int(os.path.basename(p)[4:9]) for p in glob.glob(os.path.join(folder, "ckpt*-targets.npy")))
    vec = {s: np.load(os.path.join(folder, f"ckpt{s:05d}-targets.npy")) for s in steps}
    qry = {s: np.load(os.path.join(folder, f"ckpt{s:05d}-queries.npy")) for s in steps}
    online = []
    for p in sorted(glob.glob(os.path.join(folder, "steps*.npz"))):
        z = np.load(p)
        first = int(z["first_step"])
        for j in range(z["ids"].shape[0]):
            online.append((first + j + 1, np.array([row[int(i)] for i in z["ids"][j]]), z["vectors"][j]))
    return dict(
        meta=meta,
        steps=steps,
        vectors=vec,
        queries=qry,
        positive_rows=np.array([row[int(i)] for i in meta["eval_ids"]]),
        online=online,
    )


def recall_at_10(queries: np.ndarray, targets: np.ndarray, positive_rows: np.ndarray) -> float:
    s = queries @ targets.T
    pos = s[np.arange(len(s)), positive_rows]
    return float(np.mean((s > pos[:, None]).sum(1) < 10))


def online_pairs(rec: dict, step: int, window: int, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The positives of steps (max(base, step − window), step], the latest vector per target."""
    rows, vecs = [], []
    for s, r, v in rec["online"]:
        if max(base, step - window) < s <= step:
            rows.append(r)
            vecs.append(v)
    rows, vecs = np.concatenate(rows), np.concatenate(vecs)
    _, last = np.unique(rows[::-1], return_index=True)
    keep = rows.size - 1 - last
    return rows[keep], vecs[keep]


def evaluate(rec: dict, step: int, pred: np.ndarray, beta: float) -> dict:
    q, fresh = rec["queries"][step], rec["vectors"][step]
    return dict(**softmax_gap(q, pred, fresh, beta), recall_at_10=recall_at_10(q, pred, rec["positive_rows"]))


def run_methods(rec: dict, a) -> tuple[list[dict], dict]:
    stale = rec["vectors"][a.base]
    n = stale.shape[0]
    beta = 1.0 / a.temperature
    later = [s for s in rec["steps"] if s > a.base]
    rows: list[dict] = []

    def add(method: str, step: int, pred: np.ndarray, fit_s: float, encodes: int, **info) -> None:
        r = dict(method=method, step=step, fit_s=fit_s, encodes=encodes, **info, **evaluate(rec, step, pred, beta))
        rows.append(r)
        log(
            f"step {step} {method} {info}: err {r['rel_score_error']:.3f} tv {r['tv_mean']:.3f} "
            f"r@10 {r['recall_at_10']:.3f} ({fit_s:.1f} s)",
            a.json,
        )

    for s in later:
        add("stale", s, stale, 0.0, 0)
        add("fresh", s, rec["vectors"][s], 0.0, n)
    sizes = sorted({max(8, int(round(f * n))) for f in SHARES})
    for m in sizes:
        for choice in a.landmarks.split(","):
            t = time.perf_counter()
            lm = choose_landmarks(stale, choice, m, seed=a.seed)
            choose_s = time.perf_counter() - t
            for kernel in a.kernels.split(","):
                for ridge in [float(x) for x in a.ridges.split(",")]:
                    model = NystromDrift(
                        stale,
                        landmarks=lm,
                        kernel=kernel,
                        ridge=ridge,
                        max_rank=None if kernel == "linear" else a.max_rank,
                        seed=a.seed,
                    )
                    phi = model.features()
                    for s in later:
                        t = time.perf_counter()
                        model.fit(rec["vectors"][s][lm])
                        pred = model.predict_from_features(phi)
                        info = dict(m=m, landmarks=choice, kernel=kernel, ridge=ridge, choose_s=choose_s)
                        add("nystrom", s, pred, time.perf_counter() - t, m, **info)
            if choice != a.landmarks.split(",")[0]:
                continue  # the corrector on landmarks: the first choice only (its fits take seconds)
            for steps_ in (0, a.corrector_steps):
                for s in later:
                    model = _corrector(stale, a, steps_)
                    t = time.perf_counter()
                    model.fit(rec["vectors"][s][lm], lm)
                    pred = model.predict(np.arange(n))
                    info = dict(m=m, landmarks=choice, train_steps=steps_, pairs="eval-mode landmarks")
                    add("corrector", s, pred, time.perf_counter() - t, m, **info)
    for steps_ in (0, a.corrector_steps):
        for s in later:
            r, v = online_pairs(rec, s, a.online_window, a.base)
            model = _corrector(stale, a, steps_)
            t = time.perf_counter()
            model.fit(v, r)
            pred = model.predict(np.arange(n))
            info = dict(m=0, pairs=f"online, last {a.online_window} steps", n_pairs=int(r.size), train_steps=steps_)
            add("corrector", s, pred, time.perf_counter() - t, 0, **info)
    for s in later:  # in-sample: every target's fresh vector (N >> d: hardly any ridge needed)
        every = np.arange(n)
        for steps_ in (0, a.corrector_steps):
            model = _corrector(stale, a, steps_, ridge=1e-4)
            t = time.perf_counter()
            model.fit(rec["vectors"][s], every)
            add("ceiling", s, model.predict(every), time.perf_counter() - t, n, m=n, train_steps=steps_)
    return rows, dict(predict_all_s=_time_predict(stale, a))


def _corrector(stale: np.ndarray, a, steps: int, ridge: float | None = None) -> CorrectorDrift:
    ridge = a.corrector_ridge if ridge is None else ridge
    return CorrectorDrift(
        stale, hidden=a.hidden, normalize=True, ridge=ridge, steps_per_fit=steps, lr=a.lr, seed=a.seed
    )


def _time_predict(stale: np.ndarray, a) -> float:
    model = _corrector(stale, a, 0)
    few = min(100, stale.shape[0])
    model.fit(stale[:few], np.arange(few))
    t = time.perf_counter()
    model.predict(np.arange(stale.shape[0]))
    return time.perf_counter() - t


def summarise(rows: list[dict], rec: dict, timings: dict, encode_s: float) -> list[dict]:
    """One line per configuration: worst ratio to stale over the checkpoints, and cost."""
    n = rec["vectors"][0].shape[0]
    stale = {r["step"]: r for r in rows if r["method"] == "stale"}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in ("stale", "fresh"):
            continue
        key = json.dumps({k: v for k, v in r.items() if k in _CONFIG_KEYS}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    per_target_encode = encode_s / n
    for key, rs in groups.items():
        cfg = json.loads(key)
        err = [r["rel_score_error"] / stale[r["step"]]["rel_score_error"] for r in rs]
        tv = [r["tv_mean"] / stale[r["step"]]["tv_mean"] for r in rs]
        fit_s = float(np.mean([r["fit_s"] for r in rs]))
        m = rs[0]["encodes"]
        m_1m = EXTRAPOLATE_N if cfg["method"] == "ceiling" else m  # landmarks stay m; the ceiling encodes all
        host_1m = fit_s + timings["predict_all_s"] / n * EXTRAPOLATE_N * (cfg["method"] != "nystrom")
        out.append(
            dict(
                **cfg,
                worst_score_error_ratio=max(err),
                worst_tv_ratio=max(tv),
                score_error_ratios=err,
                tv_ratios=tv,
                recall_at_10=[r["recall_at_10"] for r in rs],
                encoder_share=m / n,
                encoder_share_at_1m=m_1m / EXTRAPOLATE_N,
                cost_share=(m * per_target_encode + fit_s) / encode_s,
                cost_share_at_1m=(m_1m * per_target_encode + host_1m) / (per_target_encode * EXTRAPOLATE_N),
            )
        )
    return sorted(out, key=lambda c: max(c["worst_score_error_ratio"], c["worst_tv_ratio"]))


_CONFIG_KEYS = ("method", "m", "landmarks", "kernel", "ridge", "train_steps", "pairs")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", choices=("minilm",), default="minilm")
    p.add_argument("--landmarks", default="uniform,kcenter,leverage")
    p.add_argument("--kernels", default="linear,rbf")
    p.add_argument("--ridges", default="1e-6,0.1", help="NystromDrift relative ridges")
    p.add_argument("--max-rank", type=int, default=256)
    p.add_argument("--corrector-steps", type=int, default=300)
    p.add_argument("--corrector-ridge", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--online-window", type=int, default=100, help="steps of positives the corrector learns from")
    p.add_argument("--base", type=int, default=0, help="the checkpoint whose vectors are the stale ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--available", action="store_true", help="evaluate the checkpoints recorded so far; never fine-tune")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = RecordConfig()
    a.temperature = 1.0 / cfg.scale
    folder = cache_folder(cfg, a.cache_dir)
    if not a.available and not os.path.exists(os.path.join(folder, f"ckpt{cfg.steps:05d}-targets.npy")):
        record(cfg, a.cache_dir, quiet=a.json)
    rec = load_recording(folder)
    if a.base not in rec["steps"]:
        raise SystemExit(f"--base {a.base}: not a recorded checkpoint ({rec['steps']})")
    timings = rec["meta"]["timings"]
    encode_s = float(np.median([v for k, v in timings.items() if k.startswith("encode_")]))
    rows, host = run_methods(rec, a)
    configs = summarise(rows, rec, host, encode_s)
    res = dict(
        benchmark="drift_minilm",
        encoder="all-MiniLM-L6-v2 (packaged, fine-tuned here)",
        record=asdict(cfg),
        cache_folder=folder,
        n_targets=int(rec["vectors"][0].shape[0]),
        held_out_queries=int(rec["positive_rows"].size),
        checkpoints=rec["steps"],
        index_built_at=a.base,
        temperature=a.temperature,
        full_reencode_s=encode_s,
        train_s_per_step={k: v for k, v in timings.items() if k.startswith("train_")},
        host_timings=host,
        args={k: v for k, v in vars(a).items() if k != "json"},
        best=configs[0],
        best_affordable=next(c for c in configs if c["method"] != "ceiling" and c["m"] <= 1000),
        configs=configs,
        rows=rows,
        machine=machine(),
    )
    emit(res, a.json)
    return res


if __name__ == "__main__":
    main()
