"""Several of your own subjects in one SDXL image, without them bleeding into each other.

One module per stage: ``config`` -> ``models`` -> ``data``/``training`` -> ``layout``/``designer`` -> ``pipeline`` ->
``qa`` -> ``evaluation``/``figures``; ``run`` executes the notebook series. Notebooks import what they need from here.
"""
from .config import QA_PASS_THRESHOLD, SUBJECTS, ProjectConfig, Subject, make_config

__all__ = ["QA_PASS_THRESHOLD", "SUBJECTS", "ProjectConfig", "Subject", "make_config"]
__version__ = "0.1.0"
