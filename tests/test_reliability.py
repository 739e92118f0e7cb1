"""Hostile and broken inputs, interrupted writes, and properties checked over many random cases."""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import moslora
from moslora.io.native import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError
from tiny import make_layer, perturb

LOADER_ERRORS = (AdapterFormatError, FileNotFoundError)


def saved_adapter(tmp_path, mixer="kaiming"):
    base, x = make_layer("linear")
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, mixer=mixer, target_modules=["0"]))
    perturb(model)
    moslora.save_adapter(model, tmp_path / "adapter")
    return base, model, x, tmp_path / "adapter"


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not list(moslora.adapter_layers(model))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


# ----- wrong base, corrupt files ----------------------------------------------------------------


def test_an_adapter_for_another_base_names_the_key_and_both_shapes_and_changes_nothing(tmp_path):
    _, _, _, path = saved_adapter(tmp_path)
    other = nn.Sequential(nn.Linear(12, 11))
    before = state_of(other)
    with pytest.raises(AdapterFormatError, match=r"tensor '0.lora_B' has shape \(10, 4\) but this model needs \(11, 4\)"):
        moslora.load_adapter(other, path)
    assert_untouched(other, before)


def test_an_adapter_for_a_layer_the_model_lacks_is_named(tmp_path):
    _, _, _, path = saved_adapter(tmp_path)
    other = nn.Sequential(nn.ReLU())
    with pytest.raises(AdapterFormatError, match=r"layer '0' of this model is a ReLU|does not have"):
        moslora.load_adapter(other, path)


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_a_truncated_weights_file_is_a_clear_error(tmp_path, cut):
    base, _, _, path = saved_adapter(tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: cut if cut >= 0 else len(data) - 3])
    before = state_of(base)
    with pytest.raises(AdapterFormatError, match=r"adapter_model.safetensors"):
        moslora.load_adapter(base, path)
    assert_untouched(base, before)


def test_an_extra_tensor_is_refused_never_dropped(tmp_path):
    base, _, _, path = saved_adapter(tmp_path, mixer=None)
    description = json.loads((path / CONFIG_NAME).read_text())
    tensors = moslora.read_adapter(path)[1]
    tensors["0.lora_M"] = torch.eye(4)  # a mixer the config does not declare
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"moslora_adapter_config": json.dumps(description)})
    with pytest.raises(AdapterFormatError, match=r"tensor '0.lora_M' does not belong"):
        moslora.load_adapter(base, path)


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda d: d["config"].update(r=-4), "r must be a positive integer"),
        (lambda d: d["config"].update(rank=4), "unknown MoSLoRAConfig field"),
        (lambda d: d["config"].update(alpha="big"), "alpha"),
        (lambda d: d["config"].update(r=10**9), "r=1000000000 is larger than any real adapter"),
        (lambda d: d.update(modules={"../../etc/passwd": d["modules"]["0"]}), "invalid module name '../../etc/passwd'"),
        (lambda d: d.update(modules_to_save=["../x"]), "invalid module name '../x'"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(format="someone-else"), "not a moslora adapter"),
        (lambda d: d.update(modules=[]), "'modules' must be a JSON object"),
        (lambda d: d["modules"]["0"]["shapes"].pop("lora_M"), "field 'modules.0.shapes' has"),
        (lambda d: d["modules"]["0"].update(kind="lstm"), "kind 'lstm' is not one of"),
        (lambda d: d["modules"]["0"]["shapes"].update(lora_A=[5, 12]), "does not have rank r=4"),
    ],
)
def test_bad_config_fields_are_named(tmp_path, edit, words):
    base, _, _, path = saved_adapter(tmp_path)
    description = json.loads((path / CONFIG_NAME).read_text())
    edit(description)
    tensors = moslora.read_adapter(path)[1]
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"moslora_adapter_config": json.dumps(description)})
    (path / CONFIG_NAME).write_text(json.dumps(description))
    before = state_of(base)
    with pytest.raises(AdapterFormatError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        moslora.load_adapter(base, path)
    assert_untouched(base, before)


def test_a_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"0.lora_A": Payload()}, folder / "adapter_model.bin")
    (folder / CONFIG_NAME).write_text(json.dumps({"format": "moslora", "format_version": 1}))
    base, _ = make_layer("linear")
    with pytest.raises(AdapterFormatError, match="pickle.*allow_pickle=True"):
        moslora.load_adapter(base, folder)
    assert not marker.exists()


