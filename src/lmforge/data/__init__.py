"""Data preparation: reading and cleaning a corpus, token shards and their manifest, the data report.

The training batch sampler lives in ``lmforge.data.batches``.
"""
