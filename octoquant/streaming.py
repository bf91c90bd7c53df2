"""Streaming quantization of a Hugging Face decoder checkpoint larger than RAM: `quantize_checkpoint(src, dst, ...)`.

The source (sharded) safetensors checkpoint is read one tensor at a time with plain reads (no memory map, so only
what was asked for is resident), one decoder block at a time: the block is materialized, calibrated on the
activations carried over from the previous block (float outputs, exactly what the in-memory path sees),
quantized with `oq.quantize` (SmoothQuant on its own inputs when calibration data is given, with the pairs of the
architecture table), written as its own shard, and dropped. Peak memory ~ one float block + the
calibration activations, not the model. The output is the folder `oq.save` writes (octoquant.json + config.json
with the compressed-tensors config + safetensors shards and their index) and loads with `oq.load(dst)`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HF_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    _hf_model_from_folder,
    _module_spec,
    _owner,
    _prepare_out,
    _publish,
    _stored_files,
    _to_file,
    ct_config_from_specs,
)
from .config import Calibrator, Config, PerChannel, PerGroup, QuantMode, Rounding
from .convert import _select, _swap, quantize
from .nn import QLinear
from .nn._base import WEIGHT_ROWS_ELEMENTS, quantize_weight

log = logging.getLogger("octoquant.streaming")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class DecoderLayout:
    """Where the pieces of a decoder-only causal LM live (module paths)."""

    embed: str
    layers: str
    norm: str
    head: str


_LLAMA_LIKE = DecoderLayout(embed="model.embed_tokens", layers="model.layers", norm="model.norm", head="lm_head")
# Hugging Face classes whose checkpoints stream block by block: a table, not if-chains
ARCHITECTURES: dict[str, DecoderLayout] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}


class SafetensorsReader:
    """Tensors of a (sharded) safetensors checkpoint, read on demand with pread: nothing is memory-mapped."""

    def __init__(self, folder: Path) -> None:
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for file in _stored_files(folder):
            self._parse(file)

    def _parse(self, file: Path) -> None:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: header length {n} exceeds the file ({size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file}: header is not valid JSON ({e})") from None
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or base + end > size:
                raise CheckpointError(f"{file}: tensor {key!r} data is truncated or its offsets lie")
            self.entries[key] = (file, dtype, shape, base + start, end - start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> torch.Tensor:
        return self.get_rows(key, 0, None)

    def get_rows(self, key: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows start:stop (dim 0) of a tensor: one contiguous byte range of the file."""
        try:
            file, dtype, shape, offset, nbytes = self.entries[key]
        except KeyError:
            raise CheckpointError(f"the source checkpoint has no tensor {key!r}") from None
        if shape:
            rows = shape[0]
            stop = rows if stop is None else min(stop, rows)
            row_bytes = nbytes // rows if rows else 0
            offset, nbytes = offset + start * row_bytes, (stop - start) * row_bytes
            shape = (stop - start, *shape[1:])
        buf = bytearray(nbytes)
        with open(file, "rb") as f:  # read-only: the source is never modified
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise CheckpointError(f"{file}: tensor {key!r} is truncated")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if nbytes else torch.empty(shape)


class _Captured(Exception):
    pass


class _Host(nn.Module):
    """Holds one module at its full path (so names, `exclude` globs and overrides match the in-memory path)."""

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__()
        parts = path.split(".")
        parent: nn.Module = self
        for part in parts[:-1]:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], module)
        self.path = path

    def forward(self, *args, **kwargs):
        return self.get_submodule(self.path)(*args, **kwargs)


def _materialize(module: nn.Module, prefix: str, reader: SafetensorsReader, fallback: dict[str, str]) -> None:
    """Load the module's stored tensors (as float32 for float tensors) from the source, replacing meta ones."""
    state = {}
    for name in module.state_dict():
        key = prefix + name
        t = reader.get(fallback.get(key, key) if key not in reader.entries else key)
        state[name] = t.float() if t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)


def _local_patterns(host: nn.Module, exclude: Sequence[str]) -> list[str]:
    """The exclude patterns that name a layer of this block (the others belong to other blocks: no warning)."""
    names = [n for n, _ in host.named_modules()]
    return [p for p in exclude if any(fnmatch.fnmatchcase(n, p) for n in names)]


