"""Probe batches and logit comparison used to verify merges.

Tolerances (max |Δlogit|, merged vs adapter model) are per dtype: the merged model computes ``x @ (W + ΔW)ᵀ``
where the adapter model computes ``x @ Wᵀ + (x @ Aᵀ) @ Bᵀ · s``; the two differ only by rounding. Stated as
``atol + rtol · max|logits|``. The float32 bound sits above float32's own noise floor: on real
SmolLM2-135M (logits up to 34) the *unmerged* adapter model run in float32 differs from the same model run in
float64 by 1.5e-4 on the default probe, so a bound below that would fail exact merges.

==========  ======  ======
dtype       atol    rtol
==========  ======  ======
float32     1e-4    1e-5
bfloat16    0.25    0.02
float16     0.05    0.005
==========  ======  ======
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from .peft_layout import base_model_of

LOGIT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-8, 1e-10),
    torch.bfloat16: (0.25, 0.02),
    torch.float16: (0.05, 0.005),
}


def logit_tolerance(dtype: torch.dtype, max_abs_logit: float) -> float:
    """Allowed max |Δlogit| for a model computing in ``dtype`` whose logits reach ``max_abs_logit``."""
    atol, rtol = LOGIT_TOLERANCES.get(dtype, LOGIT_TOLERANCES[torch.float32])
    return atol + rtol * max_abs_logit


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype most of ``model``'s parameters use."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def make_probe_ids(vocab_size: int, batch: int = 2, seq_len: int = 32, seed: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """A deterministic probe batch of token ids, shape (batch, seq_len), drawn uniformly from ``[0, vocab_size)``
    so that every part of the vocabulary (new tokens included) can show up."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)


