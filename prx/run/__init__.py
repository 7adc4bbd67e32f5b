"""Running a training job: process setup, parallelism (activation checkpointing, compile, FSDP2),
the batch plan, checkpoints, stop signals, the bad-step guard, and the run log."""
