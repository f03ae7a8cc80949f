"""Batched greedy generation of answers, shared by training's periodic eval, evaluate and predict."""

from __future__ import annotations

import torch

from vlmtune.data.collate import collate


def stop_token_ids(tokenizer) -> list[int]:
    """Stop at `<|end|>` (what fine-tuning teaches) or at the end-of-text token."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.append(end)
    return ids


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict], max_new_tokens: int, device: torch.device,
                     synced_gpus: bool = False) -> list[str]:
    """`samples` are `SampleEncoder(with_answer=False)` outputs; returns the decoded answers in order.

    Left padding keeps every prompt's last token at the same position, which batched generation needs.
    `synced_gpus` keeps all ranks stepping together until every rank is done (required under ZeRO-3,
    where each forward pass gathers parameters from all ranks).

    Layers compiled for training (`model.compile`) run eagerly here: with a KV cache each layer's cache
    state differs, so dynamo would compile a graph per layer and per decoding phase, for a few short
    generations per eval.
    """
    tokenizer = processor.tokenizer
    batch = collate(samples, tokenizer.pad_token_id, padding_side="left")
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    with torch.compiler.set_stance("force_eager"):
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                synced_gpus=synced_gpus)
    model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
