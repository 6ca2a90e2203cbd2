"""InternVL workers fed by Redis Streams.

The torch-free core (``constants``, ``messages``, ``errors``, ``jobs``, ``client``, ``health``) is shared with the
gateway and with any Python client; the model side (``tiling``, ``prompt``, ``loading``, ``device_map``,
``internvl_engine``, ``batching``) is imported only by the worker.
"""

__version__ = "0.1.0"
