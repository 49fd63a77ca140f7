"""Prefix-attention launch configurations measured best on a GPU, keyed by
(compute capability major, minor, head dim D, sequence-length bucket, dtype name):

    bucket: 256 (N <= 256), 1024 (N <= 1024), 0 (longer); dtype: "bfloat16", "float16", "float32"
    value:  {"fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages), "dkdv": (...), "dq": (...),
             "bwd": "split" | "fused" | "atomic", "fwd_tma": bool (forward loads by tensor descriptors),
             "rows": "<result file the choice rests on>"}

Written by `python benchmarks/sweep_attention.py --write-table` from the sweep's rows (the fastest
correct candidate per key, by device time of forward + backward); a key not listed uses the fixed
defaults of kernels/prefix_attention.py `_tiles`. Empty until a sweep has run on a GPU.
"""
TABLE: dict[tuple[int, int, int, int, str], dict] = {}
