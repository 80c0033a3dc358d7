import os

# the stored tokenizer and models are used offline; nothing here may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# a real tritonserver with the tiny model, shared by tests/server and tests/reliability
from .server_fixtures import server, tiny_dir  # noqa: E402,F401
