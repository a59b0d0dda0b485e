"""The engine worker process: connections to embedding servers, the rings to the inference process.

    main.py         engine_main(plan, engine_id, ready, publish=None): the process entry
    engine.py       Engine: builds the pieces, runs the threads
    sender.py       submission ring -> sockets; migration out
    receiver.py     sockets -> completion ring (its one producer, with completions.py)
    completions.py  CompletionWriter: the completion ring's producer end; others post to it
    connections.py  ConnState, ConnTable, Connector (connect + HELLO + shard check)
    credits.py      credit modes "off", "priority", "inband" as strategies
    mapping.py      "owned" / "shared" connection mappings as strategies
    handoff.py      SCM_RIGHTS hand-off of live connections between engines
    stats.py        EngineStatsView: read-only counters for the publisher thread
"""
