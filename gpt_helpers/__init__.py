"""gpt_helpers: the helper library of the course "Fine-tuning GPT models with transfer learning".

One API for every lesson: load a model, prepare data, train, evaluate, plot.
"""

from .architecture import Architecture, architecture
from .config import TrainingConfig
from .data import (
    CleaningReport,
    DataReport,
    LMDataset,
    clean_texts,
    load_course_dataset,
    load_texts,
    prepare_dataset,
    split_texts,
    tokenize_texts,
)
from .errors import CheckpointError, ConfigError, DataError, GPTHelpersError, ModelLoadError, TrainingError
from .evaluation import BitsPerByte, EvalResult, bits_per_byte, compare_generations, evaluate, generate
from .history import History
from .models import (
    BUNDLED,
    DEFAULT_MODEL,
    OFFLINE_MODELS,
    ParameterCount,
    build_model_from_config,
    count_parameters,
    load_model,
    load_tokenizer,
    model_context_length,
)
from .plotting import LivePlot, plot_history
from .training import TrainResult, train

__version__ = "0.2.0"

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "Architecture",
    "BitsPerByte",
    "CheckpointError",
    "CleaningReport",
    "ConfigError",
    "DataError",
    "DataReport",
    "EvalResult",
    "GPTHelpersError",
    "History",
    "LMDataset",
    "LivePlot",
    "ModelLoadError",
    "ParameterCount",
    "TrainResult",
    "TrainingConfig",
    "TrainingError",
    "architecture",
    "bits_per_byte",
    "build_model_from_config",
    "clean_texts",
    "compare_generations",
    "count_parameters",
    "evaluate",
    "generate",
    "load_course_dataset",
    "load_model",
    "load_texts",
    "load_tokenizer",
    "model_context_length",
    "plot_history",
    "prepare_dataset",
    "split_texts",
    "tokenize_texts",
    "train",
]
