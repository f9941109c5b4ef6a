"""The background GPU worker: claim one queued job at a time, run it, store the video, record the outcome.

It runs as a thread inside the API process (`T2V_WORKER=thread`, the default), or standalone with
`python worker.py`, sharing the job store and the blob store with API nodes that run `T2V_WORKER=off`.
`python worker.py --gpus all` runs one such worker process per GPU, and restarts one that dies.
The models load once per worker and are reused for every job.

One module per reason to change, as in Celery's and RQ's workers: `loop` (the job loop, `Worker`), `lease`
(the running job's lease), `progress` (progress and preview reporters), `errors` (a failure's code and message),
`files` (where a job's files live), `gpus` (GPU slots and peaks), `supervisor` (one worker process per slot)
and `cli` (`python worker.py`).
"""
