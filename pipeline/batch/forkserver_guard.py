"""Imported first by a batch's fork server (its preload list): the fork server dies with the batch.

Importing this module is the act: `pipeline.batch.lifetime.bind_fork_server` arms the fork
server's parent-death signal when a batch process named itself its owner, and does nothing in any
other process.
"""

from __future__ import annotations

from pipeline.batch.lifetime import bind_fork_server

bind_fork_server()
