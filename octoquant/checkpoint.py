"""Quantized checkpoints: safetensors only (never pickle), 1 byte per int8 weight, and for Hugging Face models a
folder that the compressed-tensors format (what vLLM serves) reads.

A checkpoint is a folder:
    model.safetensors   every tensor of the quantized model once (tied tensors stored once, see "aliases")
    octoquant.json      {"format_version", "modules": the octoquant modules and structural swaps per name,
                         "aliases", "float_bias": float layers that gained a bias (BatchNorm folding)}
    config.json         Hugging Face models only: the model config + `quantization_config` (compressed-tensors)

QLinear tensors use compressed-tensors names and shapes: `<layer>.weight` int8 (N, K), `<layer>.weight_scale`
(N, 1) or (N, G) for groups, `<layer>.input_scale` (1,) and `<layer>.input_zero_point` (1,) int8 for static
activations (uint8 codes stored shifted by -128, the int8 convention of compressed-tensors).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import QDtype, QuantMode
from .convert import _as_quantizable_layers, _keep_torch_transformer_layers_on_modules, hf_embeddings
from .hf import is_causal_lm_architecture
from .nn import QConv2d, QEmbedding, QLinear, chain_convolutions
from .nn._base import QuantizedModule
from .transforms.equalize import ChannelClamp

log = logging.getLogger("octoquant.checkpoint")

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "octoquant.json"
HF_CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked (the message names the file and the tensor)."""


# --------------------------------------------------------------------------------------------------------------
# module specs: what `load` must build at each name before the tensors go in


def _module_spec(m: nn.Module) -> dict | None:
    if isinstance(m, QLinear):
        return {
            "type": "QLinear",
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "mode": m.mode.value,
            "group_size": m.group_size,
            "input_dtype": m.input_dtype.value,
            "outlier_threshold": m.outlier_threshold,
        }
    if isinstance(m, QConv2d):
        return {
            "type": "QConv2d",
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
            "mode": m.mode.value,
            "input_dtype": m.input_dtype.value,
            "output_clamp": m.output_clamp is not None,
        }
    if isinstance(m, QEmbedding):
        return {
            "type": "QEmbedding",
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "dtype": str(m.dtype).removeprefix("torch."),
            "group_size": m.group_size,
            "embed_scale": m.embed_scale,
        }
    if isinstance(m, ChannelClamp):
        return {"type": "ChannelClamp", "channels": m.upper.numel()}
    if type(m) is nn.Identity:
        return {"type": "Identity"}
    return None


def _build(spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind == "QLinear":
        return QLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bias"],
            spec["mode"],
            spec["group_size"],
            spec["input_dtype"],
            outlier_threshold=spec.get("outlier_threshold"),
        )
    if kind == "QConv2d":
        q = QConv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            tuple(spec["stride"]),
            tuple(spec["padding"]),
            tuple(spec["dilation"]),
            spec["groups"],
            spec["bias"],
            spec["input_dtype"],
            mode=spec["mode"],
        )
        if spec["output_clamp"]:
            q.output_clamp = torch.zeros(spec["out_channels"])
        return q
    if kind == "QEmbedding":
        dtype = getattr(torch, spec["dtype"], None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"QEmbedding dtype {spec['dtype']!r} in {CONFIG_NAME} is not a float dtype")
        return QEmbedding(
            spec["num_embeddings"], spec["embedding_dim"], dtype, spec.get("group_size"), spec.get("embed_scale", 1.0)
        )
    if kind == "ChannelClamp":
        return ChannelClamp(torch.zeros(spec["channels"]))
    if kind == "Identity":
        return nn.Identity()
    raise CheckpointError(f"unknown module type {kind!r} in {CONFIG_NAME}")


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        getattr(parent, child)
    except AttributeError:
        raise CheckpointError(
            f"the model has no module {name!r}: is it the architecture this checkpoint was saved from?"
        ) from None
    setattr(parent, child, new)


