"""The library API: attach, step, finalize, compile, save/load."""

import pytest
import torch
from torch.nn.utils import parametrize

from prunekit import CheckpointError, PrunekitError, SelectionError
from prunekit.pipeline import Pipeline


def test_attach_selects_conv_and_linear_skips_grouped(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    infos = pipe.attach(small_net)
    assert [i.name for i in infos] == ["conv1", "conv2", "fc"]
    assert infos[1].stride == (2, 2) and infos[2].kind == "linear"
    assert all(parametrize.is_parametrized(small_net.get_submodule(i.name), "weight") for i in infos)


def test_include_exclude_and_first_last(fake_components, write_registry, small_net):
    path = write_registry(
        """
        [pipelines.p]
        schedule = "once"
        score = "abs"
        select = "topk"
        [pipelines.p.params]
        exclude = ["conv2"]
        keep_first_dense = true
        """
    )
    pipe = Pipeline.load("p", path)
    assert [i.name for i in pipe.attach(small_net)] == ["fc"]


def test_empty_selection_is_a_clear_error(fake_components, write_registry, small_net):
    path = write_registry('[pipelines.p]\nschedule = "once"\nscore = "abs"\nselect = "topk"\n[pipelines.p.params]\ninclude = ["nothing*"]\n')
    with pytest.raises(SelectionError, match="selects no layer"):
        Pipeline.load("p", path).attach(small_net)


def test_no_prunable_layer(fake_components, basic_registry):
    with pytest.raises(SelectionError, match="no prunable layer"):
        Pipeline.load("basic", basic_registry).attach(torch.nn.Sequential(torch.nn.ReLU()))


def test_schedule_drives_masks(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("nokernel", basic_registry)
    pipe.attach(small_net)
    seen = []
    for step in range(4):
        d = pipe.step(step, total_steps=4)
        seen.append((d.update, round(pipe.sparsity(), 2)))
    assert [u for u, _ in seen] == [True, True, True, False]
    assert seen[0][1] == pytest.approx(0.2, abs=0.01) and seen[2][1] == pytest.approx(0.6, abs=0.01)
    assert seen[3][1] == seen[2][1]
    assert pipe.position == 4


def test_hard_mask_keeps_pruned_weights_zero_under_optimizers(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    pipe.step(0)
    masks = {n: st.selection.mask for n, st in pipe.layers.items()}
    for opt in (torch.optim.Adam(small_net.parameters(), 1e-2), torch.optim.SGD(small_net.parameters(), 0.1, momentum=0.9, weight_decay=0.1)):
        for _ in range(3):
            opt.zero_grad()
            small_net(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
    for name, mask in masks.items():
        w = small_net.get_submodule(name).weight
        assert torch.all(w[~mask] == 0)
        assert torch.any(w[mask] != 0)


def test_soft_mask_passes_gradient_and_decay(fake_components, write_registry):
    path = write_registry('[pipelines.p]\nschedule = "once"\nscore = "abs"\nselect = "topk"\n[pipelines.p.params]\nsoft = true\ndecay = 0.5\nsparsity = 0.5\n')
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(lin)
    pipe = Pipeline.load("p", path)
    pipe.attach(model)
    pipe.step(0)
    mask = pipe.layers["0"].selection.mask
    x = torch.randn(3, 6)
    model(x).sum().backward()
    raw = lin.parametrizations.weight.original
    expected = x.sum(0).expand(4, 6) + 0.5 * (~mask) * raw.detach()
    assert torch.allclose(raw.grad, expected, atol=1e-6)
    assert torch.all(lin.weight[~mask] == 0)


def test_finalize_and_compile_keep_the_function(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    pipe.step(0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        masked = small_net(x)
        pipe.finalize()
        assert not parametrize.is_parametrized(small_net.conv1, "weight")
        baked = small_net(x)
        states = pipe.compile()
        compiled = small_net(x)
    assert torch.equal(masked, baked)
    assert torch.allclose(compiled, masked, atol=1e-6)
    assert all(st.compiled.kernel == "test-dense" for st in states)
    assert type(small_net.fc).__name__ == "Functional"


def test_save_load_roundtrip_and_resume(fake_components, basic_registry, small_net, tmp_path):
    pipe = Pipeline.load("nokernel", basic_registry)
    pipe.attach(small_net)
    pipe.step(0)
    pipe.step(1)
    pipe.save(tmp_path / "state.pt")
    assert not list(tmp_path.glob(".state.pt.*"))  # no temp file left behind
    torch.manual_seed(1)
    other = type(small_net)()
    pipe2 = Pipeline.load("nokernel", basic_registry)
    pipe2.attach(other)
    pipe2.load_state(tmp_path / "state.pt")
    assert pipe2.position == 2
    for name in pipe.layers:
        assert torch.equal(pipe.layers[name].selection.mask, pipe2.layers[name].selection.mask)
    assert pipe2.sparsity() == pytest.approx(pipe.sparsity())
    # resuming continues the schedule where it stopped
    assert pipe2.step().step == 2


def test_corrupt_and_foreign_state(fake_components, basic_registry, small_net, tmp_path):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable prunekit state"):
        pipe.load_state(bad)
    with pytest.raises(CheckpointError, match="no such pruning state"):
        pipe.load_state(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a prunekit-state/2 file"):
        pipe.load_state(tmp_path / "other.pt")


def test_prune_rejects_bad_sparsity(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    with pytest.raises(PrunekitError, match=r"outside \[0, 1\)"):
        pipe.prune(1.0)


def test_unattached_pipeline_says_what_to_do(fake_components, basic_registry):
    with pytest.raises(PrunekitError, match="attach"):
        Pipeline.load("basic", basic_registry).step(0)


def test_string_padding_is_resolved(fake_components, basic_registry):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding="same", dilation=2), torch.nn.Conv2d(4, 4, 3, padding="valid"))
    infos = Pipeline.load("basic", basic_registry).attach(model)
    assert infos[0].padding == (4, 4) and infos[1].padding == (0, 0)
    with pytest.raises(SelectionError, match="asymmetrically"):
        Pipeline.load("basic", basic_registry).attach(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, padding="same")))


def test_compile_with_example_records_input_shapes(fake_components, basic_registry, small_net):
    pipe = Pipeline.load("basic", basic_registry)
    pipe.attach(small_net)
    pipe.step(0)
    pipe.compile(example=torch.randn(2, 3, 8, 8))
    assert pipe.layers["conv1"].info.input_shape == (2, 3, 8, 8)
    assert pipe.layers["conv2"].info.input_shape == (2, 8, 8, 8)
    assert pipe.layers["fc"].info.input_shape == (2, 256)


def test_non_zero_padding_modes_stay_dense(fake_components, basic_registry):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(4, 4, 3))
    assert [i.name for i in Pipeline.load("basic", basic_registry).attach(model)] == ["1"]
