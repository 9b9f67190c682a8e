"""The Markdown the papers' run writes: LiLT's Table 1 and SAIL's head comparison, each beside
the paper's figures, the claims they test with the paper's figure and ours, and what the run
cost. Every figure here is read from the results the run measured (results.json)."""

from __future__ import annotations

from papers.figures import LILT_FIG_4_SIGN, LILT_TABLE_1, SAIL_TABLE_1


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def signed(x) -> str:
    return "—" if x is None else f"{x:+.2f}"


def mean_recall(metrics: dict, direction: str) -> float:
    """The mean of R@1, R@5 and R@10: how the paper's TR (i2t) and IR (t2i) are defined."""
    return sum(metrics[f"retrieval/{direction}_r{k}"] for k in (1, 5, 10)) / 3


def lilt_table(rows: list[dict]) -> str:
    head = ("| row | `configs/lilt.py:<row>,demo,pretrained` | % trained: paper / ours | paper "
            "TR | paper IR | paper IN-V2 | ours TR | ours IR | ours i2t R@1 | ours t2i R@1 | "
            "ours zero-shot | Pearson r image / text | wall / CPU s |\n"
            + "| --- " * 13 + "|")
    lines = [head]
    for r in rows:
        letter, name, paper_pct, tr, ir, inv2 = LILT_TABLE_1[r["row"]]
        end, rho = r["end"], r["pearson_r"]
        lines.append(
            f"| ({letter}) {name} | `{r['row']}` | {paper_pct:.2f} / {r['trained_pct']:.2f} | "
            f"{tr} | {ir} | {inv2} | {pct(mean_recall(end, 'i2t'))} | "
            f"{pct(mean_recall(end, 't2i'))} | {pct(end['retrieval/i2t_r1'])} | "
            f"{pct(end['retrieval/t2i_r1'])} | {pct(end['zeroshot/synthetic/top1'])} | "
            f"{signed(rho.get('image'))} / {signed(rho.get('text'))} | "
            f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def _score(rows: dict, row: str, paper: bool) -> float:
    """TR and IR averaged: one retrieval figure per row (percent)."""
    if paper:
        _, _, _, tr, ir, _ = LILT_TABLE_1[row]
        return (tr + ir) / 2
    end = rows[row]["end"]
    return 100 * (mean_recall(end, "i2t") + mean_recall(end, "t2i")) / 2


def _zeroshot(rows: dict, row: str, paper: bool) -> float:
    return LILT_TABLE_1[row][5] if paper else 100 * rows[row]["end"]["zeroshot/synthetic/top1"]


def lilt_claims(results: list[dict]) -> str:
    """Each claim of LiLT's Table 1 and Fig. 4 that the miniature can test, with the paper's
    figure and ours; retrieval as one figure per row, the mean of TR and IR."""
    rows = {r["row"]: r for r in results}

    def score(row, paper):
        return _score(rows, row, paper)

    def ratio(a, b, figure=score):
        return lambda paper: (f"{figure(a, paper):.1f} / {figure(b, paper):.1f} = "
                              f"{figure(a, paper) / figure(b, paper):.2f}")

    def difference(a, b, figure=score):
        return lambda paper: f"{figure(a, paper) - figure(b, paper):+.1f}"

    def share(row):  # (row − frozen) / (CLIP − frozen)
        def figure(paper):
            base = score("frozen", paper)
            return f"{(score(row, paper) - base) / (score('clip', paper) - base):.2f}"
        return figure

    def zeroshot(row, paper):
        return _zeroshot(rows, row, paper)

    def chance(paper):
        return f"{score('frozen', paper):.1f}" + (
            "" if paper else f" (every row at step 0: {_chance(results)})")

    claims = [
        ("frozen towers with fresh heads retrieve at chance: mean of TR and IR", chance),
        ("LiLT-LwA (7% trained) matches full training: LwA / CLIP", ratio("lilt_lwa", "clip")),
        ("LN unlocking (LiLT-LN, 0.24%) gets most of the way: its share of CLIP's gain over "
         "frozen", share("lilt_ln")),
        ("... and LN-only (no projections) a part of it: LN Only's share", share("ln_only")),
        ("unlocking LNs adds to the projections: LiLT-LN − Projection Only",
         difference("lilt_ln", "projection")),
        ("layerwise adapters beat the deep adapter: LwA − DA", difference("lilt_lwa", "lilt_da")),
        ("BitFit and LN unlocking are interchangeable: BF − LN",
         difference("lilt_bitfit", "lilt_ln")),
        ("LN unlocking matches full training at zero-shot classification: LiLT-LN / CLIP "
         "zero-shot", ratio("lilt_ln", "clip", zeroshot)),
        ("LiT classifies better than LiLT-LwA: LiT − LwA zero-shot",
         difference("lit", "lilt_lwa", zeroshot)),
        ("... but retrieves worse: LiT − LwA", difference("lit", "lilt_lwa")),
    ]
    out = ["| claim | paper | ours |", "| --- | --- | --- |"]
    for text, figure in claims:
        try:
            out.append(f"| {text} | {figure(True)} | {figure(False)} |")
        except KeyError:  # a claim about a row this run did not train
            continue
    # Fig. 4 trains the LayerNorms with the rest locked; whether its projections trained too
    # (our LiLT-LN) or not (our LN Only) the text leaves open, so both rows are shown.
    for row in ("ln_only", "lilt_ln"):
        if row in rows:
            rho = rows[row]["pearson_r"]
            out.append(f"| Fig. 4, LN-only alignment: the LayerNorms move more with depth in the "
                       f"image tower, less in the text tower (sign of Pearson's r of shift and "
                       f"depth, image / text; ours on {LILT_TABLE_1[row][1]}) | "
                       f"{LILT_FIG_4_SIGN['image']} / {LILT_FIG_4_SIGN['text']} | "
                       f"{signed(rho.get('image'))} / {signed(rho.get('text'))} |")
    return "\n".join(out)


def _chance(results: list[dict]) -> str:
    r1 = [r["start"][f"retrieval/{d}_r1"] for r in results for d in ("i2t", "t2i")]
    zs = [r["start"]["zeroshot/synthetic/top1"] for r in results]
    return (f"R@1 {pct(min(r1))}–{pct(max(r1))}, zero-shot {pct(min(zs))}–{pct(max(zs))}")


def sail_table(heads: list[dict]) -> str:
    lines = ["| alignment layer | paper: trainable | paper: INet-1k zero-shot | ours: trainable "
             "| ours: zero-shot | ours: i2t R@1 | ours: t2i R@1 | wall / CPU s |",
             "| --- " * 8 + "|"]
    for h in heads:
        tp, inet = SAIL_TABLE_1[h["head"]]
        e2e = h["end_to_end"]
        lines.append(f"| {h['head']} | {tp} | {inet} | {h['trainable']:,} | "
                     f"{pct(e2e['zeroshot/synthetic/top1'])} | {pct(e2e['retrieval/i2t_r1'])} | "
                     f"{pct(e2e['retrieval/t2i_r1'])} | {h['wall_s']:.0f} / {h['cpu_s']:.0f} |")
    return "\n".join(lines)


def sail_claims(heads: list[dict]) -> str:
    """SAIL Table 1's ordering of the alignment layers, the paper's zero-shot ImageNet-1k gap
    beside ours (zero-shot over the shapes' classes, end to end)."""
    zeroshot = {h["head"]: 100 * h["end_to_end"]["zeroshot/synthetic/top1"] for h in heads}
    paper = {head: figures[1] for head, figures in SAIL_TABLE_1.items()}
    claims = [("GLU layers beat linear ones: GLU − linear zero-shot", "glu", "linear"),
              ("an MLP beats a linear layer: MLP − linear", "mlp", "linear"),
              ("GLU beats the MLP, by less: GLU − MLP", "glu", "mlp")]
    out = ["| claim | paper | ours |", "| --- | --- | --- |"]
    for text, a, b in claims:
        if a in zeroshot and b in zeroshot:
            out.append(f"| {text} | {paper[a] - paper[b]:+.1f} | "
                       f"{zeroshot[a] - zeroshot[b]:+.1f} |")
    return "\n".join(out)


def towers_table(towers: dict) -> str:
    names = {"image": "image tower (`vit_tiny_l4`): 24-class colour × shape classifier",
             "text": "text tower (`bert_tiny_l4`): masked-language model of the captions"}
    lines = ["| stage (`configs/pretrain.py`) | held-out metric | step 0 → end | steps | "
             "wall / CPU s |", "| --- " * 5 + "|"]
    for side, t in towers.items():
        lines.append(f"| {names[side]} | `{t['heldout_metric']}` | {pct(t['heldout_start'])} → "
                     f"{pct(t['heldout_end'])} | {t['steps']} | {t['wall_s']:.0f} / "
                     f"{t['cpu_s']:.0f} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The whole report of one run of `python -m papers.run` (results: its results.json)."""
    parts = [f"# The papers' findings in miniature\n\n"
             f"`python -m papers.run {results['command']}`: {results['when']}, "
             f"{results['machine']}. All figures in percent; ours on the embedded shapes' "
             f"held-out split (512 images, their paraphrased captions; a caption of any image "
             f"with the same attributes counts as a hit), the papers' on their own benchmarks "
             f"— the comparison is of orderings and ratios, never of values."]
    if "towers" in results:
        parts.append("## The pretrained towers\n\n" + towers_table(results["towers"]))
    if "lilt" in results:
        parts.append("## LiLT, Table 1\n\nOurs: TR / IR = mean of i2t / t2i R@1, R@5, R@10 "
                     "(the paper's definition); zero-shot = top-1 over the 24 colour × shape "
                     "classes, the prompts ensembled; Pearson r of each tower's per-layer "
                     "LayerNorm shift against depth (Fig. 4), — where no LayerNorm moved.\n\n"
                     + lilt_table(results["lilt"]) + "\n\n" + lilt_claims(results["lilt"]))
    if "sail" in results:
        parts.append("## SAIL, Table 1: alignment layers on frozen towers\n\nOurs: zero-shot "
                     "and retrieval end to end, the towers put back under the layers trained "
                     "from cached features; the first head's time includes building the cache "
                     "the three share.\n\n"
                     + sail_table(results["sail"]) + "\n\n" + sail_claims(results["sail"]))
    timing = results["timing"]
    reused = "" if results.get("towers_trained") else (
        f"- the towers: reused from {results['towers_dir']} (trained there in "
        f"{sum(t['wall_s'] for t in results['towers'].values()) / 60:.1f} min wall)\n")
    parts.append("## Cost\n\n" + reused + "\n".join(
        f"- {name}: {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU"
        for name, t in timing["stages"].items())
        + f"\n- total: {timing['total']['wall_s'] / 60:.1f} min wall, "
        f"{timing['total']['cpu_s'] / 60:.1f} min CPU; 1-minute load average over the run "
        f"{timing['load']['mean']} (min {timing['load']['min']}, max {timing['load']['max']}) "
        f"on {timing['load']['cores']} cores")
    return "\n\n".join(parts) + "\n"
