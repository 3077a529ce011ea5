"""A BullMQ ``Worker`` whose finishing call also fetches the next job.

BullMQ's ``moveToFinished`` script can hand back the next waiting job (locked for
the same worker) in the same call; Node BullMQ's worker uses it, the Python worker
(3.4) passes ``fetch_next=False`` and fetches every job with a separate
``moveToActive``. This subclass asks for the next job when it completes one and
returns it to the worker's run loop, which processes whatever a finished task
returns as the next job. One script call per job saved.
"""

from __future__ import annotations

import time
from typing import Any

from bullmq import Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError

__all__ = ["FetchingWorker"]


class FetchingWorker(Worker):  # type: ignore[misc]
    """``bullmq.Worker`` with completion and the next fetch in one ``moveToFinished``."""

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
