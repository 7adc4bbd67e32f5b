"""Names of what the training log records, in a module without torch: `prx.plot` reads
metrics.jsonl by them, and importing torch is ~5 s of its ~7 s cold start on 2 CPU cores."""

LOSS_TERMS = ("diffusion", "repa", "lpips", "dino")  # logged as loss_<term>, weighted

# Timestep bins of the per-t loss log: [0, 0.3), [0.3, 0.6), [0.6, 1].
T_BIN_EDGES = (0.3, 0.6)
T_BIN_NAMES = ("t0.0-0.3", "t0.3-0.6", "t0.6-1.0")
