"""Several of your own subjects in one SDXL image, without them bleeding into each other.

Stage order (a module imports only from modules before it; ``tests/test_structure.py`` checks it):

    config -> prompts -> io -> world -> profiles -> models -> notebook -> data -> adapters -> layout -> measures
    -> designer -> training -> pipeline -> scoring -> qa -> evaluation -> figures -> run -> world.train
    -> world.evaluate

``config`` is plain data; ``prompts`` derives every prompt of a run from the one scene prompt; ``io`` writes files
atomically; ``world`` renders the offline world; ``profiles`` says where each profile's weights come from and
``models`` loads them into one bundle of pipelines with the NaN-guarded decode; ``notebook`` builds the config a
notebook runs with; ``data`` reads subject photos; ``adapters`` switches subject LoRAs and owns the one
text-to-image call; ``layout`` (+ ``designer``, its ipywidgets UI) says where each subject goes; ``measures`` says
where a claim is measured (a subject's own pixels) and judges class presence, ghosts and split-world; ``training``
makes the LoRAs; ``pipeline`` runs coarse-to-fine; ``scoring`` turns pictures into numbers; ``qa`` refines failing
subjects; ``evaluation`` compares methods; ``figures`` plots and writes the report; ``run`` executes the notebooks
and the full evaluation. The world is a subpackage of its own, apart from the method: its renderer ``world`` sits
early in the order, ``world.train`` trains the world's models on a GPU and ``world.evaluate`` measures them.

Notebooks use one alias per module across the series: ``hn`` notebook, ``hd`` data, ``hm`` models, ``ha`` adapters,
``hl`` layout, ``hld`` designer, ``ht`` training, ``hp`` pipeline, ``hs`` scoring, ``hq`` qa, ``he`` evaluation,
``hf`` figures, ``hio`` io, ``hpr`` prompts, ``hme`` measures.
"""
from .config import QA_PASS_THRESHOLD, SUBJECTS, ProjectConfig, Subject

__all__ = ["QA_PASS_THRESHOLD", "SUBJECTS", "ProjectConfig", "Subject"]
__version__ = "0.1.0"