# --------------------------------------------------------------------------------------------------------------
# QLinear tensors <-> compressed-tensors names and shapes


def _to_file(name: str, t: torch.Tensor, owner: nn.Module | None) -> torch.Tensor:
    if isinstance(owner, QLinear):
        leaf = name.rpartition(".")[2]
        if leaf == "weight_scale" and t.dim() == 1:
            return t.reshape(-1, 1)
        if leaf == "input_scale":
            return t.reshape(1)
        if leaf == "input_zero_point":
            shift = 128 if owner.input_dtype is QDtype.UINT8 else 0
            return (t.reshape(1) - shift).to(torch.int8)
    return t


def _from_file(name: str, t: torch.Tensor, owner: nn.Module | None) -> torch.Tensor:
    if isinstance(owner, QLinear):
        leaf = name.rpartition(".")[2]
        if leaf == "weight_scale" and owner.group_size is None:
            return t.reshape(-1)
        if leaf == "input_scale":
            return t.reshape(())
        if leaf == "input_zero_point":
            shift = 128 if owner.input_dtype is QDtype.UINT8 else 0
            return t.reshape(()).to(torch.int32) + shift
    return t


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    mod_name = key.rpartition(".")[0]
    try:
        return model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None


# --------------------------------------------------------------------------------------------------------------
# compressed-tensors quantization_config


def _ct_scheme(spec: dict) -> dict:
    """The compressed-tensors scheme of one QLinear spec (see `_module_spec`)."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
    if spec["group_size"] is None:
        weights.update(strategy="channel", group_size=None)
    else:
        weights.update(strategy="group", group_size=spec["group_size"])
    mode = QuantMode.parse(spec["mode"])
    if mode is QuantMode.W8A16:
        acts = None
    elif mode is QuantMode.W8A8_DYNAMIC:
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    else:
        sym = QDtype.parse(spec["input_dtype"]) is QDtype.INT8
        acts = {"num_bits": 8, "type": "int", "symmetric": sym, "strategy": "tensor", "dynamic": False}
    return {"weights": weights, "input_activations": acts, "output_activations": None}


def ct_config_from_specs(specs: dict[str, dict], float_linears: list[str]) -> dict:
    """`quantization_config` (compressed-tensors) from octoquant's module specs and the Linear layers kept float."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, spec in specs.items():
        if spec["type"] == "QLinear":
            scheme = _ct_scheme(spec)
            groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(name)
    if not groups:
        raise CheckpointError("the model has no quantized Linear layers: nothing for a compressed-tensors config")
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = {"targets": targets, **scheme}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def compressed_tensors_config(model: nn.Module) -> dict:
    """The `quantization_config` of a Hugging Face config.json for this quantized model (compressed-tensors)."""
    specs = {name: spec for name, m in model.named_modules() if isinstance(m, QLinear) and (spec := _module_spec(m))}
    floats = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ct_config_from_specs(specs, floats)


# --------------------------------------------------------------------------------------------------------------
# save


