"""Next-token sampling on the device: counter-based noise, temperature, top-k / top-p cutoffs, bans.

`reference` is plain torch (the CPU path); `kernel` needs triton and is imported only where used.
"""
