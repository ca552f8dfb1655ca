"""Every test and doctest runs offline, headless and single-threaded (set before transformers is imported)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before anything imports transformers / huggingface_hub (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# An empty hub cache: a model a learner happens to have cached must not make the "offline hub name" test pass.
_HUB_CACHE = tempfile.mkdtemp(prefix="gpt-helpers-test-hub-")
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
atexit.register(shutil.rmtree, _HUB_CACHE, True)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

collect_ignore = ["gpt_helpers/__main__.py"]
