"""PRX speedrun trainer: a lean pixel-space text-to-image diffusion trainer."""
