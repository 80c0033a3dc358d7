"""mHC hyper-connections: stream mixing weights (with Sinkhorn), collapse + RMSNorm, expand.

`reference` is plain torch (the model's reference path); `kernel` needs triton.
"""
