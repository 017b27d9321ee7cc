"""Everything a training run needs around the research code, behind one boundary (`workdir.session`).

    with workdir.session(config, path) as session:   # the workdir checked, locked, its record read
        ...                                          # nin_jax.train's setup and loop

Modules: `workdir` (the session: refuses a workdir holding another experiment before anything is written,
records the experiment or its extension, turns a full disk into one message naming what is intact), `lock`
(one training per workdir), `record` (config.json, results.json, committed steps), `recovery` (which
checkpoint to restore, and what a damaged one costs), `metrics_log` (metrics.jsonl), `preemption` (SIGTERM
and Ctrl-C), `quiet` (the libraries' noise), `remote` (gs:// paths that cannot be reached), `cli` (the command
line's flags, process set-up, one-line errors), `cluster` (joining a multi-process job), `peers` (ending
the job in every process, with one line, when one of its processes is lost).
"""
