"""One planner per job kind: the checks and defaults that turn a request into the kind's spec
(graft/jobspec.py). `app/jobs/service.py` picks the planner by the request's type."""
