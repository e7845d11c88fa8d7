"""torchtitan dataloaders: token shards (every offline dataset) and hub streams.

- :mod:`.datasets`: the one table of dataset names and the resolution of offline names to token
  shards (pure Python, imported by the launcher before torch);
- :mod:`.token_shards`: the world-size-free token-shard loaders (training and validation);
- :mod:`.global_batches`: world-size-free global batches over a torchtitan text stream (hub);
- :mod:`.hub`: the hub datasets registered with torchtitan.

This package's ``__init__`` imports nothing, so ``.datasets`` stays importable without torch.
"""
