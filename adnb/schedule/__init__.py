"""``train-all``: every (method, category) trained once into the cache, here or on a Ray cluster.

The book loads trained weights from its cache (``adnb.runtime.cache``) instead of retraining, and
every method trains through one ``Recipe`` under one cache key, so a rebuild can be spread out:
train every job anywhere, bring the weights home, then ``make book`` retrains nothing.

- ``plan``: the jobs, and which are done, asked of the recipes without training anything;
- ``transfer``: cache entries travel between workers and the driver (no shared file system needed);
- ``worker``: what a worker does with one job (``run_job``);
- ``executors``: where jobs run, a pool of processes here (``local``) or Ray tasks (``ray``);
- ``driver``: ``train_all`` itself: plan, run, bring home, report.

Finished jobs are skipped on the next call; an interrupted one resumes from its ``checkpoint.pt``
where its worker keeps (or shares) the cache.
"""

from adnb.schedule.driver import Report, run_jobs, train_all
from adnb.schedule.executors import EXECUTORS, LocalExecutor, RayExecutor, make_executor
from adnb.schedule.plan import Job, Planned, check_request, overrides_for, plan
from adnb.schedule.transfer import read_entries, relative, write_entries
from adnb.schedule.worker import Outcome, Task, run_job

__all__ = ["EXECUTORS", "Job", "LocalExecutor", "Outcome", "Planned", "RayExecutor", "Report", "Task",
           "check_request", "make_executor", "overrides_for", "plan", "read_entries", "relative", "run_job",
           "run_jobs", "train_all", "write_entries"]
