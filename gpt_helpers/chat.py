"""Chat transcripts for a causal LM: speaker tags, prompts, replies, and loss on the bot's turns only.

A conversation is plain text with one speaker tag per turn, the format of the course's ``chat_logs``::

    User: What is your name?
    Bot: I am a tiny chatbot.
    User: What can you do?
    Bot: Not much yet.<|endoftext|>

Training teaches the model to continue such text. At chat time the prompt ends with ``"Bot:"`` and the model
writes the reply; the reply ends where the model emits EOS or starts a new speaker line.

Two ways to train on a transcript:

* ``train_on="all"``: every token is a label (plain language modelling). The model also learns to imitate the
  *user*, which costs capacity and makes it likely to keep writing ``User: …`` lines itself.
* ``train_on="bot"``: the user's turns are inputs only (label -100); the loss counts the bot's replies, the
  ``"\\nUser:"`` that hands the turn back after each reply, and the EOS that ends the conversation.

>>> from gpt_helpers.models import load_tokenizer
>>> tokenizer = load_tokenizer("tiny-gpt2-base")
>>> text = format_conversation(["Hi", "Hello!"])
>>> text
'User: Hi\\nBot: Hello!'
>>> data, report = prepare_chat_dataset(tokenizer, [text] * 8, block_size=16, train_on="bot")
>>> 0 < report.trained_fraction < 1
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .data import LMDataset, check_block_settings, pack_blocks, pad_sequences
from .errors import DataError

USER_TAG = "User"
BOT_TAG = "Bot"
TRAIN_ON = ("bot", "all")


# ------------------------------------------------------------------------------------------------ text format
def format_conversation(turns: Sequence[str], *, user_tag: str = USER_TAG, bot_tag: str = BOT_TAG) -> str:
    """Join alternating turns (user first) into a speaker-tagged transcript, one ``Tag: text`` per turn.

    >>> print(format_conversation(["Hi", "Hello!", "Bye"]))
    User: Hi
    Bot: Hello!
    User: Bye
    """
    lines = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise DataError(f"Turn {index} is {type(turn).__name__}, not a string.")
        lines.append(f"{user_tag if index % 2 == 0 else bot_tag}: {turn.strip()}")
    return "\n".join(lines)


def build_prompt(
    history: Sequence[str],
    message: str,
    *,
    tokenizer=None,
    max_tokens: int | None = None,
    user_tag: str = USER_TAG,
    bot_tag: str = BOT_TAG,
) -> str:
    """The text the model continues: earlier turns, the new user message, and ``"Bot:"`` with no trailing space.

    ``history`` holds the earlier turns, alternating user / bot, oldest first. No trailing space after the tag:
    in training the space before a reply is part of the reply's first token (``" Hello"``), so a prompt
    ending in a space would ask the model to continue from a split it never saw.

    With ``tokenizer`` and ``max_tokens``, the oldest exchanges (user turn + bot turn) are dropped until the
    prompt fits, because the model cannot read more than its context length.

    >>> build_prompt(["Hi", "Hello!"], "How are you?")
    'User: Hi\\nBot: Hello!\\nUser: How are you?\\nBot:'
    >>> build_prompt([], "Hi")
    'User: Hi\\nBot:'
    """
    if len(history) % 2:
        raise DataError(
            f"history must alternate user and bot turns and end with a bot turn; it has {len(history)} turns."
        )
    if (tokenizer is None) != (max_tokens is None):
        raise DataError("Pass both tokenizer and max_tokens to fit the prompt into the context, or neither.")
    turns = list(history)
    while True:
        prompt = format_conversation([*turns, message], user_tag=user_tag, bot_tag=bot_tag) + f"\n{bot_tag}:"
        if (
            tokenizer is None
            or len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]) <= max_tokens
        ):
            return prompt
        if not turns:
            raise DataError(f"The message alone is longer than {max_tokens} tokens. Shorten it.")
        turns = turns[2:]


def extract_reply(generated: str, *, tags: Sequence[str] = (USER_TAG, BOT_TAG)) -> str:
    """The bot's reply inside a generated continuation: everything before the first line that starts a new turn.

    >>> extract_reply(" Fine, thanks.\\nUser: Good.\\nBot: Bye")
    'Fine, thanks.'
    >>> extract_reply(" Here:\\nprint(1)")
    'Here:\\nprint(1)'
    """
    pattern = re.compile(rf"^\s*(?:{'|'.join(re.escape(tag) for tag in tags)}):", re.MULTILINE)
    match = pattern.search(generated)
    reply = generated[: match.start()] if match else generated
    return reply.strip()


def bot_reply_spans(text: str, *, user_tag: str = USER_TAG, bot_tag: str = BOT_TAG) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of what the bot should learn to write: each reply and the end of its turn.

    A span starts right after ``"Bot:"`` (so it includes the space that begins the reply). It ends after the
    line break and the ``"User:"`` tag that follow the reply: handing the turn back is part of the bot's job
    (like the end-of-turn token of chat templates), and it is where generation stops. The user's words stay
    outside. The last reply's span ends with the text; the EOS that follows is trained separately.

    >>> text = "User: Hi\\nBot: Hello!\\nUser: Bye\\nBot: Bye."
    >>> [text[a:b] for a, b in bot_reply_spans(text)]
    [' Hello!\\nUser:', ' Bye.']
    """
    tags = list(re.finditer(rf"^(?:{re.escape(user_tag)}|{re.escape(bot_tag)}):", text, re.MULTILINE))
    spans = []
    for index, match in enumerate(tags):
        if not match.group().startswith(bot_tag):
            continue
        if index + 1 == len(tags):
            end = len(text)
        else:
            following = tags[index + 1]
            end = following.end() if following.group().startswith(user_tag) else following.start()
        spans.append((match.end(), end))
    return spans


