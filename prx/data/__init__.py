"""Data sources: the procedural shapes set (tiny preset) and webdataset shards (webdata, prepare)."""
