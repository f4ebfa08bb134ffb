"""Chat-template tokenisation with assistant-only labels (shared by the training scripts and tests)."""

from __future__ import annotations

IGNORE_INDEX = -100


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, with labels only on assistant turns.

    Each prefix ``messages[:i+1]`` is rendered; the tokens it adds belong to message ``i``. This needs a template
    whose rendering of a prefix is a prefix of the full rendering (ChatML and most chat templates).

    Raises:
        ValueError: the tokenizer has no chat template, or the template is not prefix-stable.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pick an instruct model or set tokenizer.chat_template")
    ids: list[int] = []
    labels: list[int] = []
    for i in range(len(messages)):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        if hasattr(full, "input_ids"):
            full = full["input_ids"]
        if full[: len(ids)] != ids:
            raise ValueError("chat template is not prefix-stable; cannot mask non-assistant tokens by rendering")
        new = full[len(ids):]
        ids = list(full)
        labels += new if messages[i]["role"] == "assistant" else [IGNORE_INDEX] * len(new)
        if len(ids) >= max_length:
            break
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_dataset(tokenizer, conversations: list[list[dict]], max_length: int) -> list[dict]:
    """Tokenised conversations that contain at least one supervised (assistant) token."""
    out = []
    for conv in conversations:
        ex = tokenize_conversation(tokenizer, conv, max_length)
        if any(label != IGNORE_INDEX for label in ex["labels"]):
            out.append(ex)
    return out
