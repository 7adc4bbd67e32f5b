"""Triton kernels of the trainer, each with a PyTorch reference of the same signature in `ref`.

The model calls the functions exported here; it picks kernel or reference once, by device.
Until a kernel lands for an op, the reference is what runs.
"""
