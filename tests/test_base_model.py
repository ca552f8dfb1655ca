"""The shipped base model: loadable offline by short name and by plain transformers, consistent, and a real head start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import gpt_helpers as gh
from gpt_helpers.models import BUNDLED

FOLDER = BUNDLED["tiny-gpt2-base"]


def test_loads_by_short_name_from_any_working_directory(tmp_path):
    code = "import gpt_helpers as gh; m, t = gh.load_model('tiny-gpt2-base'); print(m.config.n_positions, len(t))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["256", "8192"]


def test_files_are_consistent_and_loadable_without_course_code():
    config = json.loads((FOLDER / "config.json").read_text())
    with safe_open(str(FOLDER / "model.safetensors"), framework="pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    assert shapes["transformer.wte.weight"] == [config["vocab_size"], config["n_embd"]]
    assert shapes["transformer.wpe.weight"] == [config["n_positions"], config["n_embd"]]
    assert sum(name.endswith("attn.c_attn.weight") for name in shapes) == config["n_layer"]
    assert (FOLDER / "model.safetensors").stat().st_size < 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(FOLDER)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == config["vocab_size"]
    parameters = gh.count_parameters(model).total
    assert 1_500_000 < parameters < 3_000_000


def test_tokenizer_round_trips_text():
    tokenizer = gh.load_tokenizer("tiny-gpt2-base")
    for text in ["Call me Ishmael.", "  Spaces, tabs\tand newlines\n\nsurvive — ünïcödé too ✓", "x = [1, 2]  # code"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_model_card_reports_measured_numbers():
    card = (FOLDER / "README.md").read_text()
    for needed in (
        "zero-shot",
        "from scratch",
        "Held-out perplexity",
        "public domain",
        "drug_reviews",
        "chat_logs",
        "python_docs",
    ):
        assert needed in card


def test_base_model_has_not_memorised_the_course_datasets():
    model, tokenizer = gh.load_model("tiny-gpt2-base")
    texts = gh.load_course_dataset("python_docs", "validation")[:20]
    data, _ = gh.prepare_dataset(tokenizer, texts, block_size=128)
    assert gh.evaluate(model, data).perplexity > 20  # a memorised text would score close to 1


def test_short_fine_tune_beats_the_same_budget_from_scratch():
    results = {}
    for name, random_init in (("pretrained", False), ("scratch", True)):
        model, tokenizer = gh.load_model("tiny-gpt2-base", random_init=random_init, seed=0)
        train_texts, _ = gh.clean_texts(gh.load_course_dataset("drug_reviews", "train")[:300])
        eval_texts, _ = gh.clean_texts(gh.load_course_dataset("drug_reviews", "validation")[:60])
        train_data, _ = gh.prepare_dataset(tokenizer, train_texts, block_size=64)
        eval_data, _ = gh.prepare_dataset(tokenizer, eval_texts, block_size=64)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as out:
            config = gh.TrainingConfig(
                output_dir=out,
                max_steps=30,
                batch_size=8,
                learning_rate=1e-3,
                warmup_steps=3,
                eval_every=30,
                eval_batches=None,
                progress=False,
                plot=False,
                save_best=False,
                save_final=False,
            )
            results[name] = gh.train(model, tokenizer, train_data, eval_data, config).history.best.eval_perplexity
    assert results["pretrained"] < 0.7 * results["scratch"], results
