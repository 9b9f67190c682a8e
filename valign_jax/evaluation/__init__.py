"""Evaluation metrics over already-computed features: pure NumPy, no model and no data stack.

- `retrieval`: image↔text recall@k with key-based relevance (several captions per image).
- `zeroshot`: CLIP prompt-ensemble class embeddings and top-k accuracy.
- `geometry`: modality gap (both forms), alignment and uniformity.
- `compositional`: true caption against negatives (SugarCrepe, ARO) and Winoground's
  text / image / group scores, over any score of (image, text) pairs.
- `fewshot`: k-shot closed-form ridge probes on frozen image features.

Every function computes in float64 and returns a dict of plain Python floats whose keys carry no
group prefix; the caller writes them as `retrieval/<key>`, `zeroshot/<dataset>/<key>`,
`geometry/<key>`, `compositional/<dataset>/<key>`, `fewshot/<dataset>/<k>shot`. Bad inputs
(empty, NaN/inf, zero rows, mismatched sizes) raise ValueError naming the input instead of
yielding a silent NaN metric.
"""