def _quantize_unless_all_excluded(host: _Host, config: Config, calib, exclude: Sequence[str]) -> nn.Module:
    """`oq.quantize` on one block (in place), or the block unchanged when `exclude` keeps all its layers float."""
    exclude = _local_patterns(host, exclude)
    names = [n for n, m in host.named_modules() if isinstance(m, nn.Linear)]
    if all(any(fnmatch.fnmatchcase(n, p) for p in exclude) for n in names):
        return host
    return quantize(host, config, calib=calib, exclude=exclude, inplace=True, progress=False)


def _row_streamable(m: nn.Module, cfg: Config) -> bool:
    """Layers whose int8 weights come from row blocks alone, exactly as `oq.quantize` computes them whole."""
    g = cfg.weight_granularity
    return (
        type(m) is nn.Linear
        and cfg.mode is not QuantMode.W8A8_STATIC
        and cfg.weight_calibrator is Calibrator.MINMAX
        and cfg.weight_rounding is Rounding.NEAREST
        and (isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis == 0))
    )


def _stream_linear(reader: SafetensorsReader, name: str, m: nn.Linear, cfg: Config, tied: dict) -> QLinear:
    """QLinear.from_float's result, computed from row blocks of the stored weight (per-row scales: exact)."""
    key = f"{name}.weight"
    src = key if key in reader.entries else tied.get(key, key)
    n, k = m.weight.shape
    group = cfg.weight_granularity.group_size if isinstance(cfg.weight_granularity, PerGroup) else None
    group = None if group and k % group else group  # as oq.quantize: per-channel when the group does not divide K
    gran = PerGroup(group) if group else PerChannel(0)
    with torch.device("meta"):
        q = QLinear(k, n, m.bias is not None, cfg.mode, group, cfg.activation_dtype, None, cfg.outlier_threshold)
    codes = torch.empty((n, k), dtype=torch.int8)
    scales = []
    step = max(1, WEIGHT_ROWS_ELEMENTS // max(1, k))
    for i in range(0, n, step):
        rows = reader.get_rows(src, i, i + step).float()
        c, sc = quantize_weight(rows, gran, name, None)
        codes[i : i + len(rows)] = c
        scales.append(sc)
    bias = reader.get(f"{name}.bias").float() if m.bias is not None else None
    q._set_quantized(codes, torch.cat(scales), bias, None, name)
    return q


def _stream_block(host: _Host, config: Config, exclude: Sequence[str], reader, tied: dict) -> bool:
    """Quantize a block without materializing it (no calibration needed); False if a layer needs the block path."""
    targets, _ = _select(host, config, _local_patterns(host, exclude))
    if not all(_row_streamable(m, cfg) for m, cfg in targets.values()):
        return False
    for name, (m, cfg) in targets.items():
        _swap(host, name, _stream_linear(reader, name, m, cfg, tied))
    rest = {}
    for key, t in host.state_dict(keep_vars=True).items():
        if t.is_meta:
            src = key if key in reader.entries else tied.get(key, key)
            v = reader.get(src)
            rest[key] = v.float() if v.is_floating_point() else v
    host.load_state_dict(rest, strict=False, assign=True)
    return True


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: Config,
    calib: Iterable | None = None,
    *,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize a Hugging Face decoder checkpoint block by block, never holding the whole model.

    Args:
        src: a Hugging Face folder (config.json + model.safetensors or shards with an index); opened read-only.
        dst: the output folder (refused if it exists unless `overwrite`, and refused inside `src`).
        config: `oq.W8A8`, `oq.W8A8_DYNAMIC`, `oq.W8A16` or any `oq.Config`.
        calib: batches of token ids (tensors or tokenizer dicts); needed for static activations.
        exclude: glob patterns of layer names kept float (e.g. ``["lm_head"]``).

    Returns:
        `dst`, a folder that `oq.load(dst)` reads, with the same tensors the in-memory `oq.quantize` gives.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not (src / HF_CONFIG_NAME).is_file():
        raise CheckpointError(f"{src}: no {HF_CONFIG_NAME}; streaming needs a Hugging Face checkpoint folder")
    if dst == src or src in dst.parents:
        raise CheckpointError(f"the output {dst} lies inside the source checkpoint {src}")
    hf_cfg = json.loads((src / HF_CONFIG_NAME).read_text())
    archs = hf_cfg.get("architectures") or []
    layout = ARCHITECTURES.get(archs[0]) if archs else None
    if layout is None:
        raise CheckpointError(
            f"{src / HF_CONFIG_NAME}: architecture {archs} does not stream; supported: {', '.join(ARCHITECTURES)}"
        )
    batches = list(calib) if calib is not None else None
    config = config.with_default_calibrator(token_model=True)  # an LLM checkpoint
    if config.needs_calibration and not batches:
        raise CheckpointError("static W8A8 needs calibration batches (calib=...); or use oq.W8A8_DYNAMIC")

    reader = SafetensorsReader(src)
    skeleton = _hf_model_from_folder(src)  # parameters on meta: nothing allocated
    tied = {}
    head_key = f"{layout.head}.weight"
    if head_key not in reader.entries:  # a tied head stored once, as the embedding
        tied[head_key] = f"{layout.embed}.weight"
    tied_source = bool(tied) or bool(hf_cfg.get("tie_word_embeddings", False))
    # the output head: weight-only per channel by default, as oq.quantize does (Config.head_weight_only)
    if config.head_weight_only and config.mode is not QuantMode.W8A16:
        head_cfg = config.replace(
            mode=QuantMode.W8A16, weight_granularity=config.head_granularity, outlier_threshold=None, overrides=()
        )
        config = config.replace(overrides=((layout.head, head_cfg), *config.overrides))
    final_head_cfg = config.for_module(layout.head)
    tie_int8 = (
        tied_source
        and config.head_weight_only
        and not any(fnmatch.fnmatchcase(layout.head, p) for p in exclude)
        and final_head_cfg.mode is QuantMode.W8A16
        and isinstance(final_head_cfg.weight_granularity, PerChannel | PerGroup)
    )  # then the embedding reads the head's int8 matrix (QEmbedding): nothing of its own is written
    expected = set(skeleton.state_dict())
    stored = set(reader.keys())
    if stored - expected:
        raise CheckpointError(f"{src}: tensors the architecture does not have: {sorted(stored - expected)[:5]}")
    if expected - stored - set(tied):
        raise CheckpointError(f"{src}: missing tensors {sorted(expected - stored - set(tied))[:5]}")

    layers: nn.ModuleList = skeleton.get_submodule(layout.layers)
    n_layers = len(layers)
    n_shards = n_layers + 2
    shard_name = lambda i: f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
    tmp = _prepare_out(dst, overwrite)
    specs: dict[str, dict] = {}
    float_linears: list[str] = []
    weight_map: dict[str, str] = {}

    def write(i: int, host: nn.Module) -> None:
        tensors = {}
        for key, t in host.state_dict().items():
            tensors[key] = _to_file(key, t.detach(), _owner(host, key)).contiguous()
            weight_map[key] = shard_name(i)
        for name, m in host.named_modules():
            if (spec := _module_spec(m)) is not None and spec["type"] in ("QLinear", "QConv2d"):
                specs[name] = spec
            elif isinstance(m, nn.Linear):
                float_linears.append(name)
        write_safetensors(tmp / shard_name(i), tensors)
        _release_freed_memory()

    try:
        # embeddings (float) and, for static activations, the inputs of the first block
        embed = skeleton.get_submodule(layout.embed)
        captured: list[dict] = []
        if batches:
            _materialize(embed, f"{layout.embed}.", reader, {})
            hook = layers[0].register_forward_pre_hook(_capture_into(captured), with_kwargs=True)
            with torch.no_grad():
                for b in batches:
                    try:
                        if isinstance(b, dict):
                            skeleton(**b, use_cache=False)
                        else:
                            skeleton(b, use_cache=False)
                    except _Captured:
                        pass
            hook.remove()
        aliases = {}
        if tie_int8:
            specs[layout.embed] = {
                "type": "QEmbedding",
                "num_embeddings": embed.num_embeddings,
                "embedding_dim": embed.embedding_dim,
                "dtype": "float32",
                "group_size": getattr(final_head_cfg.weight_granularity, "group_size", None),
            }
            aliases = {
                f"{layout.embed}.weight": head_key,
                f"{layout.embed}.weight_scale": f"{layout.head}.weight_scale",
            }
        else:
            embed_keys = [f"{layout.embed}.{k}" for k in embed.state_dict()]
            write_safetensors(tmp / shard_name(0), {k: _SourceRows(reader, k) for k in embed_keys})
            weight_map.update(dict.fromkeys(embed_keys, shard_name(0)))
        _swap(skeleton, layout.embed, nn.Module())  # the embedding is not needed again: free it
        del embed

        bar = tqdm(range(n_layers), desc="octoquant: streaming blocks", disable=not progress)
        for i in bar:
            path = f"{layout.layers}.{i}"
            block = layers[i]
            host = _Host(path, block)
            host.config = skeleton.config  # SmoothQuant: the architecture table's pairs, as in memory
            if not captured and _stream_block(host, config, exclude, reader, tied):
                write(i + 1, host)  # quantized from row blocks: the float block never existed
                layers[i] = nn.Module()
                del host, block
                continue
            _materialize(block, f"{path}.", reader, {})
            if captured:
                with torch.no_grad():  # carry the float outputs on: the in-memory calibration sees exactly these
                    outs = [_first(block(**kw)) for kw in captured]
            q = _quantize_unless_all_excluded(host, config, list(captured) or None, exclude)
            write(i + 1, q)
            if captured:
                captured = [{**kw, "hidden_states": o} for kw, o in zip(captured, outs, strict=True)]
            layers[i] = nn.Module()  # drop the block's tensors
            del host, q, block

        norm = skeleton.get_submodule(layout.norm)
        _materialize(norm, f"{layout.norm}.", reader, {})
        head = skeleton.get_submodule(layout.head)
        head_host = _Host(layout.head, head)
        if not captured and _stream_block(head_host, config, exclude, reader, tied):
            q_head = head_host
        else:
            _materialize(head, f"{layout.head}.", reader, tied)
            head_calib = None
            if captured:
                with torch.no_grad():
                    head_calib = [norm(kw["hidden_states"]) for kw in captured]
            q_head = _quantize_unless_all_excluded(head_host, config, head_calib, exclude)
        write(n_shards - 1, _merge_hosts(_Host(layout.norm, norm), q_head))

        (tmp / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        meta = {"format_version": FORMAT_VERSION, "modules": specs, "aliases": aliases, "float_bias": []}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        out_cfg = dict(hf_cfg)
        out_cfg["quantization_config"] = ct_config_from_specs(specs, float_linears)
        if isinstance(q_head.get_submodule(layout.head), QLinear) and not tie_int8:
            out_cfg["tie_word_embeddings"] = False  # the int8 head is its own matrix
        (tmp / HF_CONFIG_NAME).write_text(json.dumps(out_cfg, indent=1))
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


_ST_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class _SourceRows:
    """A source tensor copied to the output in row blocks (as float32, like a materialized module), never whole."""

    reader: SafetensorsReader
    key: str

    @property
    def dtype(self) -> torch.dtype:
        dt = self.reader.entries[self.key][1]
        return torch.float32 if dt.is_floating_point else dt

    @property
    def shape(self) -> tuple[int, ...]:
        return self.reader.entries[self.key][2]

    def blocks(self):
        shape = self.shape
        row = 1
        for d in shape[1:]:
            row *= d
        step = max(1, WEIGHT_ROWS_ELEMENTS // max(1, row))
        for i in range(0, shape[0] if shape else 1, step):
            t = self.reader.get_rows(self.key, i, i + step) if shape else self.reader.get(self.key)
            yield t.float() if t.is_floating_point() else t


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory (no serialized copy in RAM)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        numel = 1
        for d in t.shape:
            numel *= d
        n = numel * t.dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            for block in t.blocks() if isinstance(t, _SourceRows) else [t]:
                if block.numel():
                    f.write(memoryview(block.contiguous().view(torch.uint8).reshape(-1).numpy()))


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after each block (glibc keeps them otherwise; RSS would creep)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _capture_into(store: list[dict]):
    def hook(module, args, kwargs):
        kw = dict(kwargs)
        if args:
            kw["hidden_states"] = args[0]
            if len(args) > 1:
                raise CheckpointError("the first decoder block takes more than one positional input; cannot stream")
        store.append(kw)
        raise _Captured

    return hook


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _merge_hosts(a: _Host, b: _Host) -> nn.Module:
    """One module whose state dict holds both hosts' tensors under their full names."""
    root = nn.Module()
    for host in (a, b):
        for name, child in host.named_children():
            if hasattr(root, name):
                for sub_name, sub in child.named_children():
                    getattr(root, name).add_module(sub_name, sub)
            else:
                root.add_module(name, child)
    return root
