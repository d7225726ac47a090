"""Batch conversion: a manifest of jobs, run in isolated processes, reported as one summary.

`base` holds the records (`JobOutcome`, `BatchSettings`), the `Executor` protocol and the one
scheduling loop; `local` and `ray_executor` each supply only how a job's process is started,
polled and killed; `registry` names them; `worker` runs inside a job's process; `manifest`
reads the TOML; `report` writes the summary files; `progress` is the CLI's display and event log;
`lifetime` (with `forkserver_guard`) ties job processes to the batch; `death` explains a job's death.
"""
