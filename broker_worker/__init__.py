"""InternVL workers fed by Redis Streams.

- ``broker_worker.protocol``: the torch-free job protocol shared with the gateway and any Python client
  (Redis names, typed messages, error codes, the Lua scripts, clients, health, connections, image limits).
- ``broker_worker.model``: the engines (InternVL, batching, the fake one), loading, device maps, prompts, tiling;
  imported only by workers.
- at the top: the worker itself (take loop, one job's run, the queue, the relay of deltas) and its CLI.
"""

from broker_worker._moved import install as _install_moved_paths

__version__ = "0.1.0"
_install_moved_paths()
