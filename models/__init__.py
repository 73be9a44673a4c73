"""Face models shared by the edge agent and the enrollment server.

Nothing heavy happens at import: models are loaded by the classes that use them, and optional runtimes
(tensorrt, pycuda, torch) are imported only inside the modules that need them.
"""

__version__ = "0.1.0"
