"""treeidx inside sentence-transformers training: a loss that samples its own hard
negatives, a callback that keeps their index current, and an offline miner with log q.

    TreeNegativesLoss         MultipleNegativesRankingLoss (in-batch negatives, scale =
                              1/temperature) plus k negatives per anchor drawn from the
                              current model's softmax over a corpus, encoded fresh with
                              gradients, logits corrected by −log(k·Q)
    TreeIndexRefreshCallback  a transformers TrainerCallback: landmark refresh, drift-
                              triggered full re-encode, index saved with each checkpoint
                              and restored on resume
    mine_softmax_negatives    offline negatives like sentence_transformers.util.
                              mine_hard_negatives, but drawn from the softmax (margin
                              filters applied exactly), with a `log_q` column
    log_q_data_collator       the trainer's collator, with `log_q` passed as the label

Switching a training script (docs/sentence_transformers.md)::

    loss = TreeNegativesLoss(model, corpus, k=8, temperature=0.05)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                         loss=loss, callbacks=[TreeIndexRefreshCallback(loss)])

Needs the `st` extra (`pip install 'treeidx[st]'`). `import treeidx` never imports this
module, nor torch, transformers or sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from sentence_transformers.util import cos_sim
    from torch import Tensor, nn
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "treeidx.sentence_transformers needs sentence-transformers, transformers and torch: pip install 'treeidx[st]'"
    ) from e

from ._validate import check_int, check_positive
from .dynamic import DynamicIndex, RefreshPolicy
from .sampling import SoftmaxSampler
from .tree import TreeIndex

__all__ = ["TreeNegativesLoss", "TreeIndexRefreshCallback", "mine_softmax_negatives", "log_q_data_collator"]

logger = logging.getLogger("treeidx.sentence_transformers")

INDEX_FILE = "treeidx_index.npz"  # written into each trainer checkpoint folder
STATE_FILE = "treeidx_state.json"


# ----------------------------------------------------------------------------- helpers


def _check_choice(value: Any, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_write_back(value: Any) -> bool | str:
    if not (value is True or value is False or value == "auto"):
        raise ValueError(f"write_back: expected True, False or 'auto', got {value!r}")
    return value


def _token_key(ids: np.ndarray) -> bytes:
    """A fixed-size key for one tokenized text (its unpadded input ids): 16 bytes instead of
    a tuple of ints keeps the lookup table small for large corpora."""
    return hashlib.blake2b(np.ascontiguousarray(ids, np.int64).tobytes(), digest_size=16).digest()


def _row_keys(features: dict[str, Any]) -> list[bytes]:
    ids = features["input_ids"].detach().cpu().numpy()
    mask = features.get("attention_mask")
    mask = np.ones_like(ids, bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
    return [_token_key(ids[r][mask[r]]) for r in range(ids.shape[0])]


def _to_device(features: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in features.items()}


def _call_seed(seed: int, rank: int, call: int) -> int:
    """Sampler seed of call number `call`: a 63-bit hash of (seed, rank, call), as in
    treeidx.torch.TreeNegativeSampler, so runs replay and ranks draw independent streams."""
    w = np.random.SeedSequence([seed, rank, call]).generate_state(2, np.uint32)
    return ((int(w[0]) << 32) | int(w[1])) & (2**63 - 1)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


# ----------------------------------------------------------------------------- the loss


class TreeNegativesLoss(nn.Module):
    """In-batch InfoNCE (as MultipleNegativesRankingLoss) plus k softmax negatives per anchor.

    For each anchor q the loss draws k targets from P(y|q) ∝ exp(cos(q, y) / temperature)
    over `corpus` (the anchor's positive excluded) through a `treeidx.DynamicIndex` built
    from one encode of the corpus at construction. The drawn texts are tokenized and
    encoded by the model *with gradients*, and their logits are corrected by −log(k·Q(y))
    (Q: the probability the sampler drew them with), so that Σ_j e^{s_j}/(k Q(y_j)) is
    an unbiased estimate of the corpus's softmax mass (treeidx.torch.sampled_softmax_loss
    explains the estimator). The positive and the in-batch columns are exactly
    MultipleNegativesRankingLoss's: with k = 0 (and no duplicate positives in the batch)
    the two losses are equal.

    Inputs are the trainer's usual columns: (anchor, positive[, negative_1, ...]); extra
    negative columns are used as MultipleNegativesRankingLoss uses them (uncorrected,
    shared across the batch) unless `log_q_from_labels` says the label column holds their
    log q (the output of `mine_softmax_negatives`).

    Positives are mapped to corpus ids so that they are never drawn as their own
    negative: by their tokens (`positive_ids="text"`: the corpus is tokenized once as the
    trainer tokenizes a column, so identical texts match; texts the tokenizer truncates
    to the same tokens are all treated as the positive), or from an integer label column
    of corpus ids (`positive_ids="label"`).

    model: the SentenceTransformer being trained.
    corpus: the target texts negatives are drawn from (every positive should be one).
    corpus_ids: their ids (default 0..N-1); distinct integers.
    k: negatives per anchor (0: plain in-batch loss).
    temperature: softmax temperature; logits are cos / temperature (MNRL's scale = 1/T).
    mode: "exact" (the softmax over the index's current vectors) or "approx" (the tree's
        certified-approximate proposal with its true log q; faster on large corpora).
    in_batch_negatives: keep the other rows' positives (and negative columns) as extra,
        uncorrected negatives, as MultipleNegativesRankingLoss does. False gives the
        consistent estimator of the full softmax (docs/torch.md).
    mask_duplicate_positives: an in-batch column holding this row's own positive (the
        same corpus id in another row) gets logit −inf instead of counting as a negative.
    unknown_positives: "error" (a positive whose tokens match no corpus text raises: a
        prompt or max length that differs between trainer and corpus) or "ignore" (it
        is then not in the index and cannot be drawn anyway).
    corpus_prompt: prompt prepended to corpus texts when encoding and tokenizing (must
        be the trainer's prompt for the positive column, if any).
    log_q_from_labels: the label column holds (B, n) log q of the n dataset negative
        columns (a triplet's (B,)): those get −log(n·q) like the sampled ones.
    write_back: re-encoded targets (this step's negatives and positives) replace their
        vectors in the index (`DynamicIndex.reencode`), so the hard negatives, which
        carry most of the softmax mass, stay current between refreshes. "auto" (default)
        does it only when the step's encodes ran without dropout: a training-mode
        encode of all-MiniLM-L6-v2 is 0.28 relative RMS away from the eval-mode vector
        (cos 0.96; docs/sentence_transformers.md), more than fine-tuning moves a target
        between refreshes, so writing it back would make the index worse, and its error
        would read as drift. True / False: always / never.
    n_landmarks, kernel, policy, budget, tolerance: DynamicIndex / sampler options
        (n_landmarks default max(16, N/100), capped at N).
    drift: the index's drift model: "nystrom" (default; landmarks re-encoded at each
        refresh) or "corrector" (`treeidx.CorrectorDrift` with unit-norm output, as this
        model's embeddings are; at each refresh `TreeIndexRefreshCallback` re-encodes a
        fresh uniform sample of n_landmarks targets instead of fixed landmarks, and the
        model also learns from every write-back). `drift_options`: CorrectorDrift
        options (hidden, ridge, steps_per_fit, ...; normalize defaults to True).
    seed: call c draws with a seed derived from (seed, rank, c): reproducible.
    encode_batch_size: batch size of the no-grad corpus encodes (build, refreshes).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        corpus: Sequence[str],
        *,
        k: int = 8,
        temperature: float = 0.05,
        mode: Literal["exact", "approx"] = "exact",
        corpus_ids: Sequence[int] | np.ndarray | None = None,
        in_batch_negatives: bool = True,
        mask_duplicate_positives: bool = True,
        positive_ids: Literal["text", "label"] = "text",
        unknown_positives: Literal["error", "ignore"] = "error",
        corpus_prompt: str | None = None,
        log_q_from_labels: bool = False,
        write_back: bool | Literal["auto"] = "auto",
        n_landmarks: int | None = None,
        kernel: str = "linear",
        drift: Literal["nystrom", "corrector"] = "nystrom",
        drift_options: dict[str, Any] | None = None,
        policy: RefreshPolicy | None = None,
        budget: int | None = None,
        tolerance: float = 0.05,
        seed: int = 0,
        encode_batch_size: int = 64,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, SentenceTransformer):
            raise TypeError(f"model: expected a SentenceTransformer, got {type(model).__name__}")
        if isinstance(corpus, str) or not isinstance(corpus, Sequence):
            raise TypeError(f"corpus: expected a sequence of texts, got {type(corpus).__name__}")
        texts = list(corpus)
        if not texts:
            raise ValueError("corpus: expected at least one text, got an empty corpus")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"corpus[{bad}]: expected a str, got {type(texts[bad]).__name__}")
        if corpus_ids is None:
            ids = np.arange(len(texts), dtype=np.int64)
        else:
            ids = np.asarray(corpus_ids)
            if ids.shape != (len(texts),) or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(
                    f"corpus_ids: expected {len(texts)} integer ids (one per text), "
                    f"got shape {ids.shape} dtype {ids.dtype}"
                )
            ids = ids.astype(np.int64)
            if np.unique(ids).size != ids.size:
                raise ValueError("corpus_ids: expected distinct ids, got duplicates")
        self.model = model
        self._st = model  # the unwrapped model: the trainer may swap self.model for a DDP wrapper
        self.texts = texts
        self.corpus_ids = ids
        self._row_of = {int(i): r for r, i in enumerate(ids.tolist())}
        self.k = check_int(k, "k", minimum=0)
        self.temperature = check_positive(temperature, "temperature")
        self.scale = 1.0 / self.temperature
        self.mode = _check_choice(mode, "mode", ("exact", "approx"))
        self.in_batch_negatives = bool(in_batch_negatives)
        self.mask_duplicate_positives = bool(mask_duplicate_positives)
        self.positive_ids = _check_choice(positive_ids, "positive_ids", ("text", "label"))
        self.unknown_positives = _check_choice(unknown_positives, "unknown_positives", ("error", "ignore"))
        if corpus_prompt is not None and not isinstance(corpus_prompt, str):
            raise TypeError(f"corpus_prompt: expected a str or None, got {type(corpus_prompt).__name__}")
        self.corpus_prompt = corpus_prompt
        self.log_q_from_labels = bool(log_q_from_labels)
        self.write_back = _check_write_back(write_back)
        self.seed = check_int(seed, "seed", minimum=0)
        self.encode_batch_size = check_int(encode_batch_size, "encode_batch_size", minimum=1)
        self.show_progress_bar = bool(show_progress_bar)
        self.rank = _rank()
        self.calls = 0
        self.last: dict[str, Any] = {}  # what the last forward drew (ids, log_q, write-back error)

        # positives -> corpus ids, by the tokens the trainer's collator produces
        self._by_tokens: dict[bytes, list[int]] = {}
        if self.positive_ids == "text":
            for lo in range(0, len(texts), 1024):
                feats = self._st.preprocess(texts[lo : lo + 1024], prompt=corpus_prompt)
                for r, key in enumerate(_row_keys(feats)):
                    self._by_tokens.setdefault(key, []).append(int(ids[lo + r]))

        n = len(texts)
        m = min(n, max(16, n // 100)) if n_landmarks is None else check_int(n_landmarks, "n_landmarks", minimum=1)
        self.n_landmarks = m
        drift = _check_choice(drift, "drift", ("nystrom", "corrector"))
        if drift_options is not None and drift != "corrector":
            raise ValueError("drift_options: only for drift='corrector' (Nyström takes n_landmarks and kernel)")
        self.index = DynamicIndex.build(
            self.encode_corpus(),
            ids,
            n_landmarks=m,
            kernel=kernel,
            drift=drift,
            corrector_options={"normalize": True, **(drift_options or {})} if drift == "corrector" else None,
            temperature=self.temperature,
            mode=self.mode,
            tolerance=tolerance,
            budget=budget,
            policy=policy,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_corpus(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Unit-norm float32 embeddings of corpus texts (all, or the given ids), no grad.

        `SentenceTransformer.encode` leaves the model in eval mode; the trainer puts it
        back in train mode at its next step."""
        texts = self.texts if ids is None else [self.texts[self._row_of[int(i)]] for i in np.asarray(ids).tolist()]
        e = self._st.encode(
            texts,
            batch_size=self.encode_batch_size,
            prompt=self.corpus_prompt,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=self.show_progress_bar,
        )
        return np.ascontiguousarray(e, dtype=np.float32).reshape(len(texts), -1)

    def _encode_with_grad(self, ids: np.ndarray, device: torch.device) -> Tensor:
        texts = [self.texts[self._row_of[int(i)]] for i in ids.tolist()]
        feats = _to_device(self._st.preprocess(texts, prompt=self.corpus_prompt), device)
        return self.model(feats)["sentence_embedding"]

    # ------------------------------------------------------------------ positives
    def _positive_sets(self, features: dict[str, Any], labels: Tensor | None, B: int) -> list[np.ndarray]:
        """The corpus ids of each row's positive (several when truncation makes texts equal)."""
        if self.positive_ids == "label":
            if (
                labels is None
                or labels.shape[:1] != (B,)
                or labels.dim() != 1
                or labels.is_floating_point()
                or labels.dtype == torch.bool
            ):
                got = None if labels is None else f"{tuple(labels.shape)} {labels.dtype}"
                raise ValueError(
                    f"positive_ids='label': expected an integer label column of corpus ids, shape ({B},), got {got}"
                )
            out = []
            for r, i in enumerate(labels.detach().cpu().tolist()):
                if int(i) not in self._row_of:
                    raise ValueError(f"positive_ids='label': row {r}'s label {i} is not a corpus id")
                out.append(np.array([int(i)], np.int64))
            return out
        out = []
        for r, key in enumerate(_row_keys(features)):
            hit = self._by_tokens.get(key)
            if hit is None:
                if self.unknown_positives == "error":
                    raise ValueError(
                        f"positive of batch row {r} matches no corpus text (compared by tokens). Every positive "
                        "must be in `corpus`, tokenized the same way: check the trainer's prompts / max length "
                        "against `corpus_prompt` and the model's max_seq_length, or pass unknown_positives='ignore'"
                    )
                out.append(np.empty(0, np.int64))
            else:
                out.append(np.array(hit, np.int64))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"TreeNegativesLoss: expected (anchor, positive, ...) columns, got {len(features)}")
        embeddings = embed_columns(self.model, features)
        return self.compute_loss_from_embeddings(embeddings, labels, features)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None, features: list[dict[str, Any]]
    ) -> Tensor:
        q, docs = embeddings[0], embeddings[1:]
        B = q.shape[0]
        n_extra = len(docs) - 1
        pos_sets = self._positive_sets(features[1], labels, B) if (self.k or self.mask_duplicate_positives) else None
        # in-batch part, computed exactly as MultipleNegativesRankingLoss does
        sim = cos_sim(q, torch.cat(docs, dim=0)) * self.scale  # (B, B·(1 + n_extra))
        rows = torch.arange(B, device=sim.device)
        positive = sim[rows, rows]
        drop = torch.zeros_like(sim, dtype=torch.bool)
        if not self.in_batch_negatives:
            drop[:] = True
            for c in range(1, 1 + n_extra):  # the row's own dataset negatives stay
                drop[rows, c * B + rows] = False
            drop[rows, rows] = False
        if self.mask_duplicate_positives and pos_sets is not None:
            first = np.array([s[0] if s.size else -1 for s in pos_sets], np.int64)
            known = first >= 0
            dup = np.stack([np.isin(first, s) & known for s in pos_sets])  # (B, B): row i's positive in column j
            np.fill_diagonal(dup, False)
            if dup.any():
                drop[:, :B] |= torch.from_numpy(dup).to(drop.device)
        cols = [sim]
        if self.log_q_from_labels and n_extra:
            lq = self._dataset_log_q(labels, B, n_extra).to(device=sim.device, dtype=sim.dtype)
            own = torch.stack([sim[rows, c * B + rows] for c in range(1, 1 + n_extra)], dim=1)  # (B, n)
            for c in range(1, 1 + n_extra):
                drop[rows, c * B + rows] = True  # replaced by the corrected copy below
            cols.append(own - lq - math.log(n_extra))
        if drop.any():
            cols[0] = sim.masked_fill(drop, -math.inf)
        neg_ids = log_q = None
        fresh: tuple[np.ndarray, Tensor] | None = None
        if self.k:
            neg, neg_ids, log_q, fresh = self._sample_and_encode(q, pos_sets)
            dt = torch.promote_types(q.dtype, torch.float32)
            s = torch.einsum("bd,bkd->bk", F.normalize(q.to(dt), dim=-1), F.normalize(neg.to(dt), dim=-1)) * self.scale
            cols.append(s - (torch.as_tensor(log_q, device=s.device, dtype=dt) + math.log(self.k)))
        # at least float32 (a half-precision log q is off by ~0.05); a no-op for float32 models,
        # so k = 0 stays MultipleNegativesRankingLoss to the bit
        dt = torch.promote_types(sim.dtype, torch.float32)
        logits = torch.cat([c.to(dt) for c in cols], dim=1) if len(cols) > 1 else cols[0].to(dt)
        positive = positive.to(dt)
        loss = -(positive - torch.logsumexp(logits, dim=1)).mean()
        if self.k and (self.write_back is True or (self.write_back == "auto" and not self._dropout_active())):
            self._write_back(docs[0], pos_sets, fresh)
        self.last.update(neg_ids=neg_ids, log_q=log_q)
        return loss

    def _dataset_log_q(self, labels: Tensor | None, B: int, n: int) -> Tensor:
        if labels is None or not labels.is_floating_point():
            raise ValueError(
                "log_q_from_labels=True: expected the label column to hold log q (floats); got "
                f"{None if labels is None else labels.dtype}. Build the trainer with "
                "data_collator=log_q_data_collator(model)"
            )
        lq = labels.reshape(B, -1)
        if lq.shape != (B, n):
            raise ValueError(
                f"log_q_from_labels=True: expected labels of shape ({B}, {n}) (one log q per "
                f"negative column), got {tuple(labels.shape)}"
            )
        return lq

    def _sample_and_encode(
        self, q: Tensor, pos_sets: list[np.ndarray]
    ) -> tuple[Tensor, np.ndarray, np.ndarray, tuple[np.ndarray, Tensor]]:
        """k draws per anchor from the index (positives excluded) and their fresh, differentiable embeddings."""
        B = q.shape[0]
        q_host = F.normalize(q.detach(), dim=-1).to(device="cpu", dtype=torch.float32).numpy()
        seed = _call_seed(self.seed, self.rank, self.calls)
        self.calls += 1
        res = self.index.sample(q_host, self.k, exclude=pos_sets, seed=seed)
        uniq, inv = np.unique(res.ids, return_inverse=True)  # encode each drawn text once
        emb = self._encode_with_grad(uniq, q.device)
        neg = emb[torch.as_tensor(inv.reshape(-1), device=emb.device)].view(B, self.k, -1)
        self.last.update(result=res, unique_negatives=int(uniq.size))
        return neg, res.ids, res.log_q, (uniq, emb)

    def _dropout_active(self) -> bool:
        return any(isinstance(mod, nn.Dropout) and mod.p > 0 and mod.training for mod in self._st.modules())

    @torch.no_grad()
    def _write_back(self, pos_emb: Tensor, pos_sets: list[np.ndarray], fresh: tuple[np.ndarray, Tensor]) -> None:
        """Targets this step encoded anyway replace their index vectors (as the index scores them:
        unit norm). Done after the draw, so this step's log q is the one the sampler used."""
        vec: dict[int, Tensor] = {}
        p = F.normalize(pos_emb.detach(), dim=-1)
        for r, s in enumerate(pos_sets):
            for i in s.tolist():
                vec[i] = p[r]
        n = F.normalize(fresh[1].detach(), dim=-1)
        for i, v in zip(fresh[0].tolist(), n):
            vec.setdefault(i, v)
        if not vec:
            return
        ids = np.fromiter(vec.keys(), np.int64, len(vec))
        x = torch.stack([vec[i] for i in ids.tolist()]).to(device="cpu", dtype=torch.float32).numpy()
        err = self.index.reencode(x, ids)
        self.last["write_back_error"] = err

    # ------------------------------------------------------------------ sentence-transformers hooks
    def get_config_dict(self) -> dict[str, Any]:
        """What the model card records about this loss."""
        return {
            "k": self.k,
            "temperature": self.temperature,
            "mode": self.mode,
            "corpus_size": len(self.texts),
            "in_batch_negatives": self.in_batch_negatives,
            "mask_duplicate_positives": self.mask_duplicate_positives,
            "write_back": self.write_back,
            "log_q_from_labels": self.log_q_from_labels,
        }

    @property
    def citation(self) -> str:
        return (
            "@article{bengio2008adaptive, title={Adaptive importance sampling to accelerate training of a "
            "neural probabilistic language model}, author={Bengio, Yoshua and Sen{\\'e}cal, Jean-S{\\'e}bastien}, "
            "journal={IEEE Transactions on Neural Networks}, year={2008}}"
        )


# ----------------------------------------------------------------------------- the callback


class TreeIndexRefreshCallback(TrainerCallback):
    """Keeps a TreeNegativesLoss's index current during `SentenceTransformerTrainer.train()`.

    After every optimizer step (`on_step_end`), in this order:

    * every `landmark_every` steps: re-encode the index's landmark texts (no grad, eval
      mode) and refit the drift model (`DynamicIndex.refresh_landmarks`): every target's
      predicted vector moves with the encoder for the cost of m encodes. `holdout`
      other targets, drawn afresh each time, are encoded too: their prediction error
      is the drift estimate (`DynamicIndex.drift_estimate`);
    * every `full_every` steps, or when the drift estimate (hold-out and write-back
      errors, running mean) passes `max_drift_error`: re-encode the whole corpus and
      rebuild (`DynamicIndex.full_refresh`).

    Write-back (the loss replacing the vectors of the targets each step encodes anyway):
    `write_back` True / False / "auto" sets `loss.write_back` ("auto": only encodes made
    without dropout, see TreeNegativesLoss); None keeps the loss's own setting.

    Checkpoints: `on_save` writes the index (`DynamicIndex.save`) and the loss's draw
    counter into the checkpoint folder (`treeidx_index.npz`, `treeidx_state.json`), so
    they are rotated with it. `on_train_begin` of a run resumed from a checkpoint
    (`trainer.train(resume_from_checkpoint=...)`) loads them back from
    `<output_dir>/checkpoint-<global_step>` (or from `resume_dir` when given), so the
    resumed run samples from the index the interrupted one had. A resumed run whose
    checkpoint has no index files logs a warning and re-encodes the corpus instead.

    Distributed training is not handled yet (untested): each rank would keep its own
    index; only rank 0 writes it at a checkpoint.

    `history` lists what was done (step, event, seconds, drift diagnostics).
    """

    def __init__(
        self,
        loss: TreeNegativesLoss,
        *,
        landmark_every: int | None = 50,
        full_every: int | None = None,
        max_drift_error: float | None = 0.5,
        holdout: int = 32,
        write_back: bool | Literal["auto"] | None = None,
        save_index: bool = True,
        resume_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(loss, TreeNegativesLoss):
            raise TypeError(f"loss: expected a TreeNegativesLoss, got {type(loss).__name__}")
        self.loss = loss
        self.landmark_every = None if landmark_every is None else check_int(landmark_every, "landmark_every", minimum=1)
        self.full_every = None if full_every is None else check_int(full_every, "full_every", minimum=1)
        if max_drift_error is not None:
            max_drift_error = check_positive(max_drift_error, "max_drift_error")
        self.max_drift_error = max_drift_error
        loss.index.policy = replace(loss.index.policy, max_drift_error=max_drift_error)
        if write_back is not None:
            loss.write_back = _check_write_back(write_back)
        self.holdout = check_int(holdout, "holdout", minimum=0)
        self.seed = check_int(seed, "seed", minimum=0)
        self.save_index = bool(save_index)
        self.resume_dir = None if resume_dir is None else os.fspath(resume_dir)
        self.history: list[dict[str, Any]] = []

    # -- the trainer's events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == 0 and self.resume_dir is None:
            return
        folder = self.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isfile(os.path.join(folder, INDEX_FILE)):
            self.load(folder)
            self._note(state.global_step, "restored", folder=folder)
        else:
            logger.warning(
                "resumed at step %d but %s has no %s: re-encoding the corpus instead",
                state.global_step,
                folder,
                INDEX_FILE,
            )
            self.full_refresh(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self.landmark_every and step % self.landmark_every == 0:
            self.refresh_landmarks(step)
        if (self.full_every and step % self.full_every == 0) or self.loss.index.needs_full_refresh:
            self.full_refresh(step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.save_index or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.save(folder)

    # -- actions (also callable directly)
    def refresh_landmarks(self, step: int = -1) -> None:
        """Re-encode the landmark texts and refit the drift model."""
        import time

        t = time.perf_counter()
        index = self.loss.index
        lm = index.landmark_ids
        if lm.size == 0:  # a model without landmarks (the corrector): a fresh uniform sample each time
            rng = np.random.default_rng([self.seed, max(step, 0), 1])
            lm = np.sort(rng.choice(index.ids, min(self.loss.n_landmarks, len(index)), replace=False))
        others = np.setdiff1d(index.ids, lm)
        h = min(self.holdout, others.size)
        kw: dict[str, Any] = {}
        if h:
            # a fresh uniform sample each time (seeded by the step): an unbiased error estimate
            hold = np.random.default_rng([self.seed, max(step, 0)]).choice(others, h, replace=False)
            x = self.loss.encode_corpus(np.concatenate([lm, hold]))
            fresh, kw = x[: lm.size], dict(holdout_ids=hold, holdout_vectors=x[lm.size :])
        else:
            fresh = self.loss.encode_corpus(lm)
        fit = index.refresh_landmarks(fresh, **kw) if index.landmark_ids.size else index.refit(fresh, lm, **kw)
        self._note(
            step,
            "refresh_landmarks",
            seconds=time.perf_counter() - t,
            n=int(lm.size),
            holdout=int(h),
            landmark_residual=fit.landmark_residual,
            holdout_error=None if fit.holdout is None else fit.holdout.predicted,
            holdout_stale_error=None if fit.holdout is None else fit.holdout.stale,
            drift_estimate=index.drift_estimate,
        )

    def full_refresh(self, step: int = -1) -> None:
        """Re-encode every corpus text and rebuild the index."""
        import time

        t = time.perf_counter()
        index = self.loss.index
        reason = "drift" if index.needs_full_refresh else "schedule"
        ids = index.ids
        index.full_refresh(self.loss.encode_corpus(ids), ids)
        self._note(step, "full_refresh", seconds=time.perf_counter() - t, n=int(ids.size), reason=reason)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the index and the loss's draw counter into `folder`."""
        folder = os.fspath(folder)
        self.loss.index.save(os.path.join(folder, INDEX_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"calls": self.loss.calls, "seed": self.loss.seed, "history": self.history}, f)

    def load(self, folder: str | os.PathLike) -> None:
        """Restore what `save` wrote (the index replaces the loss's, the draw counter resumes)."""
        folder = os.fspath(folder)
        self.loss.index = DynamicIndex.load(os.path.join(folder, INDEX_FILE))
        self.loss.index.policy = replace(self.loss.index.policy, max_drift_error=self.max_drift_error)
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                st = json.load(f)
            self.loss.calls = int(st["calls"])
            self.history = list(st.get("history", []))

    def _note(self, step: int, event: str, **info: Any) -> None:
        entry = {"step": int(step), "event": event, **info}
        self.history.append(entry)
        logger.info("step %d: %s %s", step, event, info)


# ----------------------------------------------------------------------------- the offline miner


def log_q_data_collator(model: SentenceTransformer, column: str = "log_q") -> SentenceTransformerDataCollator:
    """The trainer's default collator, with `column` passed to the loss as its label.

    sentence-transformers tokenizes every column that is not a label column, so a
    dataset from `mine_softmax_negatives` (with its `log_q` column) needs this collator
    (`SentenceTransformerTrainer(..., data_collator=log_q_data_collator(model))`) — or
    the column dropped (`dataset.remove_columns("log_q")`) for a loss that ignores it.
    With `TreeNegativesLoss(..., log_q_from_labels=True)` the log q then corrects the
    mined negatives' logits.
    """
    if not isinstance(column, str) or not column:
        raise ValueError(f"column: expected a column name, got {column!r}")
    return SentenceTransformerDataCollator(preprocess_fn=model.preprocess, valid_label_columns=[column])


def mine_softmax_negatives(
    dataset: Any,
    model: SentenceTransformer,
    corpus: Sequence[str] | None = None,
    *,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    num_negatives: int = 3,
    temperature: float = 0.05,
    mode: Literal["exact", "approx"] = "exact",
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    output_format: Literal["n-tuple", "triplet"] = "n-tuple",
    output_scores: bool = False,
    log_q_column: str = "log_q",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    batch_size: int = 32,
    budget: int | None = None,
    tolerance: float = 0.05,
    seed: int = 0,
    verbose: bool = True,
) -> Any:
    """Negatives drawn from the model's softmax, with the log-probability of each draw.

    Like `sentence_transformers.util.mine_hard_negatives` (same argument names, same
    corpus = `corpus` + the positives, de-duplicated; same filters), but instead of the
    top candidates or a uniform draw from a rank window, each row's `num_negatives`
    negatives are independent draws (with replacement) from

        P(y | anchor) ∝ exp(cos(anchor, y) / temperature)   over the allowed candidates,

    and the `log_q` column holds log P of each draw, so a loss can correct for the
    proposal (−log(n·q), `TreeNegativesLoss(log_q_from_labels=True)`).

    Allowed candidates of an anchor: the corpus minus all of the anchor's positives
    (every row with the same anchor text), minus candidates removed by a filter —
    `absolute_margin` (score + margin > the anchor's lowest positive score),
    `relative_margin` (score > pos − |pos|·margin), `max_score`, `min_score` (score <
    min_score) — then ranked by score: the first `range_min` are skipped and, if
    `range_max` is given, only ranks below `range_max` are kept. The filters are applied
    exactly, not by discarding draws: candidates above the thresholds are found by an
    exact tree search and excluded from the sampler (or, with `range_max` / `min_score`,
    the whole window is enumerated and sampled exactly), so `log_q` is the probability
    under the restricted softmax the draws actually follow. mode="approx" samples the
    unrestricted remainder approximately (its log_q is then the proposal's true one).

    Rows whose anchor has no allowed candidate are dropped (counted when verbose).

    output_format: "n-tuple" (default: anchor, positive, negative_1..negative_n, and a
        `log_q` list of n) or "triplet" (one row per draw: anchor, positive, negative,
        `log_q` float). `output_scores` adds a `scores` column ([positive, negatives...]).
    Returns a `datasets.Dataset`. Train with it by dropping `log_q` (any loss) or with
    `data_collator=log_q_data_collator(model)` (the log q reaches the loss as labels).
    Deterministic for a given seed (and model / corpus).
    """
    try:
        from datasets import Dataset
    except ImportError as e:  # pragma: no cover
        raise ImportError("mine_softmax_negatives needs `datasets`: pip install 'treeidx[st]'") from e
    if not isinstance(model, SentenceTransformer):
        raise TypeError(f"model: expected a SentenceTransformer, got {type(model).__name__}")
    columns = list(getattr(dataset, "column_names", None) or [])
    if len(columns) < 2:
        raise ValueError(f"dataset: expected a datasets.Dataset with (anchor, positive) columns, got columns {columns}")
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one row, got an empty dataset")
    anchor_col = anchor_column_name if anchor_column_name in columns else columns[0]
    positive_col = positive_column_name if positive_column_name in columns else columns[1]
    k = check_int(num_negatives, "num_negatives", minimum=1)
    T = check_positive(temperature, "temperature")
    _check_choice(mode, "mode", ("exact", "approx"))
    _check_choice(output_format, "output_format", ("n-tuple", "triplet"))
    range_min = check_int(range_min, "range_min", minimum=0)
    if range_max is not None:
        range_max = check_int(range_max, "range_max", minimum=1)
        if range_max <= range_min:
            raise ValueError(f"range_max: expected > range_min ({range_min}), got {range_max}")
    for name, v in (
        ("max_score", max_score),
        ("min_score", min_score),
        ("absolute_margin", absolute_margin),
        ("relative_margin", relative_margin),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name}: expected a finite number or None, got {v!r}")
    if not isinstance(log_q_column, str) or not log_q_column or log_q_column in (anchor_col, positive_col):
        raise ValueError(f"log_q_column: expected a new column name, got {log_q_column!r}")

    queries = list(dataset[anchor_col])
    positives = list(dataset[positive_col])
    texts = list(dict.fromkeys((list(corpus) if corpus is not None else []) + positives))
    row_of = {t: i for i, t in enumerate(texts)}
    uq = list(dict.fromkeys(queries))
    uq_of = {t: i for i, t in enumerate(uq)}
    pos_of_query: list[list[int]] = [[] for _ in uq]
    for a, p in zip(queries, positives):
        lst = pos_of_query[uq_of[a]]
        if row_of[p] not in lst:
            lst.append(row_of[p])

    corpus_emb = np.ascontiguousarray(
        model.encode_document(
            texts,
            batch_size=batch_size,
            prompt_name=corpus_prompt_name,
            prompt=corpus_prompt,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=verbose,
        ),
        np.float32,
    )
    query_emb = np.ascontiguousarray(
        model.encode_query(
            uq,
            batch_size=batch_size,
            prompt_name=query_prompt_name,
            prompt=query_prompt,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=verbose,
        ),
        np.float32,
    )
    n_corpus = len(texts)
    # the anchor's hardest positive sets the margins (as mine_hard_negatives does)
    pos_score = [np.array([float(query_emb[qi] @ corpus_emb[p]) for p in ps]) for qi, ps in enumerate(pos_of_query)]
    hardest = np.array([s.min() for s in pos_score])

    def removed(qi: int, s: np.ndarray) -> np.ndarray:
        """Candidates (scores s) a filter removes, with mine_hard_negatives's expressions."""
        out = np.zeros(s.shape, bool)
        if absolute_margin is not None:
            out |= s + absolute_margin > hardest[qi]
        if relative_margin is not None:
            out |= s > hardest[qi] - abs(hardest[qi]) * relative_margin
        if max_score is not None:
            out |= s > max_score
        if min_score is not None:
            out |= s < min_score
        return out

    tree = TreeIndex.build(corpus_emb, seed=seed)
    sampler = SoftmaxSampler(tree, temperature=T, mode=mode, tolerance=tolerance, budget=budget)
    window = range_max is not None or min_score is not None
    rng = np.random.default_rng([seed, 0x5EED])
    neg_ids = np.full((len(uq), k), -1, np.int64)
    neg_lq = np.zeros((len(uq), k), np.float64)
    neg_s = np.zeros((len(uq), k), np.float64)
    counts = {"filtered": 0, "no_candidates": 0}
    sample_q: list[int] = []
    sample_ex: list[np.ndarray] = []
    excl = [np.unique(np.array(p, np.int64)) for p in pos_of_query]
    plain = not window and range_min == 0 and absolute_margin is None and relative_margin is None and max_score is None
    first: tuple[np.ndarray, np.ndarray] | None = None
    m0 = 0
    if not plain:
        # one batched exact top-m0 search serves most anchors; the loop below widens it
        # only for anchors whose filtered candidates or window reach past it
        m0 = min(n_corpus - max(e.size for e in excl), (range_max or 0) + range_min + 32)
        if m0 > 0:
            first = tree.search(query_emb, m0, exclude=excl)
    for qi in range(len(uq)):
        ex = excl[qi]
        avail = n_corpus - ex.size
        if avail <= 0:
            counts["no_candidates"] += 1
            continue
        if plain:
            sample_q.append(qi)
            sample_ex.append(ex)
            continue
        m = m0 if first is not None else min(avail, 64)
        while True:
            if first is not None and m == m0:
                sc, ids = first[0][qi].astype(np.float64), first[1][qi]
            else:
                sc, ids = tree.search(query_emb[qi : qi + 1], m, exclude=[ex])
                sc, ids = sc[0].astype(np.float64), ids[0]
            rm = removed(qi, sc)
            kept = np.flatnonzero(~rm)
            if m >= avail:
                break
            if window:
                # the window is complete once it has range_max allowed ranks, or once the
                # scan went below min_score (nothing further down is allowed)
                if (range_max is not None and kept.size >= range_max) or (
                    min_score is not None and sc.size and sc[-1] < min_score
                ):
                    break
            elif kept.size > range_min and not rm[kept[range_min] :].any():
                # the upper filters remove a prefix of the ranking: past the first allowed
                # candidates kept here, nothing further down is removed
                break
            m = min(avail, max(2 * m, 64))
        counts["filtered"] += int(rm.sum())
        if window:
            w = kept[range_min:range_max]
            if w.size == 0:
                counts["no_candidates"] += 1
                continue
            z = sc[w] / T
            lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            p = np.exp(lp)
            pick = rng.choice(w.size, size=k, p=p / p.sum())
            neg_ids[qi], neg_lq[qi], neg_s[qi] = ids[w[pick]], lp[pick], sc[w[pick]]
        else:
            # excluded: positives, filtered candidates and the first range_min allowed ranks
            drop = np.unique(np.concatenate([ex, ids[rm], ids[kept[:range_min]]]))
            if drop.size >= n_corpus:
                counts["no_candidates"] += 1
                continue
            sample_q.append(qi)
            sample_ex.append(drop)
    if sample_q:
        res = sampler.sample(query_emb[sample_q], k, exclude=sample_ex, seed=seed)
        rows = np.array(sample_q)
        neg_ids[rows], neg_lq[rows] = res.ids, res.log_q
        neg_s[rows] = np.einsum(
            "bd,bkd->bk", query_emb[rows].astype(np.float64), corpus_emb[res.ids].astype(np.float64)
        )

    data: dict[str, list] = {anchor_col: [], positive_col: []}
    negs: list[list[str]] = []
    lqs: list[list[float]] = []
    scores: list[list[float]] = []
    for a, p in zip(queries, positives):
        qi = uq_of[a]
        if neg_ids[qi, 0] < 0:
            continue
        ps = float(pos_score[qi][pos_of_query[qi].index(row_of[p])])
        for j in range(k) if output_format == "triplet" else [None]:
            sel = slice(None) if j is None else slice(j, j + 1)
            data[anchor_col].append(a)
            data[positive_col].append(p)
            negs.append([texts[i] for i in neg_ids[qi, sel]])
            lqs.append(neg_lq[qi, sel].tolist())
            scores.append([ps] + neg_s[qi, sel].tolist())
    if output_format == "triplet":
        data["negative"] = [n[0] for n in negs]
        data[log_q_column] = [lq[0] for lq in lqs]
    else:
        for j in range(k):
            data[f"negative_{j + 1}"] = [n[j] for n in negs]
        data[log_q_column] = lqs
    if output_scores:
        data["scores"] = scores
    if verbose:
        print(
            f"mine_softmax_negatives: {len(uq):,} anchors, corpus {n_corpus:,}, {k} draws each at T={T}; "
            f"{counts['filtered']:,} candidates removed by filters; {counts['no_candidates']:,} anchors "
            f"without an allowed candidate (their rows dropped); {len(data[anchor_col]):,} rows"
        )
    return Dataset.from_dict(data)
