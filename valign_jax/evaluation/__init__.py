"""Evaluation metrics over already-computed features: pure NumPy, no model and no data stack.

- `retrieval`: image↔text recall@k with key-based relevance (several captions per image).
- `zeroshot`: CLIP prompt-ensemble class embeddings and top-k accuracy.
- `geometry`: modality gap (both forms), alignment and uniformity (METHODS.md §3 "Metrics").

Every function computes in float64 and returns a dict of plain Python floats whose keys carry no
group prefix; the caller writes them as `retrieval/<key>`, `zeroshot/<dataset>/<key>`,
`geometry/<key>` (DESIGN.md "Metrics"). Bad inputs (empty, NaN/inf, zero rows, mismatched sizes)
raise ValueError naming the input instead of yielding a silent NaN metric.
"""
