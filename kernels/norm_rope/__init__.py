"""RMSNorm (weighted, per head) and interleaved partial RoPE, fused with the KV write.

`reference` is plain torch (the model's reference path); `kernel` needs triton.
"""
