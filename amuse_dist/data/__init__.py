"""Token shards: tokenize once, offline, into memory-mapped token files read by global index.

Pure Python + numpy (and the ``tokenizers`` library): nothing here imports torch or torchtitan,
so preparing data needs no GPU stack and the format can be read by any framework.

- :mod:`amuse_dist.data.tokenizer`: train a byte-level BPE, fingerprint a tokenizer, encode
  documents with the training BOS/EOS policy.
- :mod:`amuse_dist.data.sources`: the documents of a local folder or a Hugging Face dataset.
- :mod:`amuse_dist.data.shards`: the on-disk format (index JSON + ``.bin`` token files), its
  reader and the deterministic global sequence order.
- :mod:`amuse_dist.data.prepare`: tokenize sources into shards, in parallel, atomically.
- :mod:`amuse_dist.data.corpus`: the built-in offline corpus (stdlib text, a local BPE, then
  ``prepare``) in an assets folder that never writes into a folder it did not create.
"""

from amuse_dist.data.errors import DataError

__all__ = ["DataError"]
