"""Semantic dedup (SemDeDup) stages: vector checks and normalisation,
k-means fit and nearest-centroid assignment, and the per-cluster pairwise
pass that finds each member's most similar higher-ranked member.

Plain callables over numpy arrays and Arrow tables: they know nothing of
Hydra or Ray, so a script can run them directly on CPU or CUDA (`device`,
`dtype` are constructor arguments: fp16 on CUDA, fp32 on CPU by default).
"""
