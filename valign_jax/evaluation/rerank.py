"""Retrieval with re-ranking: the dual encoder's top-k per query, re-scored by a second stage
(the fusion model's image–text-match head), reported as `retrieval_reranked/<dir>_r<m>` beside
the plain `retrieval/<dir>_r<m>`.

Per query, the k best gallery items by cosine similarity (ties to the lower index, as in
retrieval.py) are reordered by the score (ties keep their dual-encoder order); items below the
top k keep their places. So R@m for m >= k equals the dual encoder's, and k = 1 changes nothing.
The score is called on (query index, gallery index) pairs, block by block of queries.

What re-scores a pair (config.eval.rerank_score):
  "itm+contrastive"  the match head's logit plus the dual encoder's own logit for the pair,
                     exp(logit_scale) * cosine (default). Each is the logit of its own loss, so the
                     sum multiplies the two stages' odds: the head decides where the dual
                     encoder is unsure and cannot overturn it on a whim where it is sure (BLIP
                     adds the similarity to the match score the same way).
  "itm"              the match head's logit alone (ALBEF). Better once the head has overtaken
                     the dual encoder, which on the demo takes longer than the demo trains:
                     README, "Fusion re-ranker", has the measurements.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from valign_jax.evaluation import retrieval
from valign_jax.evaluation.evaluator import RetrievalEvaluator
from valign_jax.evaluation.geometry import l2_normalize

_PAIRS_PER_BLOCK = 4096
RERANK_SCORES = ("itm+contrastive", "itm")


def reranked_recall(queries, gallery, query_codes, gallery_codes,
                    score: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"r1": ..., "r5": ...}: recall@m of `queries` over `gallery` after re-ranking the top k.

    codes: equal integer codes mark relevant (query, gallery) pairs, as in retrieval.py.
    score(q, g) -> the second stage's scores of pairs (q[p], g[p]), higher = better match.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"re-ranking needs k >= 1 (config.eval.rerank_k), got {k}")
    x, y = l2_normalize(queries, "queries"), l2_normalize(gallery, "gallery")
    query_codes, gallery_codes = np.asarray(query_codes), np.asarray(gallery_codes)
    k = min(int(k), len(y))
    first = np.empty(len(x), np.int64)   # rank of the first relevant item in the new top k
    step = max(1, _PAIRS_PER_BLOCK // k)
    for start in range(0, len(x), step):
        top = np.argsort(-(x[start:start + step] @ y.T), axis=1, kind="stable")[:, :k]
        rows = np.arange(start, start + len(top))
        scores = np.asarray(score(np.repeat(rows, k), top.ravel())).reshape(top.shape)
        reranked = np.take_along_axis(top, np.argsort(-scores, axis=1, kind="stable"), axis=1)
        relevant = query_codes[rows, None] == gallery_codes[reranked]
        first[start:start + len(top)] = np.where(relevant.any(axis=1),
                                                 relevant.argmax(axis=1), k)
    dual = retrieval.first_relevant_rank(x, y, query_codes, gallery_codes)
    return {f"r{m}": float(np.mean(first < m) if m <= k else np.mean(dual < m)) for m in ks}


def fusion_score(encoder, params, image_features, image_tokens, text_features, text_tokens,
                 text_mask, rerank_score: str = "itm+contrastive"):
    """score(i, t) of a fusion model over image i and text t of these arrays (one row each):
    the match head's logit, plus exp(logit_scale) * cosine with "itm+contrastive". Re-ranking
    and the compositional evaluator both score pairs with it."""
    if rerank_score not in RERANK_SCORES:
        raise ValueError(f"config.eval.rerank_score={rerank_score!r}: expected one of "
                         f"{RERANK_SCORES}")
    # The dual encoder's logit of a pair; 0 when the head re-scores alone.
    weight = (float(np.exp(jax.device_get(params["logit_scale"])))
              if rerank_score == "itm+contrastive" else 0.0)
    unit_img = l2_normalize(image_features, "image features")
    unit_txt = l2_normalize(text_features, "text features")

    def score(i, t):
        return (encoder.match(params, image_tokens[i], text_tokens[t], text_mask[t])
                + weight * np.sum(unit_img[i] * unit_txt[t], axis=1))
    return score


class RerankingEvaluator(RetrievalEvaluator):
    """RetrievalEvaluator for fusion models: also `retrieval_reranked/*` (top-k by the dual
    encoder re-scored by the match head, on the tokens kept from the same pass)."""

    def __init__(self, encoder, records, collate, k: int = 10,
                 rerank_score: str = "itm+contrastive"):
        super().__init__(encoder, records, collate)
        if rerank_score not in RERANK_SCORES:
            raise ValueError(f"config.eval.rerank_score={rerank_score!r}: expected one of "
                             f"{RERANK_SCORES}")
        self.k, self.rerank_score = k, rerank_score

    def run(self, params):
        img, image_tokens = self.encoder.image_tokens(params, self.data.images,
                                                      self.data.prepare)
        txt, text_tokens = self.encoder.text_tokens(params, self.tokens)
        mask = self.tokens["attention_mask"]
        metrics = self.metrics(img, txt)
        i2t = fusion_score(self.encoder, params, img, image_tokens, txt, text_tokens, mask,
                           self.rerank_score)

        def t2i(q, g):
            return i2t(g, q)
        for name, (queries, gallery, q_codes, g_codes, score) in {
                "i2t": (img, txt, self.image_keys, self.text_keys, i2t),
                "t2i": (txt, img, self.text_keys, self.image_keys, t2i)}.items():
            recall = reranked_recall(queries, gallery, q_codes, g_codes, score, self.k)
            metrics.update({f"retrieval_reranked/{name}_{m}": v for m, v in recall.items()})
        return metrics, img, txt
