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

from .module_copy import shallow_module_copy
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


#: Most elements of logits produced at once by :class:`ProbeRun` (4 MiB of float32).
LOGIT_CHUNK_ELEMS = 1 << 20


def block_elems(vocab: int, hidden: int) -> int:
    """Logits per block for a vocab × hidden head: 1/128 of the head's elements (a block and the few temporaries
    a head's forward makes stay a few % of the head's bytes), between 64 Ki and :data:`LOGIT_CHUNK_ELEMS`."""
    return max(1 << 16, min(LOGIT_CHUNK_ELEMS, vocab * hidden // 128))


def _plain_linear(m: nn.Module | None) -> bool:
    """``m`` computes ``nn.Linear``'s own forward: no subclass override and no instance-level ``forward`` (as
    accelerate's ``add_hook_to_module`` installs for ``device_map`` dispatch: it would run the original module's
    full weights, not a row-sliced copy's)."""
    return (m is not None and isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
            and "forward" not in vars(m) and not hasattr(m, "_hf_hook"))


def _row_sliced_linear(lin: nn.Linear, rows: slice | list[int]) -> nn.Linear:
    """``lin`` computing only output features ``rows``: a shallow copy whose weight and bias are views (copies
    of those rows for a list)."""
    new = shallow_module_copy(lin)
    new._parameters["weight"] = lin.weight[rows]
    if lin.bias is not None:
        new._parameters["bias"] = lin.bias[rows]
    new.out_features = new._parameters["weight"].shape[0]
    return new


def _vanilla_lora_linear(m: nn.Module) -> bool:
    """``m`` is PEFT's ``lora.Linear`` in its unmerged state, every active adapter plain LoRA (no DoRA or other
    variant), over a plain ``nn.Linear``: its output is ``base(x) + Σ_a lora_B_a(lora_A_a(x)) · s_a``, so
    output feature ``j`` depends only on row ``j`` of ``base.weight`` and of each ``lora_B_a.weight`` (peft
    0.18–0.21 ``lora.Linear.forward``)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    if (type(m) is not LoraLinear or "forward" in vars(m) or hasattr(m, "_hf_hook") or m.merged
            or m.disable_adapters or not _plain_linear(m.base_layer)):
        return False
    active = [a for a in m.active_adapters if a in m.lora_A]
    return all(a not in getattr(m, "lora_variant", {}) and not getattr(m, "use_dora", {}).get(a, False)
               and _plain_linear(m.lora_B[a]) for a in active)


def _row_sliced_head(head: nn.Module, rows: slice | list[int], plain: bool) -> nn.Module:
    """A module computing output features ``rows`` of ``head`` (``plain``: an ``nn.Linear``, else PEFT's
    ``lora.Linear``) with ``head``'s own forward (no tensor copied for a slice)."""
    if plain:
        return _row_sliced_linear(head, rows)
    new = shallow_module_copy(head)
    new._modules["base_layer"] = _row_sliced_linear(head.base_layer, rows)
    lora_b = shallow_module_copy(head.lora_B)
    for a in head.active_adapters:
        if a in head.lora_A:
            lora_b._modules[a] = _row_sliced_linear(head.lora_B[a], rows)
    new._modules["lora_B"] = lora_b
    return new


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def post_head_candidates(model: nn.Module) -> list:
    """Candidate functions for what ``model``'s forward does to its head's output before returning logits (each on
    a tensor in the head's dtype, in place), most specific first, ending with ``None`` (nothing). Built from numeric (text)
    config values: soft-capping ``c·tanh(h/c)`` (``final_logit_softcapping``: Gemma 2/3; ``logits_soft_cap``:
    RecurrentGemma; ``output_logit_soft_cap``: xLSTM), scales (``logit_scale``: Cohere; ``lm_head_multiplier``:
    Falcon-H1; ``output_multiplier``) and ``logits_scaling`` (Granite divides, HyperCLOVAX multiplies).

    These are only candidates: :class:`ProbeRun` keeps one only after checking it against the logits the model's
    own forward returned (a model may carry such a value and not apply it, or apply it before its head)."""
    config = getattr(base_model_of(model), "config", None)
    if config is None:
        return [None]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def read(*names):
        for name in names:
            for cfg in (text, config):
                value = _number(getattr(cfg, name, None))
                if value is not None:
                    return value
        return None

    cap = read("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
    mul = 1.0
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        mul *= read(name) or 1.0
    div = read("logits_scaling")

    def make(scale: float):
        def apply(h: torch.Tensor) -> torch.Tensor:
            if scale != 1.0:
                h = h.mul_(scale)
            if cap is not None:
                h = h.div_(cap).tanh_().mul_(cap)
            return h
        return apply

    scales = [mul / div, mul * div] if div else [mul]
    out = [make(sc) for sc in scales if sc != 1.0 or cap is not None]
    return out + [None]


def _no_hooks(module: nn.Module) -> bool:
    """No forward (pre-)hook, and no instance-level ``forward`` (accelerate's ``add_hook_to_module`` for
    ``device_map`` dispatch), on ``module`` or any submodule, and no global module hook: the head's output is
    its class's forward alone, so it may be computed again (and on row slices) outside the model's forward."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, name, None) for name in
           ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called")):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) or hasattr(m, "_hf_hook")
                   for m in module.modules())


def _in_features(head: nn.Module) -> int | None:
    w = getattr(head, "weight", None)
    if w is None and hasattr(head, "get_base_layer"):
        w = getattr(head.get_base_layer(), "weight", None)
    return w.shape[-1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None


class ProbeRun:
    """What a model computes on a probe batch, kept small: the input of its output embedding (``hidden``:
    (batch·seq) × hidden) and the head module itself, so that logits ((batch·seq) × vocab) are produced a block
    at a time (:func:`block_elems` elements per block: a few % of the head's bytes) and never held whole.

    How: the model's class ``forward`` runs once, in eval mode without gradients, with its output-embedding module
    (``get_output_embeddings()``, PEFT wrapper included) computing only six vocabulary columns; the head's input
    is kept. Of :func:`post_head_candidates` (soft-capping, logit scales read from the config, or nothing), the
    first that turns those columns into exactly the logits the forward returned (4 ulps) is kept as
    ``post_head``. A block of logits is then the head module's own output on ``hidden`` (for a LoRA head the
    adapter model's PEFT forward, for the merged model its plain ``nn.Linear``) followed by ``post_head``: the
    logits the model returns; everything before the head (decoder layers, embedding scaling, T5's rescale, a
    hidden-state scaling) is in ``hidden``.

    The model's whole logits are held instead (``logits``; the memory of one (batch, seq, vocab) float32 tensor)
    when that cannot be established: no output-embedding module, a head with hooks (torch hooks or an
    instance-level ``forward`` such as accelerate's dispatch hooks), a head called twice or on something other
    than hidden states (FSMT's ``get_output_embeddings()`` is its decoder's input embedding), a forward that fails
    with a narrowed head (BART's vocabulary-wide ``final_logits_bias``) or logits no candidate reproduces.

    Blocks: when both runs compared have a head whose output feature ``j`` depends only on row ``j`` of its
    weights (a plain ``nn.Linear``, or PEFT's ``lora.Linear`` with plain LoRA adapters), every probe position is
    computed at once over a slice of the vocabulary, by the head's own forward on row views of its weights (one
    pass over the head's weights: fast). Otherwise (DoRA, other tuners, ``modules_to_save`` copies) a few
    positions at a time over the whole vocabulary.

    Args:
        model: any transformers model or ``PeftModel``; its modes are restored after each use.
        input_ids: (batch, seq) token ids.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        self.model = model
        self.shape = tuple(input_ids.shape)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.post_head = None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if head is not None and _no_hooks(head) else None
        self._plain = _plain_linear(self.head)
        self.row_sliceable = self.head is not None and (self._plain or _vanilla_lora_linear(self.head))
        if self.head is not None and self._run_with_narrow_head(model, input_ids):
            return
        # Not understood (no head module, hooks, a head called twice or on non-hidden input, a post-head step that
        # no candidate reproduces): the model's own full logits, held whole.
        self.head, self.hidden, self.post_head, self.row_sliceable = None, None, None, False
        with torch.no_grad(), eval_mode(model):
            out = type(model).forward(model, **_forward_kwargs(model, input_ids))
        self.logits = out.logits.detach().float().cpu().reshape(-1, out.logits.shape[-1])

    def _run_with_narrow_head(self, model: nn.Module, input_ids: torch.Tensor) -> bool:
        """Run the model's forward with its head computing only a few vocabulary columns (so no full logits
        exist), keep the head's input as ``hidden``, and choose ``post_head`` among
        :func:`post_head_candidates` as the one that turns those columns into exactly the logits the forward
        returned. False when that cannot be established."""
        head = self.head
        state: dict = {}
        original = type(head).forward

        def narrow(x, *args, **kwargs):
            width = _in_features(head)
            if ("x" in state or args or kwargs or not isinstance(x, torch.Tensor) or not x.is_floating_point()
                    or (width is not None and x.shape[-1] != width)):
                state["odd"] = True  # called twice, with more arguments, or on something other than hidden states
                return original(head, x, *args, **kwargs)
            state["x"] = x.detach()
            flat = state["x"].reshape(-1, x.shape[-1])
            vocab = self._head_width(flat)
            cols = sorted({0, 1, vocab // 3, vocab // 2, vocab - 2, vocab - 1} & set(range(vocab)))
            y = self._columns(flat, cols, vocab)
            state["vocab"], state["y"] = vocab, y.clone()  # the model may edit what it gets in place
            return y.reshape(*x.shape[:-1], len(cols))

        head.forward = narrow
        try:
            with torch.no_grad(), eval_mode(model):
                out = type(model).forward(model, **_forward_kwargs(model, input_ids))
            logits = out.logits
        except Exception:  # a step after the head needs the whole vocabulary (e.g. BART's final_logits_bias)
            return False
        finally:
            del head.forward
        if "y" not in state or state.get("odd") or logits.numel() != state["y"].numel():
            return False
        got = logits.detach().float().cpu().reshape(state["y"].shape)
        eps = max(torch.finfo(state["y"].dtype).eps, torch.finfo(logits.dtype).eps)
        for candidate in post_head_candidates(model):
            want = state["y"].clone()  # in the head's dtype, as the model's own forward computes it
            want = (want if candidate is None else candidate(want)).float().cpu()
            if bool(((got - want).abs() <= 4 * eps * got.abs().clamp_min(1.0)).all()):
                self.post_head, self._vocab = candidate, state["vocab"]
                self.hidden = state["x"].reshape(-1, state["x"].shape[-1])
                return True
        return False

    def _head_width(self, flat: torch.Tensor) -> int:
        if self.row_sliceable:
            return self.head.out_features if self._plain else self.head.base_layer.out_features
        with torch.no_grad():
            return type(self.head).forward(self.head, flat[:1].unsqueeze(0)).shape[-1]

    def _columns(self, x: torch.Tensor, cols: list[int], vocab: int) -> torch.Tensor:
        """Head output columns ``cols`` (of ``vocab``) for the (n × hidden) input ``x``, in the head's output
        dtype: from a row-sliced copy of the head, or from its whole output a few positions at a time."""
        with torch.no_grad():
            if self.row_sliceable:
                h = _row_sliced_head(self.head, cols, self._plain)
                return type(h).forward(h, x.unsqueeze(0))[0]
            rows = max(1, block_elems(vocab, x.shape[-1]) // vocab)
            return torch.cat([type(self.head).forward(self.head, x[i: i + rows].unsqueeze(0))[0][..., cols]
                              for i in range(0, x.shape[0], rows)])

    @property
    def positions(self) -> int:
        """Flattened (batch·seq) probe positions."""
        return self.hidden.shape[0] if self.logits is None else self.logits.shape[0]

    @property
    def vocab(self) -> int:
        """Width of the logits (the head's output width, read once while the model's forward ran)."""
        if self.logits is not None:
            return self.logits.shape[-1]
        return self._vocab

    def block(self, positions: slice, vocab: slice | None) -> torch.Tensor:
        """Float32 logits of ``positions`` (flattened) × ``vocab`` (``None``: all), a new tensor or a view.

        Raises:
            ValueError: a vocabulary slice was asked of a head that cannot be row-sliced (``row_sliceable``).
        """
        if self.logits is not None:
            return self.logits[positions] if vocab is None else self.logits[positions, vocab]
        head = self.head
        if vocab is not None:
            if not self.row_sliceable:
                raise ValueError(f"{type(head).__name__} head cannot compute a slice of the vocabulary")
            head = _row_sliced_head(head, vocab, self._plain)
        # No context is held across calls: a consumer may stop early (grad mode must not stay off).
        with torch.no_grad(), eval_mode(self.head):
            out = head(self.hidden[positions].unsqueeze(0))[0]
            return (out if self.post_head is None else self.post_head(out)).float().cpu()

    def _blocks(self, other: ProbeRun | None = None):
        """(positions, vocab) slices covering every logit once, shared by ``self`` and ``other``."""
        n, v = self.positions, self.vocab
        elems = block_elems(v, self.hidden.shape[-1] if self.hidden is not None else 1 << 12)
        if self.row_sliceable and (other is None or other.row_sliceable):
            cols = max(1, elems // n)
            return [(slice(0, n), slice(j, min(v, j + cols))) for j in range(0, v, cols)]
        rows = max(1, elems // v)
        return [(slice(i, i + rows), None) for i in range(0, n, rows)]

    def chunks(self, rows: int | None = None):
        """Yield the float32 logits in order, ``rows`` flattened (batch·seq) positions at a time (default: as many
        as fit in :data:`LOGIT_CHUNK_ELEMS`), each (rows × vocab)."""
        n = self.positions
        rows = rows or max(1, LOGIT_CHUNK_ELEMS // self.vocab)
        for i in range(0, n, rows):
            yield self.block(slice(i, i + rows), None)

    def compare(self, reference: ProbeRun) -> tuple[float, float]:
        """``(max |logits(self) − logits(reference)|, max |logits(reference)|)`` over every logit of the probe, in
        one pass over both heads (block by block; ``inf`` for a non-finite value).

        Raises:
            ValueError: the two runs were made on probes or vocabularies of different shapes.
        """
        if self.shape != reference.shape or self.vocab != reference.vocab:
            raise ValueError(f"probe shape mismatch: {self.shape} × {self.vocab} vs "
                             f"{reference.shape} × {reference.vocab}")
        diff = ref = 0.0
        for positions, vocab in self._blocks(reference):
            b = reference.block(positions, vocab)
            ref = max(ref, _max_abs(b))
            d = self.block(positions, vocab)
            d = d - b if self.logits is not None else d.sub_(b)  # stored logits are views: not in place
            diff = max(diff, _max_abs(d))
        return diff, ref

    def max_abs(self) -> float:
        """max |logit| over the probe (``inf`` if any logit is not finite)."""
        return max((_max_abs(self.block(p, v)) for p, v in self._blocks()), default=0.0)

    def max_abs_diff(self, other: ProbeRun) -> float:
        """max |logits(self) − logits(other)| over every logit of the probe (see :meth:`compare`)."""
        return self.compare(other)[0]

    def full_logits(self) -> torch.Tensor:
        """All logits, (batch, seq, vocab) float32: for callers that need them whole (tests, small models)."""
        return torch.cat(list(self.chunks())).reshape(*self.shape, -1)


def _max_abs(t: torch.Tensor) -> float:
    """max |t| without a temporary (``inf`` if ``t`` holds NaN/Inf, 0 if empty)."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    m = max(-float(lo), float(hi))
    return m if m == m else float("inf")


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