def check_probe_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` (naming the fix) unless ``input_ids`` is a non-empty (batch, seq) integer tensor of
    ids in ``[0, vocab_size)``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"probe_input_ids must be a non-empty (batch, seq) tensor, got {shape}. "
                         "Fix: pass e.g. tokenizer(texts, return_tensors='pt').input_ids, or leave it None.")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"probe_input_ids must hold integer token ids, got {input_ids.dtype}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"probe_input_ids holds ids in [{lo}, {hi}] but the model's vocabulary is [0, {vocab_size}). "
                         "Fix: tokenize with the model's own tokenizer (resize embeddings after adding tokens).")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module of ``model`` in eval mode (dropout off) for the block, then give each module back its own
    ``training`` flag. ``model.train(flag)`` would not do: it sets every submodule to the root's flag, and
    ``peft.get_peft_model`` leaves a ``PeftModel`` root in train mode above a base model in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    config = getattr(model, "config", None)
    kwargs = {"input_ids": input_ids.to(model_device(model))}
    if _accepts(base_model_of(model), "use_cache"):  # transformers 4.x BertForMaskedLM.forward has no **kwargs
        kwargs["use_cache"] = False
    if config is not None and getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = kwargs["input_ids"]
    return kwargs


def probe_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on ``input_ids`` (batch × seq) as float32, shape (batch, seq, vocab), in eval mode
    (dropout off), without gradients and without mixed-precision wrappers; the model's train/eval mode is
    restored afterwards. Encoder–decoder models get ``decoder_input_ids = input_ids``."""
    # Call the class's forward, not an instance-level override: accelerate's ``prepare`` replaces
    # ``model.forward`` with an autocast wrapper (e.g. bf16 autocast under SFTConfig's default bf16=True), which
    # would make the reference logits depend on the training run's mixed-precision setting.
    forward = type(model).forward
    with torch.no_grad(), eval_mode(model):
        out = forward(model, **_forward_kwargs(model, input_ids))
    return out.logits.detach().float().cpu()


class _StopAtHead(Exception):
    """Raised by the pre-hook on the output embedding once its input is captured: the forward stops there."""


#: Elements of logits produced at once by :class:`ProbeRun` (4 MiB of float32).
LOGIT_CHUNK_ELEMS = 1 << 20


class ProbeRun:
    """What a model computes on a probe batch, kept small: the input of its output embedding (``hidden``:
    (batch·seq) × hidden) and the head module itself, so that logits ((batch·seq) × vocab) are produced a few
    tokens at a time (:data:`LOGIT_CHUNK_ELEMS` per chunk) and never held whole.

    The model's class ``forward`` runs in eval mode without gradients up to its output-embedding module
    (``get_output_embeddings()``, PEFT wrapper included), whose input is captured by a forward pre-hook that then
    stops the forward. Logits are the head module's output on that input: for a LoRA head the adapter model's
    own PEFT forward, for the merged model its plain ``nn.Linear``. Whatever a model does after its head
    (Gemma's final-logit soft-capping, a logit scale) is the same code and config in the two models compared, and
    is 1-Lipschitz or a fixed scale, so equal head outputs mean equal logits; everything before it (every
    decoder layer, embedding scaling, T5's output rescale) is in ``hidden``. When the forward never calls that
    module (a model computing logits from a weight directly), the full logits are kept instead (``logits``).

    Args:
        model: any transformers model or ``PeftModel``; its modes are restored after each use.
        input_ids: (batch, seq) token ids.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        self.model = model
        self.shape = tuple(input_ids.shape)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        captured = {}

        def hook(module, args, kwargs):
            captured["x"] = (args[0] if args else next(iter(kwargs.values()))).detach()
            raise _StopAtHead

        handle = self.head.register_forward_pre_hook(hook, with_kwargs=True) if self.head is not None else None
        try:
            with torch.no_grad(), eval_mode(model):
                out = type(model).forward(model, **_forward_kwargs(model, input_ids))
            self.logits = out.logits.detach().float().cpu().reshape(-1, out.logits.shape[-1])
            self.head = None
        except _StopAtHead:
            x = captured["x"]
            self.hidden = x.reshape(-1, x.shape[-1])
        finally:
            if handle is not None:
                handle.remove()

    @property
    def vocab(self) -> int:
        """Width of the logits (from one position's head output, computed once)."""
        if self.logits is not None:
            return self.logits.shape[-1]
        if not hasattr(self, "_vocab"):
            self._vocab = next(self.chunks(1)).shape[-1]
        return self._vocab

    def chunks(self, rows: int | None = None):
        """Yield the float32 logits in order, ``rows`` flattened (batch·seq) positions at a time (default: as many
        as fit in :data:`LOGIT_CHUNK_ELEMS`), each (rows × vocab)."""
        n = self.hidden.shape[0] if self.logits is None else self.logits.shape[0]
        rows = rows or max(1, LOGIT_CHUNK_ELEMS // self.vocab)
        if self.logits is not None:
            yield from (self.logits[i: i + rows] for i in range(0, n, rows))
            return
        for i in range(0, n, rows):
            # No context is held across a yield: a consumer may stop early (grad mode must not stay off).
            with torch.no_grad(), eval_mode(self.head):
                out = self.head(self.hidden[i: i + rows].unsqueeze(0))[0].float().cpu()
            yield out

    def max_abs(self) -> float:
        """max |logit| over the probe (``inf`` if any logit is not finite)."""
        return max((float(torch.nan_to_num(c.abs(), nan=float("inf")).max()) for c in self.chunks()), default=0.0)

    def max_abs_diff(self, other: ProbeRun) -> float:
        """max |logits(self) − logits(other)| over every logit of the probe, computed chunk by chunk.

        Raises:
            ValueError: the two runs were made on probes or vocabularies of different shapes.
        """
        if self.shape != other.shape or self.vocab != other.vocab:
            raise ValueError(f"probe shape mismatch: {self.shape} × {self.vocab} vs {other.shape} × {other.vocab}")
        rows = max(1, LOGIT_CHUNK_ELEMS // self.vocab)
        return max((max_abs_diff(a, b) for a, b in zip(self.chunks(rows), other.chunks(rows))), default=0.0)

    def full_logits(self) -> torch.Tensor:
        """All logits, (batch, seq, vocab) float32: for callers that need them whole (tests, small models)."""
        return torch.cat(list(self.chunks())).reshape(*self.shape, -1)


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(type(model).forward).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| as a Python float (``inf`` if either holds a non-finite value where the other does not)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a.float() - b.float()).abs()
    d = torch.nan_to_num(d, nan=float("inf"))
    return float(d.max()) if d.numel() else 0.0
