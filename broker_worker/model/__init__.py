"""The model side of a worker (imports torch): the engine interface (``engine``) and its implementations
(``internvl_engine``, ``batching``, ``fake_engine``), checkpoints (``loading``), device maps (``device_map``),
conversation rules (``prompt``), InternVL's tiling (``tiling``), incremental detokenization (``decoding``) and the
tiny random-weight test checkpoint (``tiny_model``)."""