def _prepare_out(path: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside `path` (same filesystem: the final rename is atomic)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _publish(tmp: Path, path: Path) -> None:
    """Replace `path` by the finished `tmp` folder: a reader sees the old checkpoint or the new, never a mix."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a quantized model as a checkpoint folder (see the module docstring).

    Args:
        model: a model returned by `oq.quantize` (any mix of octoquant and float modules).
        path: the folder to create; refused if it exists unless `overwrite=True`.

    Returns:
        The folder's path. Hugging Face models also get `config.json` with a compressed-tensors
        `quantization_config`, so `transformers` + `compressed-tensors` (and vLLM) can read the folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    modules = {name: spec for name, m in model.named_modules() if name and (spec := _module_spec(m)) is not None}
    if not any(s["type"] in ("QLinear", "QConv2d") for s in modules.values()):
        raise CheckpointError("the model has no octoquant layers: quantize it first (oq.quantize)")
    float_bias = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QuantizedModule) and m.bias is not None
    ]
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple, str] = {}
    state = model.state_dict(keep_vars=False)
    # a tensor shared by a QLinear and something else (a tied QEmbedding) is stored under the QLinear's name:
    # compressed-tensors readers find `lm_head.weight` and tie the embedding to it
    order = sorted(state, key=lambda k: not isinstance(_owner(model, k), QLinear))
    for key in order:
        t = state[key]
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in first_by_storage:
            aliases[key] = first_by_storage[ident]
            continue
        first_by_storage[ident] = key
        tensors[key] = _to_file(key, t.detach(), _owner(model, key)).contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "modules": modules,
        "aliases": aliases,
        "float_bias": float_bias,
    }
    hf_config = getattr(model, "config", None)
    tmp = _prepare_out(path, overwrite)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "octoquant_format": str(FORMAT_VERSION)})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            cfg = hf_config.to_dict()
            cfg["architectures"] = [type(model).__name__]  # what `load` (and transformers) instantiate
            if not cfg.get("dtype") and not cfg.get("torch_dtype"):  # e.g. a model cast with .to(torch.bfloat16)
                cfg["dtype"] = _float_dtype_name(model)
            if any(isinstance(m, QLinear) for m in model.modules()):
                cfg["quantization_config"] = compressed_tensors_config(model)
            in_emb, out_emb = hf_embeddings(model)
            if isinstance(out_emb, QuantizedModule) and not isinstance(in_emb, QEmbedding):
                cfg["tie_word_embeddings"] = False  # an int8 head is its own matrix now: no tie to restore
            (tmp / HF_CONFIG_NAME).write_text(json.dumps(cfg, indent=1, default=str))
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------------------
# load


def _read_meta(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; not an octoquant checkpoint folder")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{cfg_file}: missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format_version {version} is newer than this octoquant reads ({FORMAT_VERSION}); upgrade"
        )
    return meta


def _hf_model_from_folder(path: Path) -> nn.Module:
    """The float architecture of a Hugging Face folder, parameters on the meta device (nothing allocated)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise CheckpointError(f"loading a Hugging Face folder needs transformers and accelerate: {e}") from None
    if not (path / HF_CONFIG_NAME).is_file():
        raise CheckpointError(f"{path}: no {HF_CONFIG_NAME}; pass the float architecture: oq.load(path, model)")
    cfg_dict = json.loads((path / HF_CONFIG_NAME).read_text())
    cfg_dict.pop("quantization_config", None)  # ours: the transformers loader must not try to apply it
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{path / HF_CONFIG_NAME}: no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    import transformers

    archs = config.architectures or []
    cls = getattr(transformers, archs[0], None) if archs else None
    dtype = getattr(config, "dtype", None)  # the saved model's float dtype (a bf16 model's norms stay bf16)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    kwargs = {"dtype": dtype} if isinstance(dtype, torch.dtype) and dtype.is_floating_point else {}
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not stored
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config, **kwargs)
        causal = any(is_causal_lm_architecture(a) for a in archs)
        return (AutoModelForCausalLM if causal else AutoModel).from_config(config, **kwargs)