# ------------------------------------------------------------------------------------------------ labels
def tokenize_conversation(
    tokenizer,
    text: str,
    *,
    train_on: str = "bot",
    add_eos: bool = True,
    user_tag: str = USER_TAG,
    bot_tag: str = BOT_TAG,
) -> tuple[list[int], list[int]]:
    """Token ids of one transcript and its labels: the id where the token is trained, -100 where it is not.

    With ``train_on="bot"`` a token is trained when it *starts* inside a bot reply span (see
    :func:`bot_reply_spans`); the EOS appended after the conversation is always trained.

    >>> from gpt_helpers.models import load_tokenizer
    >>> tok = load_tokenizer("tiny-gpt2-base")
    >>> ids, labels = tokenize_conversation(tok, "User: Hi\\nBot: Hello!")
    >>> tok.decode([i for i, l in zip(ids, labels) if l != -100])
    ' Hello!<|endoftext|>'
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    if train_on == "all":
        labels = list(ids)
    else:
        spans = bot_reply_spans(text, user_tag=user_tag, bot_tag=bot_tag)
        labels = [
            token if any(a <= start < b for a, b in spans) else -100
            for token, (start, _end) in zip(ids, encoded["offset_mapping"])
        ]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise DataError("The tokenizer has no EOS token, so the model cannot learn where a conversation ends.")
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


class ChatDataset(LMDataset):
    """An :class:`~gpt_helpers.data.LMDataset` whose labels are given (some set to -100), not derived from the mask."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor):
        super().__init__(input_ids, attention_mask)
        if labels.shape != input_ids.shape:
            raise DataError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}.")
        self.labels = labels.masked_fill(self.attention_mask == 0, -100)

    @property
    def num_trained_tokens(self) -> int:
        """Labels that count in the loss."""
        return int((self.labels != -100).sum())


@dataclass
class ChatDataReport:
    """What :func:`prepare_chat_dataset` made: conversations, tokens, and how many of them are trained."""

    train_on: str
    mode: str
    conversations: int
    tokens: int
    trained_tokens: int
    block_size: int
    examples: int
    tokens_left_over: int = 0
    rows_truncated: int = 0

    @property
    def trained_fraction(self) -> float:
        """Share of the tokens that are labels (before packing or padding)."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "trained_fraction": self.trained_fraction}

    def __str__(self) -> str:
        text = (
            f"{self.conversations:,} conversations, {self.tokens:,} tokens, {self.trained_tokens:,} trained "
            f"({100 * self.trained_fraction:.1f}%, train_on={self.train_on!r}) -> {self.examples:,} {self.mode}{'ed' if self.mode == 'pack' else 'ded'} "
            f"examples of {self.block_size} tokens"
        )
        if self.mode == "pack":
            return text + f"; {self.tokens_left_over} tokens left over"
        return text + f"; {self.rows_truncated} conversations truncated"


# ------------------------------------------------------------------------------------------------ chat templates
def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (instruction-tuned models such as SmolLM2-Instruct do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def messages_from_turns(turns: Sequence[str], *, system: str | None = None) -> list[dict[str, str]]:
    """Alternating turns (user first) as chat messages, the input of ``tokenizer.apply_chat_template``.

    >>> messages_from_turns(["Hi", "Hello!"])
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    for index, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise DataError(f"Turn {index} is {type(turn).__name__}, not a string.")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": turn.strip()} for i, turn in enumerate(turns)
    ]


