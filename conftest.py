"""Root conftest: every test run (pytest and nbval's notebook kernels) writes into a throwaway output folder, never
into the user's output/."""
import os
import tempfile

os.environ.setdefault("HELPERS_OUTPUT_DIR", tempfile.mkdtemp(prefix="helpers-test-output-"))
os.environ.setdefault("HELPERS_PROFILE", "tiny")  # CI machines may have a GPU; the tests always run the offline twin
os.environ.setdefault("MPLBACKEND", "Agg")
