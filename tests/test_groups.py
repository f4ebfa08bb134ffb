import pytest
import torch
from conftest import HIDDEN, TINY, VOCAB, tiny_model, untied_llama
from peft import LoraConfig, get_peft_model

from tie_guard import find_tied_groups


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tied_architectures_have_one_physical_group(arch):
    model = tiny_model(arch)
    groups = find_tied_groups(model)
    _, inp, out = TINY[arch]
    assert len(groups) == 1
    g = groups[0]
    assert g.status == "tied" and g.physical and g.declared
    assert g.names == (inp, out)
    assert [m.role for m in g.members] == ["input_embedding", "output_embedding"]
    assert all(m.shape == (VOCAB, HIDDEN) and m.dtype == "torch.float32" for m in g.members)
    assert all(m.touched_by == () and m.requires_grad for m in g.members)
    assert g.nbytes == VOCAB * HIDDEN * 4
    assert g.config_flags["config.tie_word_embeddings"] is True


def test_untied_llama_has_no_group():
    assert find_tied_groups(untied_llama()) == []


def test_names_are_canonical_through_peft_wrappers():
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    (g,) = find_tied_groups(pm)
    assert g.names == ("model.embed_tokens.weight", "lm_head.weight")
    members = {m.name: m for m in g.members}
    assert members["lm_head.weight"].touched_by == ("lora[default]",)
    assert members["model.embed_tokens.weight"].touched_by == ()
    assert not any(m.requires_grad for m in g.members)  # PEFT froze the base


@pytest.mark.parametrize(
    "spec, touched",
    [
        (dict(modules_to_save=["lm_head"]), {"lm_head.weight": ("modules_to_save[default]",)}),
        (dict(trainable_token_indices=[1, 2, 3]), {"lm_head.weight": ("trainable_tokens[default]",),
                                                    "model.embed_tokens.weight": ("trainable_tokens[default]",)}),
        (dict(target_modules=["embed_tokens", "lm_head"]), {"lm_head.weight": ("lora[default]",),
                                                             "model.embed_tokens.weight": ("lora[default]",)}),
        (dict(target_modules=["lm_head"], use_dora=True), {"lm_head.weight": ("dora[default]",)}),
    ],
)
def test_what_touches_each_member(spec, touched):
    spec.setdefault("target_modules", ["q_proj"])
    pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, **spec))
    (g,) = find_tied_groups(pm)
    assert g.status == "tied"
    for m in g.members:
        assert m.touched_by == touched.get(m.name, ())


def test_declared_but_not_physically_tied():
    model = tiny_model("llama_tied")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    (g,) = find_tied_groups(model)
    assert g.status == "declared_not_tied" and not g.physical and g.declared
    assert g.names == ("model.embed_tokens.weight", "lm_head.weight")


def test_physically_tied_but_not_declared():
    model = untied_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    (g,) = find_tied_groups(model)
    assert g.status == "tied_not_declared" and g.physical and not g.declared


def test_shared_storage_counts_even_as_distinct_parameter_objects():
    model = untied_llama()
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data)  # same storage, new object
    (g,) = find_tied_groups(model)
    assert g.physical


@pytest.mark.integration
def test_real_smollm2_groups(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    (g,) = find_tied_groups(model)
    assert g.status == "tied"
    assert g.names == ("model.embed_tokens.weight", "lm_head.weight")
    assert all(m.shape == (49152, 576) for m in g.members)
    assert g.nbytes == 49152 * 576 * 4