def _ct_matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors target / ignore matching: a class name, an exact layer name, or 're:<regex>'."""
    import re

    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p == type(module).__name__:
            return True
    return False


def _ct_mode(scheme: dict, where: str) -> tuple[QuantMode, str, int | None]:
    """(mode, activation dtype, group size) of one compressed-tensors config group; unsupported -> error."""
    w = scheme.get("weights") or {}
    a = scheme.get("input_activations")
    if w.get("num_bits") != 8 or w.get("type", "int") != "int" or not w.get("symmetric", True):
        raise CheckpointError(f"{where}: only symmetric 8-bit int weights are supported, got {w}")
    strategy = w.get("strategy")
    if strategy not in ("channel", "tensor", "group"):
        raise CheckpointError(f"{where}: weight strategy {strategy!r} is not supported (channel, tensor, group)")
    group = w.get("group_size") if strategy == "group" else None
    if scheme.get("output_activations"):
        raise CheckpointError(f"{where}: quantized output activations are not supported")
    if a is None:
        return QuantMode.W8A16, QDtype.INT8.value, group
    if a.get("num_bits") != 8 or a.get("type", "int") != "int" or group is not None:
        raise CheckpointError(f"{where}: activations {a} with weights {w} are not supported")
    if a.get("dynamic"):
        if a.get("strategy") != "token" or not a.get("symmetric", True):
            raise CheckpointError(f"{where}: dynamic activations must be symmetric per-token, got {a}")
        return QuantMode.W8A8_DYNAMIC, QDtype.INT8.value, None
    if a.get("strategy") != "tensor":
        raise CheckpointError(f"{where}: static activations must be per-tensor, got {a}")
    return QuantMode.W8A8_STATIC, (QDtype.INT8 if a.get("symmetric", True) else QDtype.UINT8).value, None


def _meta_from_compressed_tensors(qcfg: dict, model: nn.Module, where: str) -> dict:
    """octoquant's module specs for a compressed-tensors `int-quantized` checkpoint written by another tool."""
    if qcfg.get("format") not in ("int-quantized", None) or qcfg.get("quantization_status") not in (
        "compressed",
        None,
    ):
        raise CheckpointError(
            f"{where}: compressed-tensors format {qcfg.get('format')!r} / status "
            f"{qcfg.get('quantization_status')!r} is not supported (int-quantized, compressed)"
        )
    ignore = qcfg.get("ignore") or []
    groups = [(g, _ct_mode(scheme, f"{where}: {g}"), scheme.get("targets") or []) for g, scheme in
              (qcfg.get("config_groups") or {}).items()]  # fmt: skip
    modules = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or _ct_matches(name, m, ignore):
            continue
        for _, (mode, in_dtype, group), targets in groups:
            if _ct_matches(name, m, targets):
                modules[name] = {
                    "type": "QLinear",
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "mode": mode.value,
                    "group_size": group,
                    "input_dtype": in_dtype,
                }
                break
    if not modules:
        raise CheckpointError(f"{where}: no Linear layer of the model matches the compressed-tensors targets")
    return {"format_version": FORMAT_VERSION, "modules": modules, "aliases": {}, "float_bias": [], "foreign": True}


