"""The measuring ground of the method: a small procedurally rendered world and the models trained on it.

``helpers.world`` is the renderer (``scenes``: scenes, captions, personal subjects, the light a subject shows), which
tests, the evaluation and the trainer share; numpy and PIL only. Beside it, apart from the method's modules:
``world.train`` trains the world profile's models on a GPU (``python -m helpers.world.train``) and
``world.evaluate`` measures them (``python -m helpers.world.evaluate``); ``tests/test_world.py`` holds their gates.
"""
from .scenes import *  # noqa: F401,F403 (the renderer is the package's face: world.render, world.CLASSES, ...)
