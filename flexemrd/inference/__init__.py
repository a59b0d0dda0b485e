"""The ranker's inference process: one module per job, one owner per thing.

Path of one request through this package (threads in brackets)::

    frontend.py    [accept, session]   unix socket: read a frame, hand it to admission
    admission.py   [session]           decode + validate (flexemr.validation) -> Work,
                                       or an immediate error / empty answer
    batcher.py     [batcher]           coalesce Work into a Batch (≤ max_batch samples or
                                       max_wait), ask the cache for hits, split the misses
                                       per server and submit them (submission.py)
    submission.py  [batcher]           the only writer of the submission rings: picks each
                                       server's connection and its engine, registers the
                                       subrequest in the pending table (pending.py)
    completions.py [completion]        the only reader of the completion rings: one
                                       doorbell, partials into their Batch, losses and
                                       migrations reported to their listeners
    batch.py       [any, under its lock] the Batch: the one module that mutates batch state
    lookups.py     [batcher, completion] the one LOOKUP encoding of a part: first sends,
                                       hedges and re-issues ask for the same thing
    finisher.py    [finisher]          global pooling result, NN forward, replies

``service.py`` composes these; ``main.py`` is the process entry.  Control work
(status publishing, epochs from emrctl) runs on the control package's own
thread and reaches the batcher only as queued ``ControlRequest`` objects,
applied between batches: the data path never waits on the control path.
"""
