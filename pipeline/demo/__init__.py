"""The demo scene: a synthetic photo with ground-truth masks and 3D positions, rendered by our own code."""

from pipeline.demo.scene import DemoObject, DemoScene, demo_scene_dir, make_demo_scene

__all__ = ["DemoObject", "DemoScene", "demo_scene_dir", "make_demo_scene"]
