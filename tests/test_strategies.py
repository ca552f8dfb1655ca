"""Transfer-learning strategies on GPT-2 and two other architectures: what trains, at which rate, and when."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

import gpt_helpers as gh
from gpt_helpers import ConfigError, TrainingConfig, build_model_from_config, count_parameters, train
from gpt_helpers.experiments import compare_strategies, data_efficiency_sweep, ranking_text, subset, summarize
from gpt_helpers.models import tiny_gpt2_config
from gpt_helpers.strategies import (
    STRATEGIES,
    GradualUnfreezing,
    apply_lora,
    discriminative_param_groups,
    freeze,
    from_scratch,
    head_is_tied,
    merge_lora,
    model_levels,
    save_merged,
    set_dropout,
    transformer_blocks,
)


def gpt2(layers: int = 4):
    return build_model_from_config(tiny_gpt2_config(vocab_size=gh.load_tokenizer().vocab_size, n_layer=layers))


def neox():
    return build_model_from_config(
        GPTNeoXConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def llama():
    return build_model_from_config(
        LlamaConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


@pytest.fixture(scope="module")
def tokenizer():
    return gh.load_tokenizer("tiny-gpt2-base")


@pytest.fixture(scope="module")
def reviews(tokenizer):
    train_data, _ = gh.prepare_dataset(tokenizer, gh.load_course_dataset("drug_reviews", "train")[:300], block_size=32)
    eval_data, _ = gh.prepare_dataset(
        tokenizer, gh.load_course_dataset("drug_reviews", "validation")[:40], block_size=32
    )
    return train_data, eval_data


def quick_config(tmp_path, **changes) -> TrainingConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        batch_size=4,
        eval_every=2,
        eval_batches=2,
        log_every=1,
        warmup_steps=0,
        lr_schedule="constant",
        save_best=False,
        save_final=False,
        plot=False,
        progress=False,
    )
    return TrainingConfig(**{**settings, **changes})


# ------------------------------------------------------------------------------------------ levels and freezing
@pytest.mark.parametrize("make, blocks, tied", [(gpt2, 4, True), (neox, 2, False), (llama, 2, False)])
def test_levels_cover_every_parameter_once(make, blocks, tied):
    model = make()
    levels = model_levels(model)
    assert [name for name, _ in levels] == ["embeddings"] + [f"block {i}" for i in range(blocks)] + ["head"]
    assert len(transformer_blocks(model)) == blocks and head_is_tied(model) is tied
    ids = [id(p) for _, params in levels for p in params]
    assert len(ids) == len(set(ids))
    assert sum(p.numel() for _, params in levels for p in params) == count_parameters(model).total


def test_freeze_gpt2_counts(caplog):
    model = gpt2()
    total = count_parameters(model).total
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    block = count_parameters(model.transformer.h[0]).total
    final_norm = count_parameters(model.transformer.ln_f).total
    assert freeze(model, embeddings=True).trainable == total - embeddings
    assert freeze(model, lower_blocks=2).trainable == total - 2 * block  # freeze() starts from all-trainable again
    assert freeze(model, keep_last_blocks=1).trainable == block + final_norm
    assert not model.transformer.wte.weight.requires_grad  # the tied head stays frozen with the embeddings
    with caplog.at_level(logging.WARNING, logger="gpt_helpers.strategies"):
        head = freeze(model, all_but_head=True)
    assert head.trainable == model.lm_head.weight.numel() + final_norm  # the head *is* wte: it trains
    assert "tied" in caplog.text


def test_freeze_untied_head_trains_only_the_head():
    model = neox()
    counts = freeze(model, all_but_head=True)
    base = model.gpt_neox
    head = model.get_output_embeddings().weight.numel()  # lm_head (embed_out in early transformers 5 releases)
    assert counts.trainable == head + count_parameters(base.final_layer_norm).total
    assert not base.embed_in.weight.requires_grad


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(all_but_head=True, lower_blocks=1), "all_but_head"),
        (dict(lower_blocks=5), "between 0 and 4"),
        (dict(keep_last_blocks=0), "between 1 and 4"),
        (dict(keep_last_blocks=1, lower_blocks=1), "either"),
    ],
)
def test_freeze_refuses_contradictions(options, message):
    with pytest.raises(ConfigError, match=message):
        freeze(gpt2(), **options)


def test_frozen_parameters_do_not_change_during_training(tmp_path, tokenizer, reviews):
    model = gpt2()
    freeze(model, embeddings=True, lower_blocks=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, tokenizer, reviews[0], None, quick_config(tmp_path, weight_decay=0.1))
    for name, parameter in model.named_parameters():
        unchanged = torch.equal(before[name], parameter)
        frozen = name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1."))
        assert unchanged == frozen, name


# ------------------------------------------------------------------------------------------ learning rates
def test_discriminative_learning_rates_are_the_ones_adam_uses(tmp_path, tokenizer, reviews):
    model = gpt2(layers=3)
    groups = discriminative_param_groups(model, 1e-3, decay=2.6, weight_decay=0.0)
    expected = {
        "embeddings": 1e-3 / 2.6**3,
        "block 0": 1e-3 / 2.6**2,
        "block 1": 1e-3 / 2.6,
        "block 2": 1e-3,
        "head": 1e-3,
    }
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(expected)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    train(
        model,
        tokenizer,
        reviews[0],
        None,
        quick_config(tmp_path, max_steps=1, max_grad_norm=None, weight_decay=0.0),
        param_groups=groups,
    )
    # Adam's first step moves every weight with a gradient by almost exactly its learning rate
    for group in groups:
        steps = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in group["params"]])
        assert steps[steps > 0].median().item() == pytest.approx(expected[group["name"]], rel=0.02), group["name"]


def test_gradual_unfreezing_unfreezes_one_level_every_n_steps(tmp_path, tokenizer, reviews):
    model = gpt2(layers=3)
    schedule = GradualUnfreezing(model, every_steps=2)
    assert count_parameters(model).trainable == (
        count_parameters(model.transformer.h[2]).total + count_parameters(model.transformer.ln_f).total
    )
    snapshots = []

    class Snapshot:
        def on_step_end(self, state):
            snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})

    result = train(
        model, tokenizer, reviews[0], None, quick_config(tmp_path, max_steps=8), callbacks=[schedule, Snapshot()]
    )
    expected = {"head": 0, "block 2": 0, "block 1": 2, "block 0": 4, "embeddings": 6}
    assert result.history.info["gradual_unfreezing"]["unfrozen_at_step"] == expected
    first_change = {}
    for step in range(1, len(snapshots)):
        for name, tensor in snapshots[step].items():
            if name not in first_change and not torch.equal(tensor, snapshots[step - 1][name]):
                first_change[name] = step + 1  # snapshots[i] was taken after step i + 1
    assert first_change["transformer.h.1.attn.c_attn.weight"] == 3  # unfrozen after step 2, trains in step 3
    assert first_change["transformer.h.0.attn.c_attn.weight"] == 5
    assert first_change["transformer.wte.weight"] == 7
    assert count_parameters(model).trainable == count_parameters(model).total


def test_gradual_unfreezing_restores_its_stage_when_a_run_resumes():
    model = gpt2(layers=3)
    schedule = GradualUnfreezing(model, every_steps=2)
    schedule.on_train_begin(SimpleNamespace(step=5))  # a run resumed after step 5
    assert schedule.unfrozen_at == {"head": 0, "block 2": 0, "block 1": 2, "block 0": 4}
    assert not model.transformer.wte.weight.requires_grad and model.transformer.h[0].mlp.c_fc.weight.requires_grad
    with pytest.raises(ConfigError, match="every_steps"):
        GradualUnfreezing(model, every_steps=0)


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_merge_and_save_give_the_adapter_models_logits(tmp_path, tokenizer):
    model = gpt2()
    lora = apply_lora(model, r=4, alpha=8)
    # 4 blocks × r × (fan_in + fan_out) of the attention's c_attn (32→96) and c_proj (32→32)
    assert count_parameters(lora).trainable == 4 * 4 * ((32 + 96) + (32 + 32))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # B starts at zero; make the adapters matter
    lora.eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        with lora.disable_adapter():
            assert not torch.allclose(lora(input_ids=ids).logits, expected, atol=1e-3)
    folder = save_merged(lora, tokenizer, tmp_path / "merged")
    assert not (folder / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    gh.load_model(str(folder))  # the course's loader accepts it too


# NeoX: query_key_value 32→96 and dense 32→32; Llama: q, k, v and o, each 32→32
@pytest.mark.parametrize("make, per_block", [(neox, 4 * ((32 + 96) + (32 + 32))), (llama, 4 * 4 * (32 + 32))])
def test_lora_on_other_architectures(make, per_block):
    model = make()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    lora = apply_lora(model, r=4)
    assert count_parameters(lora).trainable == 2 * per_block
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
        lora.eval()
        expected = lora(input_ids=ids).logits
        merged = merge_lora(lora)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("targets", [{"target_modules": ["c_attn", "c_proj"]}, {"include_mlp": True}])
def test_lora_on_gpt2_attention_and_mlp_projections(targets):
    lora = apply_lora(gpt2(layers=2), r=2, **targets)
    # c_attn 32→96, attention c_proj 32→32, MLP c_proj 128→32, in each of 2 blocks (and c_fc 32→128 with the MLP)
    mlp_in = (32 + 128) if "include_mlp" in targets else 0
    assert count_parameters(lora).trainable == 2 * 2 * ((32 + 96) + (32 + 32) + (128 + 32) + mlp_in)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(lora)
    with pytest.raises(ConfigError, match="base is already frozen"):
        freeze(lora, lower_blocks=1)
    with pytest.raises(ConfigError, match="No module"):
        apply_lora(gpt2(), target_modules=["q_proj"])


# ------------------------------------------------------------------------------------------ dropout and scratch
@pytest.mark.parametrize("make", [gpt2, llama])
def test_set_dropout_changes_every_dropout(make):
    model = make().train()
    ids = torch.randint(0, 512, (2, 16))
    assert set_dropout(model, 0.0) > 0
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    set_dropout(model, 0.5)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="dropout"):
        set_dropout(model, 1.5)


def test_from_scratch_is_the_same_architecture_with_new_weights():
    model = gpt2()
    scratch = from_scratch(model, seed=3)
    assert scratch.config.to_dict() == model.config.to_dict()
    assert count_parameters(scratch) == count_parameters(model)
    assert not torch.equal(scratch.transformer.wte.weight, model.transformer.wte.weight)
    assert torch.equal(from_scratch(model, seed=3).transformer.wte.weight, scratch.transformer.wte.weight)


# ------------------------------------------------------------------------------------------ comparisons
def test_compare_strategies_on_the_bundled_model(tmp_path, reviews):
    strategies = ["full", "frozen_body", "discriminative", "lora", "from_scratch"]
    rows, histories = compare_strategies(
        "tiny-gpt2-base", strategies, reviews[0], reviews[1], quick_config(tmp_path), learning_rates={"lora": 2e-3}
    )
    table = {row["strategy"]: row for row in rows}
    assert list(table) == strategies and set(histories) == set(strategies)
    total = table["full"]["total_parameters"]
    assert table["full"]["trainable_parameters"] == total == table["from_scratch"]["trainable_parameters"]
    assert table["lora"]["trainable_parameters"] < table["frozen_body"]["trainable_parameters"] < total
    for row in rows:
        assert row["steps"] == 4 and row["best_perplexity"] > 1 and row["tokens_per_second"] > 0
        assert row["peak_memory_mb"] > 0 and row["wall_seconds"] > 0
        assert (tmp_path / "run" / row["strategy"] / "history.json").exists()
    assert table["lora"]["peak_memory_mb"] < table["full"]["peak_memory_mb"]
    assert histories["lora"].info["config"]["learning_rate"] == 2e-3
    with pytest.raises(ConfigError, match="Unknown strategy"):
        compare_strategies("tiny-gpt2-base", ["everything"], reviews[0], reviews[1], quick_config(tmp_path))


def test_every_run_starts_from_the_untouched_pretrained_weights_read_once(tmp_path, reviews, monkeypatch):
    """The weights are read from disk once per comparison and copied for each run: a run never starts from the
    weights an earlier run trained (seed 0 gives the same result first or after seed 1)."""
    import gpt_helpers.experiments as experiments

    loads = []
    original = experiments.load_model
    monkeypatch.setattr(experiments, "load_model", lambda *a, **k: loads.append(k) or original(*a, **k))
    config = quick_config(tmp_path, max_steps=2)
    after, _ = compare_strategies("tiny-gpt2-base", ["full"], reviews[0], reviews[1], config, seeds=[1, 0])
    assert len(loads) == 1
    alone, _ = compare_strategies(
        "tiny-gpt2-base", ["full"], reviews[0], reviews[1], config, seeds=[0], measure_memory=False
    )
    assert after[1]["seed"] == alone[0]["seed"] == 0
    assert after[1]["best_eval_loss"] == alone[0]["best_eval_loss"]


def test_data_efficiency_sweep_trains_pretrained_and_scratch_on_nested_fractions(tmp_path, reviews):
    part = subset(reviews[0], 0.5, seed=0)
    assert len(part) == round(len(reviews[0]) / 2)
    assert set(map(tuple, subset(reviews[0], 0.25).input_ids.tolist())) <= set(map(tuple, part.input_ids.tolist()))
    rows, histories = data_efficiency_sweep(
        "tiny-gpt2-base", [0.5, 0.1], reviews[0], reviews[1], quick_config(tmp_path, max_steps=2)
    )
    assert [(row["fraction"], row["strategy"]) for row in rows] == [
        (0.1, "full"),
        (0.1, "from_scratch"),
        (0.5, "full"),
        (0.5, "from_scratch"),
    ]
    assert rows[0]["train_examples"] == round(0.1 * len(reviews[0]))
    assert set(histories) == {"0.1/full", "0.1/from_scratch", "0.5/full", "0.5/from_scratch"}
    assert all(row["peak_memory_mb"] is None and row["best_perplexity"] > 1 for row in rows)


def test_every_strategy_runs_on_a_llama_model_built_locally(tmp_path, reviews):
    """Grouped-query attention, gated MLP, RMSNorm, untied head: the architecture of SmolLM2, in miniature."""
    tokenizer = gh.load_tokenizer("tiny-gpt2-base")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "tiny-llama"
    build_model_from_config(config, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows, histories = compare_strategies(
        str(folder), list(STRATEGIES), reviews[0], reviews[1], quick_config(tmp_path, max_steps=4), measure_memory=False
    )
    table = {row["strategy"]: row for row in rows}
    assert list(table) == list(STRATEGIES)
    total = table["full"]["total_parameters"]
    assert table["lora"]["trainable_parameters"] < table["lora_mlp"]["trainable_parameters"] < total
    assert table["frozen_body"]["trainable_parameters"] == table["top_quarter"]["trainable_parameters"] < total
    assert table["head_only"]["trainable_parameters"] < table["freeze_lower_half"]["trainable_parameters"] < total
    assert table["gradual_unfreezing"]["trainable_parameters"] == total  # every level thawed by the end
    assert all(row["steps"] == 4 and math.isfinite(row["best_eval_loss"]) for row in rows)


def test_several_seeds_give_a_mean_and_spread_and_an_honest_ranking(tmp_path, reviews):
    rows, histories = compare_strategies(
        "tiny-gpt2-base",
        ["full", "lora"],
        reviews[0],
        reviews[1],
        quick_config(tmp_path, max_steps=3),
        seeds=[0, 1, 2],
        measure_memory=False,
        learning_rates={"lora": 2e-3},
    )
    assert [(row["strategy"], row["seed"]) for row in rows] == [
        ("full", 0),
        ("full", 1),
        ("full", 2),
        ("lora", 0),
        ("lora", 1),
        ("lora", 2),
    ]
    assert set(histories) == {f"{s}/seed-{n}" for s in ("full", "lora") for n in range(3)}
    full = [row["best_eval_loss"] for row in rows if row["strategy"] == "full"]
    assert len(set(full)) == 3, "the seeds change the data order, so the runs differ"
    table = summarize(rows)
    by_name = {row["strategy"]: row for row in table}
    assert by_name["full"]["runs"] == 3 and by_name["full"]["trainable_parameters"] == rows[0]["trainable_parameters"]
    assert by_name["full"]["best_eval_loss_mean"] == pytest.approx(sum(full) / 3)
    assert by_name["full"]["best_eval_loss_min"] == min(full) and by_name["full"]["best_eval_loss_std"] > 0
    text = ranking_text(table)
    assert text.startswith("1. ") and "3 runs" in text and ("within noise" in text or "in every run" in text)


def test_ranking_puts_the_highest_first_when_higher_is_better():
    def group(name, values):
        return summarize([{"strategy": name, "f1": v} for v in values], keys=["f1"])[0]

    table = [group("low", [0.40, 0.42, 0.41]), group("high", [0.60, 0.62, 0.61]), group("close", [0.59, 0.63, 0.58])]
    lines = ranking_text(table, key="f1", higher_is_better=True).splitlines()
    assert [line.split(":")[0] for line in lines] == ["1. high", "2. close", "3. low"]
    assert "within noise of high" in lines[1] and "worse than close in every run" in lines[2]
