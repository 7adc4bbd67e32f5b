"""The recipe around the denoiser: the flow-matching objective and sampler, REPA and its frozen
teachers, the LPIPS and DINO perceptual losses, the loss terms of a micro-batch, and the EMA."""
