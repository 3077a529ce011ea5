"""A BullMQ ``Worker`` that fetches like Node BullMQ's: next job on completion, and
one fetch at a time; and one that survives a job whose data is not JSON.

* BullMQ parses a job's data (``json.loads`` in ``Job.fromJSON``) while it fetches
  the job, after ``moveToActive`` locked it and before any processor sees it. Bytes
  that are not JSON (or not UTF-8) put on the queue by another client made that
  fetch raise: the job stayed active, stalled, went back to wait and failed again,
  for ever. :class:`ParsingWorker` hands such a job over with its raw text as its
  data instead, and the adapter's processor dead-letters it (the payload does not
  decode) like any other bad job.

* BullMQ's ``moveToFinished`` script can hand back the next waiting job (locked for
  the same worker) in the same call; Node BullMQ's worker uses it, the Python worker
  (3.4) passes ``fetch_next=False`` and fetches every job with a separate
  ``moveToActive``. This subclass asks for the next job when it completes one and
  returns it to the worker's run loop, which processes whatever a finished task
  returns as the next job. One script call per job saved.
* The Python worker's run loop starts a fetch for every free slot at once. When the
  queue runs dry that is a herd: each job added wakes up to ``concurrency`` slots
  whose ``moveToActive`` calls all but one come back empty (measured: 1,100 empty
  calls while one worker of concurrency 32 ran 200 jobs of 20 runs). Node's worker
  fetches in sequence; here non-blocking fetches queue behind one another, and a
  fetch that finds the queue already seen empty returns without asking Redis (the
  one blocking wait for new jobs is left as it is).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bullmq import Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError

__all__ = ["FetchingWorker", "ParsingWorker"]


class ParsingWorker(Worker):  # type: ignore[misc]
    """``bullmq.Worker`` that fetches a job whose data is not JSON, data as raw text."""

    async def nextJobFromJobData(
        self,
        job_data: dict[str, Any] | None = None,
        job_id: str | None = None,
        limit_until: int = 0,
        delay_until: int = 0,
        token: str | None = None,
    ) -> Any:
        try:
            return await super().nextJobFromJobData(
                job_data, job_id, limit_until, delay_until, token
            )
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            raw = (job_data or {}).get("data")
            if raw is None or _parses(raw):
                raise
            # The raw text (undecodable bytes kept as lone surrogates by the client's
            # ``surrogateescape``) as the job's data: the processor dead-letters it.
            text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            fixed = {**(job_data or {}), "data": json.dumps(text)}
            return await super().nextJobFromJobData(fixed, job_id, limit_until, delay_until, token)


def _parses(raw: str | bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


class FetchingWorker(ParsingWorker):
    """``bullmq.Worker`` with completion and the next fetch in one ``moveToFinished``,
    and fetches of idle slots made one at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetching = asyncio.Lock()

    async def getNextJob(self, token: str) -> Any:
        if self.drained and not self.waiting:
            return await super().getNextJob(token)  # the blocking wait for new jobs
        async with self._fetching:
            if self.drained or self.closing:
                return None  # a fetch ahead of this one found the queue empty
            return await super().getNextJob(token)

    async def processJob(self, job: Any, token: str) -> Any:
        for option in ("removeOnComplete", "removeOnFail"):
            if option not in job.opts and option in self.opts:
                job.opts[option] = self.opts[option]
        self.jobs.add((job, token))
        self.lockManager.track_job(job.id, token, int(time.time() * 1000))
        try:
            if job.deferredFailure:
                failure = UnrecoverableError(job.deferredFailure)
                await job.moveToFailed(failure, token)
                self.emit("failed", job, failure)
                return None
            result = await self.processor(job, token)
            if self.forceClosing:
                return None
            fetch = not self.closing and not self.paused
            moved = await self.backend.moveToCompleted(
                job, result, job.opts.get("removeOnComplete", False), token, fetch_next=fetch
            )
            job.returnvalue = result
            job.attemptsMade += 1
            self.emit("completed", job, result)
            if not fetch or not moved["result"]:
                return None
            data, job_id, limit_until, delay_until = moved["result"]
            return await self.nextJobFromJobData(
                data, job_id, limit_until or 0, delay_until or 0, token
            )
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:
            try:
                if not self.forceClosing:
                    await job.moveToFailed(err, token)
                self.emit("failed", job, err)
            except Exception as inner:
                self.emit("error", inner, job)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
