"""sam3d-gs: photo -> plan -> masks -> 3D objects -> scene -> report.

Importing this package must stay cheap: no torch, vllm, sam3 or sam3d_objects here
(tests/test_package_imports.py checks it in a subprocess). Heavy imports live inside
the backend modules that need them.
"""

__version__ = "0.1.0"
