"""Locust user for ``bench_serve.py`` (run by it; not on its own).

Each user posts payloads back to back (closed loop, no think time) to ``/v1/predict``, in the
order of a shared schedule, until ``CXRKIT_LOCUST_REQUESTS`` requests have been sent; then the
runner quits. Every response (status, body, start/end time) is kept in memory and written to
``CXRKIT_LOCUST_OUT`` (pickle, with the CPU seconds locust spent from its first request on) when
locust stops, for bench_serve.py to check against ``Detector.predict`` after the timed run (no JSON
parsing inside the timed loop).

Environment: CXRKIT_LOCUST_PAYLOADS (a pickle: {"payloads": [bytes], "expect_status": [int],
"schedule": [payload index]}), CXRKIT_LOCUST_REQUESTS, CXRKIT_LOCUST_OUT.
"""

from __future__ import annotations

import os
import pickle
import resource
import time

from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

with open(os.environ["CXRKIT_LOCUST_PAYLOADS"], "rb") as _f:
    _SPEC = pickle.load(_f)
PAYLOADS: list[bytes] = _SPEC["payloads"]
EXPECT: list[int] = _SPEC["expect_status"]
SCHEDULE: list[int] = _SPEC["schedule"]
N_REQUESTS = int(os.environ["CXRKIT_LOCUST_REQUESTS"])
RECORDS: list[tuple[int, int, int, float, float, bytes]] = []  # (k, payload, status, t_start, t_end, body)
_next = [0]
_CPU0: list[float] = []  # this process's CPU seconds when the first request started (after imports, spawning)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class PredictUser(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = 60.0
    network_timeout = 120.0

    @task
    def predict(self) -> None:
        k = _next[0]
        if k >= N_REQUESTS:
            if len(RECORDS) >= N_REQUESTS:  # the last user to finish ends the run
                self.environment.runner.quit()
            raise StopUser()
        _next[0] = k + 1
        if k == 0:
            _CPU0.append(_cpu_s())
        i = SCHEDULE[k % len(SCHEDULE)]
        t0 = time.time()
        with self.client.post("/v1/predict", data=PAYLOADS[i], headers={"Content-Type": "application/octet-stream"},
                              catch_response=True, name="/v1/predict") as r:
            t1 = time.time()
            status = int(r.status_code or 0)
            RECORDS.append((k, i, status, t0, t1, bytes(r.content or b"")))
            if status == EXPECT[i]:
                r.success()
            else:
                r.failure(f"payload {i}: status {status}, expected {EXPECT[i]}")


@events.quitting.add_listener
def _dump(environment, **kw) -> None:  # type: ignore[no-untyped-def]
    with open(os.environ["CXRKIT_LOCUST_OUT"], "wb") as f:
        pickle.dump({"records": RECORDS, "cpu_s": _cpu_s() - (_CPU0[0] if _CPU0 else 0.0)}, f)
