"""The denoiser: PRX blocks, attention backends and 2-D RoPE, TREAD routing, the Liger option,
and the weight-name converters. Knows no parallelism, data, optimizer or teacher."""
