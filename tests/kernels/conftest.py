"""Kernel tests run through the Triton interpreter when no GPU is present.

`TRITON_INTERPRET` must be set before `triton` is first imported, which is why it happens here.
Set `DSV4_REAL_SHAPES=1` on a CUDA machine to run the same tests at V4 shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
