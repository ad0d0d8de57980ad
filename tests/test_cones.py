"""pipelines.cones: concept neurons (Cones, Liu et al. 2023) on the tiny model, and the index math."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from pipelines.cones import (
    KV_MODULES,
    MAX_SHUT_FRACTION,
    WorkingLinear,
    check_cones_tensors,
    find_concept_neurons,
    kv_modules,
    merge_cones,
    neuron_limit,
    neurons_of,
    replay_losses,
    shut_delta,
    shut_lora_factors,
    shut_neurons,
    storage_bytes,
    top_neurons,
    union_shut,
)
from pipelines.errors import Cancelled, UserError
from pipelines.train import CHECKPOINT_FILE, _class_embedding

from conftest import procedural_photo, quick_config

pytestmark = pytest.mark.usefixtures("one_thread")


def cones_config(**overrides):
    settings = dict(kind="cones", steps=4, checkpoint_every=0)
    settings.update(overrides)
    return quick_config(**settings)


def photos():
    return [procedural_photo(0), procedural_photo(1)]


@pytest.fixture(scope="module")
def searched(tiny_dir):
    """One search shared read-only: (base after the search, the base's UNet weights before, result)."""
    from pipelines.base import load_base

    base = load_base(str(tiny_dir), device="cpu")
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    modules = {name: id(module) for name, module in base.unet.named_modules()}
    result = find_concept_neurons(base, photos(), cones_config())
    return base, before, modules, result


# ---------------------------------------------------------------------------------------------
# The math


def test_shut_delta_is_minus_the_weight_at_the_indices():
    weight = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    delta = shut_delta(weight, torch.tensor([1, 5], dtype=torch.int32))
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 6.0]]))
    assert torch.equal(weight + delta, torch.tensor([[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]]))


def test_shut_lora_factors_are_exact_with_the_rank_of_the_rows_touched():
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([2, 4, 21, 23], dtype=torch.int32)  # rows 0 and 4
    down, up = shut_lora_factors(weight, indices)
    assert down.shape == (2, 5) and up.shape == (6, 2)
    assert torch.allclose(up @ down, shut_delta(weight, indices))


def test_union_is_sorted_unique_int32():
    sets = [torch.tensor([5, 1, 9], dtype=torch.int32), torch.tensor([9, 2], dtype=torch.int32), torch.tensor([], dtype=torch.int32)]
    union = union_shut(sets)
    assert union.dtype == torch.int32
    assert union.tolist() == [1, 2, 5, 9]
    assert union_shut([]).tolist() == []


def test_top_neurons_takes_the_largest_positive_scores_across_modules():
    scores = {"a": torch.tensor([[0.5, -1.0], [0.1, 0.0]]), "b": torch.tensor([0.3, 0.7, -0.2])}
    assert {k: v.tolist() for k, v in top_neurons(scores, 3).items()} == {"a": [0], "b": [0, 1]}
    # only 3 scores are positive: a cap of 10 shuts 3, never a zero or negative one
    assert {k: v.tolist() for k, v in top_neurons(scores, 10).items()} == {"a": [0, 2], "b": [0, 1]}
    assert all(v.dtype == torch.int32 for v in top_neurons(scores, 10).values())
    assert top_neurons({"a": -torch.ones(3)}, 5) == {}


def test_neuron_limit_caps_by_count_and_by_share():
    assert MAX_SHUT_FRACTION * 43_950_080 > 20_000  # SD1.5's K/V weights: the count binds there
    assert neuron_limit(43_950_080, 20_000) == 20_000
    assert neuron_limit(114_688, 20_000) == int(MAX_SHUT_FRACTION * 114_688)  # a small model: the share binds
    assert neuron_limit(10, 20_000) == 1


def test_storage_bytes_is_the_file_size(tmp_path):
    tensors = {"embeddings": torch.zeros(2, 1, 768), "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.shut":
               torch.arange(0, 20_000, dtype=torch.int32)}
    save_file(tensors, tmp_path / "c.safetensors")
    assert storage_bytes(tensors) == (tmp_path / "c.safetensors").stat().st_size
    assert 86_144 <= storage_bytes(tensors) < 87_000  # 2 * 768 * 4 + 20000 * 4 bytes plus a short header


# ---------------------------------------------------------------------------------------------
# The search on the tiny model


