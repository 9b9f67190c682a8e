"""The papers' findings in miniature, offline (`python -m papers.run`): tiny towers pretrained
on the embedded data, then LiLT's Table 1 and SAIL's alignment-layer comparison on them, each
beside the paper's figures. Like benchmarks/, it runs the recipes of configs/ and writes what it
measured; results of the committed run are in papers/results/."""
