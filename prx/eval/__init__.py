"""Looking at a model: sampling, sample grids, the shapes prompt-following score, the evaluations
the loop runs, and the sample command (`python -m prx.eval.sample`)."""