def test_search_names_only_kv_weights_with_sorted_int32_indices(searched):
    base, _, _, result = searched
    layers = kv_modules(base.unet)
    assert len(layers) == 64  # attn1 and attn2 to_k/to_v of 16 transformer blocks
    neurons = neurons_of(result.tensors)
    assert neurons and set(result.tensors) == {"embeddings"} | {f"unet.{m}.shut" for m in neurons}
    for module, indices in neurons.items():
        assert KV_MODULES.fullmatch(module) and module.rsplit(".", 1)[1] in ("to_k", "to_v")
        assert indices.dtype == torch.int32 and indices.ndim == 1
        assert bool((indices[1:] > indices[:-1]).all())
        assert 0 <= int(indices[0]) and int(indices[-1]) < layers[module].weight.numel()
    check_cones_tensors(result.tensors, base)
    assert result.concept.kind == "cones" and result.concept.settings["neurons"] == sum(i.numel() for i in neurons.values())
    assert result.preview is not None and len(result.losses) == 4


def test_words_are_the_identifier_and_the_class_word(searched):
    base, _, _, result = searched
    words = result.tensors["embeddings"]
    assert words.shape == (2, 1, 32) and words.dtype == torch.float32
    assert torch.equal(words[1, 0], _class_embedding(base, "dog"))
    generator = torch.Generator("cpu").manual_seed(0)  # the seed's first draw, ED-LoRA's V_rand
    assert torch.allclose(words[0, 0], torch.randn(32, generator=generator) * 0.013)
    table = base.text_encoder.get_input_embeddings()
    assert torch.equal(table.concept_vectors["mochi"], words.expand(-1, 16, -1))  # same vector in all 16 layers


def test_base_weights_and_modules_are_unchanged(searched):
    base, before, modules, _ = searched
    after = base.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {name: id(module) for name, module in base.unet.named_modules()} == modules  # the originals are back


def test_cap_holds(fresh_base):
    result = find_concept_neurons(fresh_base(), photos(), cones_config(steps=2, cones_max_neurons=7))
    assert sum(i.numel() for i in neurons_of(result.tensors).values()) == 7
    assert result.concept.settings["neuron_limit"] == 7


def test_default_cap_is_the_share_on_a_small_model(searched):
    base, _, _, result = searched
    searched_weights = sum(layer.weight.numel() for layer in kv_modules(base.unet).values())
    assert result.concept.settings["searched_weights"] == searched_weights
    assert result.concept.settings["neurons"] == neuron_limit(searched_weights, 20_000) == int(MAX_SHUT_FRACTION * searched_weights)


def test_progress_every_pass(fresh_base):
    seen = []
    find_concept_neurons(fresh_base(), photos(), cones_config(steps=3), callback=seen.append)
    assert [p.step for p in seen] == [1, 2, 3] and all(p.total == 3 and p.embeddings_frozen for p in seen)
    assert all(p.loss > 0 and p.eta_seconds >= 0 for p in seen)


