"""Stage 1 runner: reader -> encoder -> writer, shard by shard, resumable, multi-process."""