def _stored_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards a Hugging Face model.safetensors.index.json names."""
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return [path / s for s in shards]
    return [path / WEIGHTS_NAME]


def _open_safetensors(file: Path):
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # SafetensorError for a bad header, truncated data, length lies
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from a checkpoint folder, with no calibration data.

    Args:
        path: a folder written by `oq.save`, or a Hugging Face folder in the compressed-tensors int8 format
            written by another tool (llm-compressor / compressed-tensors).
        model: the float architecture (its weights are ignored; it may live on the meta device). Optional for
            Hugging Face folders (built from config.json with empty weights).

    Returns:
        The quantized model in eval mode, on the CPU, its outputs bit-identical to the saved model's.

    Raises:
        CheckpointError: unreadable or inconsistent files (truncated, wrong dtype or shape, missing tensor,
            non-finite scale, format from a newer octoquant), naming the file and tensor.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / CONFIG_NAME).is_file():
        meta = _read_meta(path)
        if model is None:
            model = _hf_model_from_folder(path)
    else:
        qcfg = _hf_quantization_config(path)
        if model is None:
            model = _hf_model_from_folder(path)
        meta = _meta_from_compressed_tensors(qcfg, model, str(path / HF_CONFIG_NAME))
    foreign = meta.get("foreign", False)
    _as_quantizable_layers(model)  # as oq.quantize did: attention projections, 1-D convolutions
    tied = _tied_keys(model)
    for name, spec in meta["modules"].items():
        _swap(model, name, _build(spec))
    for name in meta.get("float_bias", []):
        m = model.get_submodule(name)
        if getattr(m, "bias", "absent") is None:  # BatchNorm folding gave this float layer a bias
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device="meta"))
    expected = model.state_dict(keep_vars=True)
    aliases = dict(meta.get("aliases", {}))
    state: dict[str, torch.Tensor] = {}
    for file in _stored_files(path):
        state.update(_read_tensors(file, model, expected, foreign))
    for key, target in tied.items():  # e.g. a tied lm_head that the file stores once
        if key not in state and key in expected and target in state:
            aliases.setdefault(key, target)
    missing = [k for k in expected if k not in state and k not in aliases]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path / CONFIG_NAME}: alias {key!r} -> {target!r} names no stored tensor")
        state[key] = state[target]
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise CheckpointError(
            f"tensors still on the meta device after loading: {left_on_meta[:5]} (non-persistent buffers are not "
            "stored: build the architecture with accelerate.init_empty_weights(include_buffers=False))"
        )
    _retie(model, aliases)
    _keep_torch_transformer_layers_on_modules(model)
    return chain_convolutions(model).eval()


def _hf_quantization_config(path: Path) -> dict:
    cfg_file = path / HF_CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: neither {CONFIG_NAME} nor {HF_CONFIG_NAME}; not a quantized checkpoint")
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config")
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{cfg_file}: no compressed-tensors quantization_config; not a quantized checkpoint")
    return qcfg


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """key -> the first key holding the same Parameter (tied weights), before any module is swapped."""
    first: dict[int, str] = {}
    tied = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            tied[key] = first[id(t)]
        else:
            first[id(t)] = key
    return tied


def _read_tensors(file: Path, model: nn.Module, expected: dict, foreign: bool) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, checked against the model's expected dtype and shape."""
    state = {}
    with _open_safetensors(file) as f:
        for key in f.keys():
            if key not in expected:
                raise CheckpointError(f"{file}: tensor {key!r} has no place in the model")
            owner = _owner(model, key)
            try:
                t = _from_file(key, f.get_tensor(key), owner)
            except Exception as e:
                raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from None
            want = expected[key]
            if foreign and t.is_floating_point() and want.is_floating_point():
                t = t.to(want.dtype)  # another tool's bf16 scales / float weights: widened exactly to ours
            if foreign and key.endswith(".weight_scale") and t.numel() == 1 and want.numel() > 1:
                t = t.reshape(()).expand(want.shape).clone()  # per-tensor weight scale -> per-channel
            if (
                t.is_floating_point()
                and want.is_floating_point()
                and not isinstance(owner, QuantizedModule | QEmbedding)
                and t.shape == want.shape
            ):
                want = t  # a float layer keeps the dtype it was saved in (a bf16 model's norms and embeddings)
            if t.dtype != want.dtype or t.shape != want.shape:
                raise CheckpointError(
                    f"{file}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, the model expects "
                    f"{want.dtype} {tuple(want.shape)}"
                )
            is_scale = key.rpartition(".")[2] in ("weight_scale", "input_scale")
            if isinstance(owner, QuantizedModule) and is_scale and not (torch.isfinite(t).all() and (t > 0).all()):
                raise CheckpointError(f"{file}: tensor {key!r} holds non-finite or non-positive scales")
            state[key] = t
    return state


def _float_dtype_name(model: nn.Module) -> str:
    """The dtype most float parameters of the model's float layers have ("float32", "bfloat16", ...)."""
    counts: dict[torch.dtype, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedModule | QEmbedding):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.get) if counts else torch.float32).removeprefix("torch.")


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make aliased parameters one Parameter again (tied embeddings: one matrix, as saved)."""
    for key, target in aliases.items():
        mod_name, _, leaf = key.rpartition(".")
        t_mod, _, t_leaf = target.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        src = model.get_submodule(t_mod) if t_mod else model
        if leaf in owner._parameters and t_leaf in src._parameters:
            owner._parameters[leaf] = src._parameters[t_leaf]