def _render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        raise DataError(
            "This tokenizer has no chat template: use the speaker-tag format (chat_format='tags'), or a "
            "chat model such as smollm2-135m-instruct."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the tokenizer's chat template, and the character spans of each assistant reply
    *with* the template's end-of-turn marker (``<|im_end|>`` for SmolLM2): what the model must learn to write.

    Each span is found by rendering the conversation up to the reply with the generation prompt, then with the
    reply: the difference is the reply. A template that does not render conversations incrementally is refused.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                "The chat template does not render a conversation turn by turn, so the assistant's "
                "replies cannot be located; train on every token (train_on='all')."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_with_template(
    tokenizer, turns: Sequence[str], *, train_on: str = "bot", system: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the model's own chat template, labelled on the assistant's replies only
    (``train_on="bot"``) or on every token (``"all"``).

    >>> from gpt_helpers.models import load_tokenizer
    >>> tok = load_tokenizer()
    >>> tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    ...                      "{% if add_generation_prompt %}<assistant>{% endif %}")  # a toy template
    >>> ids, labels = tokenize_with_template(tok, ["Hi", "Hello!"])
    >>> render_labels(tok, ids, labels)
    '«<user>Hi</s><assistant>»Hello!</s>'
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}.")
    text, spans = assistant_spans(tokenizer, messages_from_turns(turns, system=system))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    if train_on == "all":
        return ids, list(ids)
    labels = [
        token if any(a <= start < b for a, b in spans) else -100
        for token, (start, _end) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


CHAT_FORMATS = ("tags", "template")


def prepare_chat_dataset(
    tokenizer,
    conversations: Sequence[str] | Sequence[Sequence[str]],
    *,
    block_size: int = 128,
    train_on: str = "bot",
    mode: str = "pack",
    add_eos: bool = True,
    max_context: int | None = None,
    chat_format: str = "tags",
    system: str | None = None,
    user_tag: str = USER_TAG,
    bot_tag: str = BOT_TAG,
) -> tuple[ChatDataset, ChatDataReport]:
    """Conversations to fixed-length training examples whose labels follow ``train_on`` (``"bot"`` or ``"all"``).

    ``chat_format="tags"``: each conversation is a speaker-tagged transcript (``"User: …\\nBot: …"``), closed by
    EOS. ``chat_format="template"``: each is a list of turns (user first), rendered by the tokenizer's own chat
    template, whose end-of-turn marker ends each reply (no EOS is added). ``mode="pack"`` concatenates the
    conversations and cuts blocks; ``mode="pad"`` keeps one conversation per example, truncated and padded to
    ``block_size``. Evaluate two runs on the *same* labels: a perplexity over bot replies and one over every
    token are different numbers.

    >>> from gpt_helpers.models import load_tokenizer
    >>> data, report = prepare_chat_dataset(load_tokenizer(), ["User: Hi\\nBot: Hello!"] * 10, block_size=8)
    >>> data[0]["labels"].shape
    torch.Size([8])
    """
    check_block_settings(mode, block_size, max_context)
    if chat_format not in CHAT_FORMATS:
        raise DataError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, not {chat_format!r}.")
    if not conversations:
        raise DataError("No conversations to prepare: the list is empty.")
    if chat_format == "template":
        if any(isinstance(c, str) for c in conversations):
            raise DataError(
                "chat_format='template' takes lists of turns (user first), e.g. the 'turns' field of "
                "the chat_logs dataset, not transcripts."
            )
        rows = [tokenize_with_template(tokenizer, turns, train_on=train_on, system=system) for turns in conversations]
    else:
        rows = [
            tokenize_conversation(
                tokenizer, text, train_on=train_on, add_eos=add_eos, user_tag=user_tag, bot_tag=bot_tag
            )
            for text in conversations
        ]
    tokens = sum(len(ids) for ids, _ in rows)
    trained = sum(sum(label != -100 for label in labels) for _, labels in rows)
    common = dict(
        train_on=train_on,
        mode=mode,
        conversations=len(conversations),
        tokens=tokens,
        trained_tokens=trained,
        block_size=block_size,
    )
    if mode == "pack":
        ids, left_over = pack_blocks([ids for ids, _ in rows], block_size)
        labels, _ = pack_blocks([labels for _, labels in rows], block_size)
        if ids.shape[0] == 0:
            raise DataError(
                f"The {len(conversations)} conversations hold {tokens} tokens, fewer than one block of {block_size}."
            )
        dataset = ChatDataset(ids, None, labels)
        return dataset, ChatDataReport(examples=len(dataset), tokens_left_over=left_over, **common)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, truncated = pad_sequences([ids for ids, _ in rows], block_size, pad)
    labels, _, _ = pad_sequences([labels for _, labels in rows], block_size, -100)
    dataset = ChatDataset(ids, mask, labels)
    return dataset, ChatDataReport(examples=len(dataset), rows_truncated=truncated, **common)


# ------------------------------------------------------------------------------------------------ replying
def chat_prompt(
    tokenizer,
    history: Sequence[str],
    message: str,
    *,
    chat_format: str = "tags",
    system: str | None = None,
    max_tokens: int | None = None,
) -> str:
    """The text a model continues to answer ``message`` after ``history`` (earlier turns, user first).

    Template format: the tokenizer's chat template with its generation prompt; tags format: :func:`build_prompt`.
    With ``max_tokens`` the oldest exchanges are dropped until the prompt fits.
    """
    if len(history) % 2:
        raise DataError(
            f"history must alternate user and bot turns and end with a bot turn; it has {len(history)} turns."
        )
    if chat_format == "tags":
        return build_prompt(history, message, tokenizer=tokenizer if max_tokens else None, max_tokens=max_tokens)
    turns = list(history)
    while True:
        prompt = _render(tokenizer, messages_from_turns([*turns, message], system=system), generation_prompt=True)
        if (
            max_tokens is None
            or len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]) <= max_tokens
        ):
            return prompt
        if not turns:
            raise DataError(f"The message alone is longer than {max_tokens} tokens. Shorten it.")
        turns = turns[2:]


