"""Public bug reports about tied weights, each rebuilt as the smallest model that shows it, with the right outcome."""

import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little, untied_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tie_guard import TieWatcher, find_tied_groups, safe_merge_and_unload
from tie_guard.events import EventLog
from tie_guard.probe import make_probe_ids, probe_logits

TOL = 1e-4


def _reload(model, path):
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _both_copies_adapter():
    pm = get_peft_model(tiny_model("llama_tied"),
                        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    return train_adapter_a_little(pm, steps=4)


def test_both_sides_in_modules_to_save_reload_must_not_lose_a_matrix(tmp_path):
    """Report: embed_tokens + lm_head trained as modules_to_save copies, merged and saved while the config still
    says tied; the reloaded model re-ties them and one trained matrix is lost.

    Measured here: PEFT 0.21 now sets the top-level flag False after such a merge, and transformers 5.24 keeps both
    matrices on reload when they differ; the failure comes back whenever the flag still says tied when
    ``tie_weights()`` runs (resize_token_embeddings, accelerate's FSDP2 prepare): shown below by restoring it.
    """
    probe = make_probe_ids(VOCAB)
    pm = _both_copies_adapter()
    adapter = probe_logits(pm, probe)

    plain = _both_copies_adapter().merge_and_unload()
    plain.config.tie_word_embeddings = True  # the checkpoint "still says tied" (older PEFT, or a nested config)
    plain_re = _reload(plain, tmp_path / "plain")
    plain_re.tie_weights()
    assert plain_re.lm_head.weight is plain_re.model.embed_tokens.weight  # one trained matrix is gone
    lost = (probe_logits(plain_re, probe) - adapter).abs().max().item()
    assert lost > 0.1

    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "ours")
    assert merged.config.tie_word_embeddings is False
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ours.tie_weights()
    ours.resize_token_embeddings(VOCAB + 8)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert (probe_logits(ours, probe)[..., :VOCAB] - adapter).abs().max().item() <= TOL
    print(f"tied flag + reload + tie_weights: |Δlogit| {lost:.3g}; tie_guard: ≤ {TOL}")


def test_merged_weights_are_the_trained_copies():
    """Report: a tool merged the base weights instead of the trained modules_to_save copies."""
    pm = _both_copies_adapter()
    base = pm.get_base_model()
    trained_head = base.lm_head.modules_to_save["default"].weight.detach().clone()
    trained_embed = base.model.embed_tokens.modules_to_save["default"].weight.detach().clone()
    original = base.lm_head.original_module.weight.detach().clone()
    assert not torch.equal(trained_head, original)
    merged, _ = safe_merge_and_unload(pm)
    assert torch.equal(merged.lm_head.weight, trained_head)
    assert torch.equal(merged.model.embed_tokens.weight, trained_embed)


def test_new_tokens_resized_trained_head_survives_reload(tmp_path):
    """Report: new tokens added, embeddings resized, LoRA + head trained, merged, reloaded: the model repeats one
    token (the head's new rows were replaced by the input embedding's untrained ones)."""
    new = 4
    base = tiny_model("llama_tied")
    base.resize_token_embeddings(VOCAB + new, mean_resizing=False)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    pm.train()
    for _ in range(6):  # sequences that end in the new tokens, so their head rows get trained
        ids = torch.cat([torch.randint(0, VOCAB, (4, 8), generator=gen),
                         torch.randint(VOCAB, VOCAB + new, (4, 4), generator=gen)], dim=1)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    trained_rows = pm.get_base_model().lm_head.modules_to_save["default"].weight[VOCAB:].detach().clone()
    embed_rows = pm.get_base_model().model.embed_tokens.weight[VOCAB:].detach().clone()
    assert not torch.equal(trained_rows, embed_rows)

    probe = make_probe_ids(VOCAB + new)
    merged, _ = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    pre_save = probe_logits(merged, probe)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    reloaded.tie_weights()
    assert torch.equal(probe_logits(reloaded, probe), pre_save)
    assert torch.equal(reloaded.lm_head.weight[VOCAB:], trained_rows)
    assert torch.equal(reloaded.model.embed_tokens.weight[VOCAB:], embed_rows)


def test_flag_says_untied_but_storage_is_shared(tmp_path):
    """Report: config says untied while the weights share storage -> a dropped / randomly re-initialised head on
    reload. Detected at capture and at merge, with the fix."""
    model = untied_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # shared, flag False, not in all_tied_weights_keys
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    train_adapter_a_little(pm, steps=2)
    events = EventLog()
    TieWatcher(pm, events).capture()
    (warning,) = [e.message for e in events.events if e.event == "setup_warning"]
    assert "do not declare" in warning or "does not declare" in warning
    assert "Fix:" in warning
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert any("does not declare" in a for a in report.actions)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (probe_logits(reloaded, probe) - adapter).abs().max().item() <= TOL
    assert torch.equal(reloaded.lm_head.weight, model.model.embed_tokens.weight)


def test_flag_says_tied_but_weights_are_separate(tmp_path):
    """The reverse: tie_word_embeddings=True while lm_head holds its own (different) values."""
    model = tiny_model("llama_tied")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.5)
    assert find_tied_groups(model)[0].status == "declared_not_tied"
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    train_adapter_a_little(pm, steps=2)
    events = EventLog()
    TieWatcher(pm, events).capture()
    (warning,) = [e.message for e in events.events if e.event == "setup_warning"]
    assert "separate tensors" in warning and "tie_word_embeddings=False" in warning
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert merged.config.tie_word_embeddings is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    reloaded.tie_weights()
    assert (probe_logits(reloaded, probe) - adapter).abs().max().item() <= TOL
