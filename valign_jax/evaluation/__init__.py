"""Evaluation: metrics over computed features, and the evaluators that compute them.

Metrics (pure NumPy, float64; bad inputs raise ValueError naming the input rather than yielding
a silent NaN):
- `retrieval`: image<->text recall@k with key-based relevance (several captions per image);
- `zeroshot`: prompt-ensembled class embeddings and top-k accuracy;
- `geometry`: modality gap (both forms), alignment and uniformity;
- `compositional`: a true caption against negatives (SugarCrepe, ARO) and Winoground's text /
  image / group scores, over any score of (image, text) pairs;
- `fewshot`: k-shot closed-form ridge probes on frozen image features;
- `ln_shift`: how far training moved each LayerNorm (LiLT Fig. 4); `rerank`: recall after a
  second stage re-scores the top k.
They return plain dicts whose keys carry no group prefix; evaluators write them as
`retrieval/<key>`, `zeroshot/<dataset>/<key>`, `geometry/<key>`, `compositional/<dataset>/<key>`,
`fewshot/<dataset>/<k>shot` (docs/metrics.md).

Evaluators (`registry`, `evaluator`, `build`, `compositional_evaluator`, `fewshot_evaluator`,
`heldout`): model-running classes built per `config.evals` entry from registered types, each
with its own schedule; `inputs` says what they hand the model (pixels and tokens, or a
towerless model's tower features). Importing this package registers the built-in types.
"""

# registers the built-in evaluator types
from valign_jax.evaluation import (build, compositional_evaluator, fewshot_evaluator,  # noqa: F401
                                   heldout)