def reply(
    model,
    tokenizer,
    history: Sequence[str],
    message: str,
    *,
    chat_format: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 60,
    **generate_options,
) -> str:
    """The model's answer to ``message`` after ``history``, in its own chat template when it has one
    (``chat_format=None``), else in the course's speaker tags. Generation stops at the end of the turn.

    >>> from gpt_helpers.models import load_model
    >>> model, tok = load_model()
    >>> isinstance(reply(model, tok, [], "Hi", max_new_tokens=5), str)
    True
    """
    from .evaluation import generate
    from .models import model_context_length

    chat_format = chat_format or ("template" if has_chat_template(tokenizer) else "tags")
    context = model_context_length(model)
    prompt = chat_prompt(
        tokenizer,
        history,
        message,
        chat_format=chat_format,
        system=system,
        max_tokens=context - max_new_tokens if context else None,
    )
    text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **generate_options)[0]
    return extract_reply(text) if chat_format == "tags" else text.strip()


def render_labels(
    tokenizer,
    input_ids: Sequence[int] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    open_mark: str = "«",
    close_mark: str = "»",
) -> str:
    """The decoded text with every run of *untrained* tokens (label -100) wrapped in ``«…»``: see what the loss sees.

    >>> from gpt_helpers.models import load_tokenizer
    >>> tok = load_tokenizer()
    >>> ids, labels = tokenize_conversation(tok, "User: Hi\\nBot: Hello!")
    >>> render_labels(tok, ids, labels)
    '«User: Hi\\nBot:» Hello!<|endoftext|>'
    """
    ids = [int(i) for i in input_ids]
    flags = [int(label) != -100 for label in labels]
    if len(ids) != len(flags):
        raise DataError(f"{len(ids)} ids but {len(flags)} labels.")
    pieces, start = [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and flags[end] == flags[start]:
            end += 1
        text = tokenizer.decode(ids[start:end])
        pieces.append(text if flags[start] else f"{open_mark}{text}{close_mark}")
        start = end
    return "".join(pieces)
