"""The stages: data prep, SFT, DPO, export, eval and chat, on the native model (`model/`).

Importing the package asks torch's CPU allocator to put large tensors (>= 2 MB) on transparent
huge pages, unless the environment already says otherwise (THP_MEM_ALLOC_ENABLE=0 turns it off).
torch reads the variable at its first large CPU allocation, so this takes effect in our entry
points (`python -m pipeline.sft` and the others) and in any process that imports `pipeline` before
allocating big tensors. Why: a training step frees its gradients and activations and allocates
them again next step, and on 4 KB pages every first touch is a page fault. Measured on this
project's 2-core CPU: filling a fresh 235 MB tensor 88 -> 20 ms; the MoE block's fwd+bwd at 128
tokens (bench/bench_moe.py, 352 MB of expert gradients a step) 404 -> 284 ms.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
