"""Data sources: the procedural shapes set (tiny preset); webdataset shards arrive later."""