# ----- fuzzing the loader -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=st.binary(max_size=300), config=json_values)
def test_random_bytes_and_json_give_only_documented_errors(tmp_path, weights, config):
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    base, _ = make_layer("linear")
    before = state_of(base)
    with pytest.raises(LOADER_ERRORS):
        moslora.load_adapter(base, folder)
    assert_untouched(base, before)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_valid_file_with_random_damage_loads_exactly_or_fails_cleanly(tmp_path, data):
    folder = tmp_path / "damaged"
    if not folder.exists():
        base, model, _, path = saved_adapter(tmp_path)
        path.rename(folder)
    blob = bytearray((folder / WEIGHTS_NAME).read_bytes())
    original = bytes(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    (folder / WEIGHTS_NAME).write_bytes(bytes(blob))
    base, _ = make_layer("linear")
    before = state_of(base)
    try:
        moslora.load_adapter(base, folder)
    except LOADER_ERRORS:
        assert_untouched(base, before)
    else:
        # It loaded: the adapter holds exactly what the damaged file holds (safetensors has no
        # checksum, so a flipped byte in a tensor is a different value, not an error), and the base
        # weights are the base's.
        on_disk = load_file(folder / WEIGHTS_NAME)
        loaded = moslora.adapter_state_dict(base)
        assert loaded.keys() == on_disk.keys()
        assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)
        assert torch.equal(base[0].base_layer.weight, before["0.weight"])
    finally:
        (folder / WEIGHTS_NAME).write_bytes(original)


def test_a_header_claiming_a_huge_tensor_is_refused_before_reading(tmp_path):
    base, _, _, path = saved_adapter(tmp_path)
    header = {"0.lora_A": {"dtype": "F32", "shape": [4, 2**40], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    (path / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(AdapterFormatError):
        moslora.load_adapter(base, path)


# ----- interrupted writes -----------------------------------------------------------------------


def test_saved_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    _, _, _, path = saved_adapter(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


SAVER = textwrap.dedent(
    """
    import sys, torch, moslora
    from torch import nn
    model = moslora.inject(nn.Sequential(nn.Linear(256, 256)), moslora.MoSLoRAConfig(r=32, target_modules=["0"]))
    i = 0
    while True:
        with torch.no_grad():
            for _, p in model[0].adapter_parameters():
                p.fill_(float(i))
        # A config that changes with every version, so a torn pair would show.
        model._moslora_config = model._moslora_config.replace(alpha=float(i + 1))
        moslora.save_adapter(model, sys.argv[1])
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_one_complete_version(tmp_path):
    folder = tmp_path / "adapter"
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(2 + trial):  # let a few complete saves happen first
            proc.stdout.readline()
        time.sleep(0.003 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        description, tensors = moslora.read_adapter(folder)
        values = {float(v) for t in tensors.values() for v in t.unique()}
        assert len(values) == 1, f"a mix of versions: {values}"
        assert description.config.alpha == values.pop() + 1
        base = nn.Sequential(nn.Linear(256, 256))
        moslora.load_adapter(base, folder)


# ----- properties over random layers ------------------------------------------------------------

KINDS = st.sampled_from(["linear", "conv1d", "conv2d", "embedding"])
MIXER_KINDS = st.sampled_from([None, "kaiming", "orthogonal", "identity", "two-subspace"])


def random_layer(kind, n_in, n_out):
    if kind == "linear":
        return nn.Linear(n_in, n_out), torch.randn(2, n_in)
    if kind == "conv1d":
        return nn.Conv1d(n_in, n_out, 3, padding=1), torch.randn(2, n_in, 5)
    if kind == "conv2d":
        return nn.Conv2d(n_in, n_out, 2), torch.randn(2, n_in, 4, 4)
    return nn.Embedding(n_in + 1, n_out), torch.randint(0, n_in + 1, (2, 3))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=KINDS, n_in=st.integers(1, 12), n_out=st.integers(1, 12), r=st.integers(1, 6), mixer=MIXER_KINDS,
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_merge_unmerge_is_the_identity_and_save_load_too(tmp_path, kind, n_in, n_out, r, mixer, dtype, seed):
    if mixer == "two-subspace" and r % 2:
        r += 1
    torch.manual_seed(seed)
    layer, x = random_layer(kind, n_in, n_out)
    base = nn.Sequential(layer).to(dtype)
    x = x.to(dtype) if x.dtype.is_floating_point else x
    config = moslora.MoSLoRAConfig(r=r, alpha=2 * r, mixer=mixer, target_modules=["0"], adapter_dtype="base")
    model = moslora.inject(copy.deepcopy(base), config)
    perturb(model, seed=seed)
    out = model(x)
    weight = model[0].base_layer.weight.detach().clone()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    moslora.merge(model, safe=True)
    torch.testing.assert_close(model(x), out, atol=tol * 10, rtol=tol * 10)
    moslora.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, weight, atol=tol, rtol=0)
    folder = tmp_path / f"prop-{seed}"
    moslora.save_adapter(model, folder)
    loaded = moslora.load_adapter(copy.deepcopy(base), folder)
    saved, restored = moslora.adapter_state_dict(model), moslora.adapter_state_dict(loaded)
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    torch.testing.assert_close(loaded(x), out, atol=tol * 10, rtol=tol * 10)
