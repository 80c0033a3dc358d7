import os

import torch

# kernels run through the Triton interpreter on a CPU; it must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the stored tokenizer and models are used offline; nothing here may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# a real tritonserver with the tiny model, shared by tests/server and tests/reliability
from .server_fixtures import server, tiny_dir  # noqa: E402,F401
