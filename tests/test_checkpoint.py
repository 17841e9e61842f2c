"""The checkpoint file: weights and metadata written together and read back exactly, the
plain model saved from inside DDP/compile wrappers, and one-line errors for files that are not
segcli checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segcli.checkpoint import (
    CheckpointInfo,
    load_model,
    model_build_config,
    model_options,
    read_checkpoint,
    save_checkpoint,
)
from segcli.errors import UsageError
from segcli.models import build_model
from tests.helpers import randomise_attention


def small_info(built: nn.Module, **overrides) -> CheckpointInfo:
    settings = {
        "model": model_build_config(built),
        "classes": {"kind": "index", "names": ["a", "b"]},
        "input_size": (48, 64),
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "ignore_index": 250,
        "config": {"lr": 0.01, "loss": "ce"},
        "epoch": 7,
        "metrics": {"miou": 0.5},
        "write_id": "abc",
        **overrides,
    }
    return CheckpointInfo(**settings)


def test_weights_and_metadata_read_back_exactly(tmp_path):
    # Catches a field dropped or defaulted on either side of the JSON (the input size, the
    # normalisation, the ignore index, the epoch, the write id that pairs a training state),
    # or weights saved in another order or dtype.
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", 3, 2).eval()
    info = small_info(model)
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, model, info)
    state, read = read_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    assert read.to_json() == info.to_json()
    assert (read.input_size, read.mean, read.std) == ((48, 64), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert (read.ignore_index, read.epoch, read.write_id) == (250, 7, "abc")
    assert read.config == {"lr": 0.01, "loss": "ce"} and read.metrics == {"miou": 0.5}
    assert read.class_names == ["a", "b"] and not read.binary and read.scored_classes == 2
    rebuilt, _ = load_model(path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_the_plain_model_is_saved_from_inside_a_wrapper(tmp_path):
    # Catches weights saved with DDP's "module." or torch.compile's "_orig_mod." prefixes,
    # which load_model could not put back into a plain model.
    model = build_model("unet", "none", 1, 1, up="bilinear").eval()

    class Wrapper(nn.Module):  # holds the model as DDP does, under .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    compiled_like = nn.Module()
    compiled_like._orig_mod = model
    for wrapped in (Wrapper(model), compiled_like):
        path = tmp_path / "w.safetensors"
        save_checkpoint(path, wrapped, small_info(model, classes={"kind": "binary"}))
        state, info = read_checkpoint(path)
        assert state.keys() == model.state_dict().keys()
        assert info.binary and info.scored_classes == 2


def test_weight_fetching_options_are_not_stored_and_old_unet_files_mean_the_published_decoder():
    # Catches a checkpoint that would fetch ImageNet weights again when rebuilt (pretrained
    # stored), and a UNet file from before the `fast` decoder rebuilt with the new default.
    model = build_model("unet", "resnet18", 3, 2)
    model.build_config["options"]["pretrained"] = True
    model.build_config["options"]["backbone_weights"] = "/gone.pth"
    stored = model_build_config(model)
    assert "pretrained" not in stored["options"] and "backbone_weights" not in stored["options"]
    assert model.build_config["options"]["pretrained"] is True  # the model's own is untouched
    legacy = small_info(model, model={**stored, "options": {"decoder_channels": None}})
    assert model_options(legacy)["decoder_channels"] == "published"
    other = small_info(model, model={**stored, "arch": "unetpp", "options": {"x": None}})
    assert model_options(other) == {"x": None}


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (lambda path: path.write_bytes(b"not a checkpoint"), "not a safetensors checkpoint"),
        (lambda path: save_file({"w": torch.zeros(1)}, str(path)), "without segcli metadata"),
        (
            lambda path: save_file(
                {"w": torch.zeros(1)}, str(path), metadata={"segcli": json.dumps({"a": 1})}
            ),
            "unknown checkpoint format",
        ),
        (
            lambda path: save_file({"w": torch.zeros(1)}, str(path), metadata={"segcli": "{"}),
            "unreadable segcli metadata",
        ),
    ],
)
def test_files_that_are_not_segcli_checkpoints_are_one_line_errors(tmp_path, write, fragment):
    # Catches a foreign or damaged file surfacing as a safetensors/JSON traceback.
    path = tmp_path / "x.safetensors"
    write(path)
    with pytest.raises(UsageError) as raised:
        read_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message
    with pytest.raises(UsageError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_a_model_with_non_default_options_rebuilds_from_its_checkpoint(tmp_path):
    # Catches load_model building the architecture's defaults instead of the stored options
    # (bilinear upsampling and a custom decoder would not fit the default model's weights).
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", 3, 2, up="bilinear", decoder_channels="64,32,16,8")
    path = tmp_path / "custom.safetensors"
    save_checkpoint(path, model.eval(), small_info(model))
    rebuilt, _ = load_model(path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    mismatched = small_info(build_model("unet", "resnet18", 3, 2))
    save_checkpoint(path, model, mismatched)  # weights of one model under another's description
    with pytest.raises(UsageError) as raised:
        load_model(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: weights do not fit unet (") and "\n" not in message
    assert "Missing key" in message or "Unexpected key" in message or "size mismatch" in message


@pytest.mark.parametrize("attention", ["none", "cbam"])
def test_fast_decoder_files_rebuild_with_the_attention_they_were_trained_with(tmp_path, attention):
    # Catches a fast-decoder checkpoint written before CBAM became its default (options say
    # attention "none") rebuilt with today's default, whose CBAM weights it does not have, and
    # a default-built file that loses its CBAM on the way back.
    # Random gates: CBAM's open start is the identity, which a lost CBAM would match.
    model = randomise_attention(build_model("unet", "resnet18", 3, 2, attention=attention))
    model.eval()
    assert model.build_config["options"]["attention"] == attention
    path = tmp_path / "fast.safetensors"
    save_checkpoint(path, model, small_info(model))
    rebuilt, info = load_model(path)
    assert info.model["options"]["attention"] == attention
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_a_checkpoint_missing_one_tensor_names_it(tmp_path):
    # Catches the error quoting torch's header line ("Error(s) in loading state_dict") when
    # torch's report has only one detail line, as it has for a single missing tensor.
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    model = build_model("unet", "resnet18", 3, 2)
    save_checkpoint(path, model.eval(), small_info(model))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UsageError) as raised:
        load_model(path)
    assert "Missing key(s)" in str(raised.value) and dropped in str(raised.value)


def test_metadata_of_an_older_file_reads_with_the_defaults_it_was_written_under():
    # Catches defaults for absent keys that differ from what older versions wrote implicitly:
    # ignore index 255, empty config and metrics, epoch 0, an unknown version.
    minimal = {
        "format": "segcli-checkpoint/1",
        "model": {"arch": "unet", "backbone": "none", "in_channels": 3, "classes": 2},
        "classes": {"kind": "index", "names": ["a", "b"]},
        "input_size": [32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    info = CheckpointInfo.from_json(json.dumps(minimal))
    assert (info.ignore_index, info.config, info.metrics, info.epoch) == (255, {}, {}, 0)
    assert info.version == "unknown" and info.write_id is None and info.inference is None
    with pytest.raises(ValueError, match="unknown checkpoint format 'other/2'"):
        CheckpointInfo.from_json(json.dumps({**minimal, "format": "other/2"}))


def test_metadata_is_strict_json(tmp_path):
    # Catches NaN written into the metadata (strict JSON readers, and other languages'
    # safetensors libraries, refuse it) and paths in the config left unserialisable.
    model = build_model("unet", "none", 3, 2)
    info = small_info(model, config={"data": tmp_path})
    assert json.loads(info.to_json())["config"] == {"data": str(tmp_path)}
    with pytest.raises(ValueError):
        small_info(model, metrics={"miou": float("nan")}).to_json()
