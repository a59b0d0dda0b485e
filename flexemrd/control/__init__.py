"""The ranker's control path: status publishing, emrctl commands, migration, rebalancing.

Kept apart from the data path: the engines and the inference process get a
publisher callback or a listener object from here and never import it
themselves; each piece runs on its own thread.

    supervisor_side.py   SupervisorControl: owns the control block, serves emrctl (the
                         supervisor's loop), applies commands (cmd_<name>)
    rebalancer.py        Rebalancer: which connection to move (pure)
    inference_side.py    InferenceControl: the inference process's control thread:
                         sees new epochs, posts them to the batcher, acknowledges,
                         publishes the ranker's stats
    publishers.py        engine_publisher: an engine's stats into its control-block row

Migration, end to end (nothing reconnects, no request is lost)::

    emrctl migrate 3 --to 1 ─▶ supervisor: cmd_migrate ─▶ runtime.owners[3] = 1, epoch += 2
    inference control thread sees the epoch ─▶ posts it to the batcher, which (between
        batches) routes conn 3's new subrequests to engine 1's ring and puts
        SUB_MIGRATE(3 -> 1) in engine 0's ring
    engine 0 reaches the marker ─▶ passes the socket(s) to engine 1 (SCM_RIGHTS)
        ─▶ COMP_MIGRATED through its completion ring
    completion thread ─▶ InferenceControl.migrated ─▶ ranker.epoch_seen = epoch
        ─▶ supervisor answers emrctl
"""
