"""The job protocol, torch-free: what workers, the gateway and any Python client share. Redis names and timings
(``constants``), typed messages (``messages``), named states (``states``), error codes (``errors``), the job's
Lua scripts and their callers (``jobs``, ``lua/``), clients (``client``), worker health (``health``), connections
from a URL (``connections``) and image limits (``images``)."""
