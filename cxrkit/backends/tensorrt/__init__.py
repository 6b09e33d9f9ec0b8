"""The TensorRT backend: engine building (build.py), the engine cache (cache.py), the runner (runner.py).

Nothing here imports tensorrt at import time; ``cache`` is pure Python and tested on any machine.
"""
