"""Dataset specs to token windows: N samples of L tokens, seeded and hashed.

A spec is ``SOURCE:LOCATION?key=value&key=value``; ``SOURCE`` names a dataset plugin.
Built-ins: ``text:FILE_OR_DIR``, ``jsonl:FILE?field=text``, ``hf:NAME?config=..&split=..&field=..``
and ``generated`` (text the model writes itself; needs nothing offline).

Example::

    >>> parse_spec("jsonl:data/chat.jsonl?field=content", registry)   # doctest: +SKIP
    DatasetSpec(source='jsonl', location='data/chat.jsonl', params={'field': 'content'})
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl

import torch

from .errors import PATH_LIMIT, DataError, RecipeError, shorten

# Sane bounds on how much text is windowed: each count alone, and the tokens of all windows
# (2**28 int64 ids are 2 GiB before a single activation is captured).
MAX_SAMPLES = 1 << 20
MAX_SEQ_LEN = 1 << 20
MAX_TOKENS = 1 << 28


def check_window_sizes(samples: int | None, seq_len: int, samples_key: str = "samples",
                       seq_len_key: str = "seq_len") -> None:
    """Refuse window counts beyond ``MAX_SAMPLES``, ``MAX_SEQ_LEN`` and ``MAX_TOKENS`` (their
    product), with a :class:`RecipeError` naming the key (``samples=None``: as many as the
    text holds, bounded by the text).

    Example::

        >>> check_window_sizes(10**6, 1024, "calibration.samples", "calibration.seq_len")
        Traceback (most recent call last):
        ...
        qframe.errors.RecipeError: calibration.samples: 1000000 is not valid; calibration.samples × calibration.seq_len = 1024000000 tokens, more than 268435456 (2**28); take fewer or shorter windows
    """
    for key, value, most in ((samples_key, samples, MAX_SAMPLES), (seq_len_key, seq_len, MAX_SEQ_LEN)):
        if value is not None and value > most:
            raise RecipeError(key, value, f"expected at most {most} (2**{most.bit_length() - 1})")
    if samples is not None and samples * seq_len > MAX_TOKENS:
        raise RecipeError(samples_key, samples, f"{samples_key} × {seq_len_key} = {samples * seq_len} tokens, "
                          f"more than {MAX_TOKENS} (2**{MAX_TOKENS.bit_length() - 1}); take fewer or shorter windows")


@dataclass(frozen=True)
class DatasetSpec:
    source: str
    location: str
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass
class DataContext:
    """What a dataset plugin may use: the tokenizer, the model (for ``generated``), and
    how much text is wanted."""

    tokenizer: Any
    model: Any = None
    seed: int = 0
    samples: int = 128
    seq_len: int = 512
    device: str = "cpu"


@dataclass(frozen=True)
class TokenWindows:
    """``ids`` is ``[samples, seq_len]``; ``sha256`` identifies exactly these tokens."""

    ids: torch.Tensor
    sha256: str
    spec: str

    def batches(self, batch_size: int):
        return self.ids.split(batch_size)


def parse_spec(spec: str, registry) -> DatasetSpec:
    """Split a spec and check its source and parameters exist (raises RecipeError)."""
    if not isinstance(spec, str) or not spec:
        raise RecipeError("dataset", spec, "expected a spec such as text:corpus.txt or generated")
    head, sep, rest = spec.partition(":")
    if not sep:
        head, rest = spec.partition("?")[0], spec.partition("?")[1] + spec.partition("?")[2]
    location, _, query = rest.partition("?")
    names = registry.names("dataset")
    if head not in names:
        raise RecipeError("dataset", spec, f"unknown source {head!r}; installed: {', '.join(names)}")
    record = registry.get("dataset", head)
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise RecipeError("dataset", spec, "parameters after '?' are key=value pairs joined by '&'") from None
    for key in params:
        if key not in record.params:
            allowed = ", ".join(record.params) or "none"
            raise RecipeError("dataset", spec, f"source {head!r} takes no parameter {key!r}; allowed: {allowed}")
    return DatasetSpec(head, location, params)


def _tokens(spec: str, context: DataContext, registry) -> torch.Tensor:
    check_window_sizes(context.samples, context.seq_len)  # a DataContext built by hand is bounded too
    parsed = parse_spec(spec, registry)
    documents = registry.get("dataset", parsed.source).factory(parsed.location, dict(parsed.params), context)
    tokenizer = context.tokenizer
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for number, text in enumerate(documents, 1):
        if not isinstance(text, str):  # a plugin's mistake, or an hf: column of numbers
            raise DataError(f"dataset {shorten(spec, PATH_LIMIT)}: document {number} is {shorten(text)}, not text")
        if text and text.strip():
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.extend(separator)
    if not ids:
        raise DataError(f"dataset {shorten(spec, PATH_LIMIT)} holds no text")
    return torch.tensor(ids, dtype=torch.long)


def _hashed(ids: torch.Tensor, spec: str) -> TokenWindows:
    digest = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()
    return TokenWindows(ids, digest, spec)


def calibration_windows(spec: str, context: DataContext, registry) -> TokenWindows:
    """``context.samples`` windows of ``context.seq_len`` tokens at seeded random offsets."""
    stream = _tokens(spec, context, registry)
    n, length = context.samples, context.seq_len
    if stream.numel() < length:
        raise DataError(
            f"dataset {shorten(spec, PATH_LIMIT)} has {stream.numel()} tokens, fewer than one window of "
            f"seq_len={length}; give more text or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(context.seed)
    starts = torch.randint(0, stream.numel() - length + 1, (n,), generator=generator)
    windows = stream[starts.unsqueeze(1) + torch.arange(length)]
    return _hashed(windows, spec)


def evaluation_windows(spec: str, context: DataContext, registry, samples: int | None = None) -> TokenWindows:
    """Consecutive, non-overlapping windows from the start of the text (at most ``samples``)."""
    stream = _tokens(spec, context, registry)
    length = context.seq_len
    count = stream.numel() // length
    if samples is not None:
        count = min(count, samples)
    if count == 0:
        raise DataError(f"dataset {shorten(spec, PATH_LIMIT)} has {stream.numel()} tokens, fewer than one window "
                        f"of {length}")
    return _hashed(stream[: count * length].reshape(count, length), spec)
