"""Calibration text the model writes itself: needs no data, works offline.

Each sample starts from a token drawn at random from the vocabulary (seeded), then the
model samples the rest (top-k 50). Data-free calibration in the manner of LLM-QAT.
"""

from __future__ import annotations

import torch

from qframe import DatasetPlugin, hookimpl
from qframe.errors import DataError


def generate(location: str, params: dict, context) -> list[str]:
    model, tokenizer = context.model, context.tokenizer
    if model is None:
        raise DataError("dataset 'generated' needs the model itself; it cannot be used here")
    generator = torch.Generator().manual_seed(context.seed)
    vocab = len(tokenizer)
    first = torch.randint(0, min(vocab, model.config.vocab_size), (context.samples, 1), generator=generator)
    torch.manual_seed(context.seed)
    device = torch.device(context.device)
    if device.type == "meta":  # a meta tensor holds no numbers to sample from
        raise DataError(f"dataset 'generated' samples text from the model, which cannot run on device {device.type!r}; "
                        "choose cpu or cuda")
    texts: list[str] = []
    was = model.device
    model.to(device)
    try:
        with torch.inference_mode():
            for batch in first.split(32):
                out = model.generate(
                    batch.to(device), attention_mask=torch.ones_like(batch, device=device),
                    do_sample=True, top_k=50, max_new_tokens=context.seq_len, min_new_tokens=context.seq_len,
                    use_cache=True, pad_token_id=tokenizer.eos_token_id,
                    remove_invalid_values=True,  # a model that overflows still writes text; the pipeline names the layer
                )
                texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    except (TypeError, ValueError, OverflowError) as exc:  # our arguments are sound: the model's config is not
        raise DataError(f"dataset 'generated': the model cannot sample text ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); check its generation_config.json and config.json, "
                        "or calibrate on text: or jsonl: data") from None
    finally:
        model.to(was)
    return texts


@hookimpl
def qframe_datasets():
    yield DatasetPlugin(name="generated", summary="text sampled from the model itself (offline, data-free)",
                        factory=generate, needs_model=True)
