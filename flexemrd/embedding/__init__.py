"""The embedding server process: shards in DRAM, partial pooling for rankers.

- ``store.py``: ``EmbeddingStore``, the shards held and pooling over them;
- ``credits.py``: ``CreditPool``, flow-control credits of one ranker connection;
- ``server.py``: ``EmbeddingServer``, one event loop over a transport ``Listener``;
- ``main.py``: ``EmbeddingPlan``, ``embedding_main``, ``embedding_plans``.

Nothing heavy is imported here, so the supervisor can import the plans
without torch.
"""
