"""Many photos through both stages: discovery, the worker protocol, the local and Ray engines, the driver.

Only `ray_engine.py` imports Ray (and only when `--engine ray` is asked for); the rest needs the
light env. The batch layer calls `Stage1` / `Stage2` (pipeline/stages.py) through worker processes
and never reaches into the stages' internals. docs/BATCH.md describes the design and protocol.
"""
