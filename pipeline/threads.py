"""The job's CPU thread budget: re-exported from `backends.threads`, where it is defined."""

from __future__ import annotations

from backends.threads import THREADS_ENV, cpu_threads, job_threads, session_options

__all__ = ["THREADS_ENV", "cpu_threads", "job_threads", "session_options"]