def test_cancel_checkpoints_and_resume_equals_an_uninterrupted_run(fresh_base, tmp_path):
    config = cones_config(steps=4, cones_shrink=50.0)  # a shrink that moves the working weights, so they must be restored
    whole = find_concept_neurons(fresh_base(), photos(), config)
    cancel = threading.Event()

    def stop_after_two(progress):
        if progress.step == 2:
            cancel.set()

    base = fresh_base()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(Cancelled, match="cancelled at pass 2 of 4"):
        find_concept_neurons(base, photos(), config, callback=stop_after_two, cancel=cancel, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())  # restored on cancel too
    resumed = find_concept_neurons(base, photos(), config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.losses == whole.losses
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_shut_neurons_zeroes_and_restores(base):
    layers = kv_modules(base.unet)
    name = next(iter(layers))
    weight = layers[name].weight
    saved = weight.detach().clone()
    with shut_neurons(base.unet, {name: torch.tensor([0, 3], dtype=torch.int32)}):
        assert weight.view(-1)[0] == 0 and weight.view(-1)[3] == 0 and weight.view(-1)[1] == saved.view(-1)[1]
    assert torch.equal(weight, saved)


def test_working_linear_computes_in_the_layer_dtype_with_fp32_gradients():
    linear = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    working = WorkingLinear(linear)
    out = working(torch.randn(2, 4, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and working.weight.dtype == torch.float32 and working.weight.grad.dtype == torch.float32


def test_found_neurons_lower_the_concept_loss_more_than_random_ones(fresh_base):
    """Quality: shutting the neurons lowers the diffusion loss of the concept's own batches (same
    augmentation, noise and timesteps) below the base's and below as many random K/V entries shut.
    Broken attribution fails it: flipping the scores' sign, or ranking by random or positional
    scores, was each planted once and each failed both bounds or the first."""
    base = fresh_base()
    config = cones_config(steps=8)
    found = neurons_of(find_concept_neurons(base, photos(), config).tensors)
    count = sum(i.numel() for i in found.values())
    layers = kv_modules(base.unet)

    def loss(neurons):
        values = replay_losses(base, photos(), config, neurons=neurons)
        return sum(values) / len(values)

    base_loss, found_loss = loss({}), loss(found)
    generator = torch.Generator().manual_seed(1)
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    random_losses = []
    for _ in range(3):
        scores = {name: torch.rand(size, generator=generator) for name, size in sizes.items()}
        random_losses.append(loss(top_neurons(scores, count)))
    assert found_loss < base_loss - 0.005, (found_loss, base_loss)
    assert found_loss < min(random_losses) - 0.005, (found_loss, random_losses)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("overrides, message", [
    (dict(kind="edlora"), "needs kind 'cones', got 'edlora'"),
    (dict(cones_shrink=-1.0), "cones_shrink must be 0 or more"),
    (dict(cones_max_neurons=0), "cones_max_neurons must be a positive integer"),
])
def test_bad_settings_are_refused_before_the_search(base, overrides, message):
    with pytest.raises(UserError, match=message):
        find_concept_neurons(base, photos(), cones_config(**overrides))


def test_bad_tensors_are_refused(base):
    module = next(iter(kv_modules(base.unet)))
    good = {"embeddings": torch.zeros(2, 1, 32), f"unet.{module}.shut": torch.tensor([1, 4], dtype=torch.int32)}
    check_cones_tensors(good, base)
    size = kv_modules(base.unet)[module].weight.numel()
    cases = [
        ({**good, "embeddings": torch.zeros(2, 16, 32)}, r"embeddings' of shape \[2, 1, d\]"),
        ({**good, f"unet.{module}.shut": torch.tensor([4, 1], dtype=torch.int32)}, "not sorted and unique"),
        ({**good, f"unet.{module}.shut": torch.tensor([1, 4])}, "expected 1-d int32"),
        ({**good, f"unet.{module}.shut": torch.tensor([1, size], dtype=torch.int32)}, f"outside the layer's {size} weights"),
        ({"embeddings": torch.zeros(2, 1, 32), "unet.conv_in.shut": torch.tensor([1], dtype=torch.int32)}, "not an attention K/V"),
        ({**good, "unet.x.lora_A.weight": torch.zeros(1)}, "unexpected tensor"),
    ]
    for tensors, message in cases:
        with pytest.raises(UserError, match=message):
            check_cones_tensors(tensors, base)


# ---------------------------------------------------------------------------------------------
# Several concepts


def test_merge_shuts_the_union(base):
    layers = kv_modules(base.unet)
    first, second = list(layers)[:2]
    words = torch.zeros(2, 1, 32)
    a = {"embeddings": words, f"unet.{first}.shut": torch.tensor([0, 2, 5], dtype=torch.int32)}
    b = {"embeddings": words, f"unet.{first}.shut": torch.tensor([2, 7], dtype=torch.int32),
         f"unet.{second}.shut": torch.tensor([3], dtype=torch.int32)}
    updates, report = merge_cones(base, ["a", "b"], [a, b])
    assert set(updates) == {f"unet.{first}", f"unet.{second}"}
    w0 = layers[first].weight.detach()
    assert torch.equal(updates[f"unet.{first}"], shut_delta(w0, torch.tensor([0, 2, 5, 7])))
    merged = (w0 + updates[f"unet.{first}"]).view(-1)
    assert merged[[0, 2, 5, 7]].abs().sum() == 0 and torch.equal(merged[1], w0.view(-1)[1])
    assert updates[f"unet.{second}"].dtype == torch.float32 and updates[f"unet.{second}"].shape == layers[second].weight.shape
    assert report["method"] == "cones" and report["neurons"] == {"a": 3, "b": 3}
    assert report["union"] == 5 and report["shared"] == 1
    # b's own shut set in `second` is all of the merge there: no error; a gets b's neurons there
    assert report["layers"][f"unet.{second}"]["method"]["b"] == 0.0 and report["layers"][f"unet.{second}"]["method"]["a"] > 0
    assert set(report["summary"]) == {"a", "b"}
    with pytest.raises(UserError, match="concept <b>: .*not sorted"):
        merge_cones(base, ["a", "b"], [a, {**b, f"unet.{second}.shut": torch.tensor([3, 1], dtype=torch.int32)}])
