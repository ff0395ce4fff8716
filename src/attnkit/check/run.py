"""``attnkit.check``: will attention stay numerically safe? Predicted from the config (and the
weights, when there are any), optionally beside one measured forward."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from attnkit.check.curvature import Curvature, curvature
from attnkit.check.dtypes import DISTORTION_TOLERANCE, FORMATS, format_named
from attnkit.check.estimate import LogitEstimate, estimate, moments_from_weights
from attnkit.check.measure import Measurement, measure
from attnkit.check.mitigations import CheckMitigation, config_mitigations, describe_bounds, upcasts
from attnkit.check.recommend import Recommendation, max_safe_growth, recommend
from attnkit.check.regions import RegionSweep, sweep
from attnkit.check.safety import Verdict, judge, worst
from attnkit.check.shape import AttentionShape, read_shape
from attnkit.common.distributed import DistEnv, agree
from attnkit.common.loading.hub import hub_offline_reason
from attnkit.common.loading.registry import BUILTIN_MODELS, load_model, resolve_model_path
from attnkit.errors import UserError

SCHEMA_VERSION = "1.1"
DEFAULT_SEQ_LEN = 2048  # when neither --seq-len nor the config's maximum positions say


@dataclass
class LayerCheck:
    """One layer type (full or sliding-window attention) under one estimate (init or weights)."""

    estimate: LogitEstimate
    verdicts: dict[str, Verdict]  # fp16, bf16, fp32
    curvature: Curvature
    max_growth: dict[str, float]  # dtype -> largest weight growth that stays safe
    recommendations: list[Recommendation]

    def to_dict(self) -> dict:
        est = self.estimate.to_dict()
        return {"estimate": est, "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
                "curvature": self.curvature.to_dict(),
                "max_growth": {k: ("inf" if v == math.inf else v) for k, v in self.max_growth.items()},
                "recommendations": [r.to_dict() for r in self.recommendations]}


@dataclass
class CheckReport:
    model: str
    dtype: str
    seq_len: int
    temperature: float
    weight_growth: float
    shape: AttentionShape
    mitigations: list[CheckMitigation]
    init: list[LayerCheck]  # from the config alone: a fresh run of this architecture
    weights: list[LayerCheck] = field(default_factory=list)  # from the model's own W_q/W_k, when loaded
    measured: Measurement | None = None
    measured_verdicts: dict[str, Verdict] = field(default_factory=dict)  # the forward's own figures, judged
    regions: RegionSweep | None = None
    tolerance: float = DISTORTION_TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> list[LayerCheck]:
        """The checks verdicts are read from: the weights' when there are weights, else the config's."""
        return self.weights or self.init

    @property
    def estimated_status(self) -> str:
        return worst(c.verdicts[self.dtype].status for c in self.primary)

    @property
    def status(self) -> str:
        """The worse of the estimate's verdict and, when a forward was measured, the forward's."""
        measured = self.measured_verdicts.get(self.dtype)
        return worst([self.estimated_status] + ([measured.status] if measured else []))

    @property
    def safe(self) -> bool:
        return self.status == "safe"

    @property
    def recommendations(self) -> list[Recommendation]:
        return [r for c in self.primary for r in c.recommendations]

    def to_json(self) -> dict:
        from dataclasses import asdict

        shape = asdict(self.shape)
        return _finite({
            "schema_version": SCHEMA_VERSION,
            "model": self.model, "dtype": self.dtype, "seq_len": self.seq_len, "temperature": self.temperature,
            "weight_growth": self.weight_growth, "status": self.status, "tolerance": self.tolerance,
            "estimate_source": "weights" if self.weights else "init (config)",
            "estimated_status": self.estimated_status,
            "measured_status": self.measured_verdicts[self.dtype].status if self.measured_verdicts else None,
            "measured_verdicts": {k: v.to_dict() for k, v in self.measured_verdicts.items()},
            "shape": shape, "mitigations": [m.to_dict() for m in self.mitigations],
            "bounds": describe_bounds(self.shape),
            "init": [c.to_dict() for c in self.init], "weights": [c.to_dict() for c in self.weights],
            "measured": self.measured.to_dict() if self.measured else None,
            "regions": self.regions.to_dict() if self.regions else None,
            "notes": self.notes,
        })


def _finite(value):
    """JSON has no NaN or Infinity: NaN -> null, +-inf -> "inf"/"-inf"."""
    if isinstance(value, float):
        if value != value:
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Reading MODEL_OR_CONFIG


@dataclass
class Source:
    name: str
    config: object  # dict or PretrainedConfig
    model_dir: str | None = None  # a directory with weights, when there is one
    model: object | None = None  # an nn.Module given directly


def _read_json_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as e:
        raise UserError(f"cannot read {path}: permission denied") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not a config object")
    return data


def _has_weights(directory: Path) -> bool:
    return any((directory / n).exists() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def resolve_source(config_or_model) -> Source:
    """A built-in name, an HF config.json, a model directory, a hub id, a config dict/object, or a model."""
    if isinstance(config_or_model, dict):
        return Source("config", config_or_model)
    if not isinstance(config_or_model, (str, Path)):
        config = getattr(config_or_model, "config", None)
        if config is not None and hasattr(config_or_model, "modules"):
            return Source(type(config_or_model).__name__, config, model=config_or_model)
        return Source(type(config_or_model).__name__, config_or_model)
    name = str(config_or_model)

    path = Path(resolve_model_path(name)).expanduser() if name in BUILTIN_MODELS else Path(name).expanduser()
    if path.is_file():
        return Source(name, _read_json_config(path))
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise UserError(f"{name} is a directory without config.json; give an HF model directory or a config.json")
        return Source(name, _read_json_config(config_file), str(path) if _has_weights(path) else None)
    if name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1:
        raise UserError(f"{name} does not exist")
    return _hub_source(name)


def _hub_source(name: str) -> Source:
    offline = hub_offline_reason()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=offline is not None)
    except (OSError, ValueError) as e:
        where = f"not in the local hub cache ({offline})" if offline else "not found on the model hub"
        raise UserError(f"cannot find '{name}': not a built-in name ({', '.join(BUILTIN_MODELS)}), not a file or "
                        f"directory, and {where}") from e
    return Source(name, config)


# ----------------------------------------------------------------------------------------------


def _layer_checks(shape: AttentionShape, seq_len: int, dtype: str, temperature: float, growth: float,
                  upcast: bool, moments=None) -> list[LayerCheck]:
    checks = []
    for layer_type in shape.layer_types:
        est = estimate(shape, seq_len, layer_type, temperature, growth, moments)
        verdicts = {dt: judge(est, dt, upcast) for dt in FORMATS}
        # Growth headroom relative to the weights as they are (growth 1 = now).
        headroom = {dt: max_safe_growth(shape, seq_len, layer_type, dt, temperature, moments, upcast) for dt in ("fp16", "bf16")}
        checks.append(LayerCheck(est, verdicts, curvature(est, shape.head_dim), headroom,
                                 recommend(shape, est, verdicts[dtype], layer_type, moments, upcast)))
    return checks


def check(
    config_or_model,
    seq_len: int | None = None,
    dtype: str = "bf16",
    *,
    temperature: float = 1.0,
    weight_growth: float = 1.0,
    measure_pass: bool = False,
    use_weights: bool | None = None,
    regions: bool = True,
    measure_texts: list[str] | None = None,
    measure_source: str | None = None,
    measure_samples: int = 8,
    measure_batch_size: int = 8,
    measure_device: str = "cpu",
    env: DistEnv | None = None,
) -> CheckReport:
    """Predict whether attention stays numerically safe in ``dtype`` at ``seq_len`` tokens.

    ``config_or_model``: an HF config (object or dict), a path to config.json or a model
    directory, a built-in name (``reference``, ``minilm``), a hub id (when reachable), or a loaded
    model. When it has weights (a loaded model, or a directory or built-in model with a weights
    file), the verdicts are read from its real W_q/W_k; ``use_weights=False`` judges the config
    alone, as for a fresh initialisation of the architecture. ``measure_pass`` adds one forward
    through the seam on KJV text: its figures are compared with the estimate and judged too, and
    the report's status is the worse of the two verdicts (``notes`` say when they differ).
    ``measure_texts`` (named ``measure_source``) replace the KJV text: up to ``measure_samples``
    blocks of their tokens, ``measure_batch_size`` a forward, the figures their extremes.
    ``measure_device`` ("auto", "cpu", "cuda[:N]", "mps") is where the measured forward runs.
    ``env``: under ``torchrun`` (``attnkit.common.distributed.command_group``) each rank measures its
    share of the blocks and the figures are pooled over the ranks; every rank returns the same report.
    """
    env = env or DistEnv()
    fmt = format_named(dtype).name
    for value, what in ((temperature, "temperature"), (weight_growth, "weight growth")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise UserError(f"{what} must be a positive number, got {value!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise UserError(f"sequence length must be a whole number of at least 2 tokens, got {seq_len!r}")
    source = resolve_source(config_or_model)
    shape = read_shape(source.config)
    notes = list(shape.notes)
    if seq_len is None:
        seq_len = shape.max_positions or DEFAULT_SEQ_LEN
        notes.append(f"sequence length {seq_len}: " + ("the config's maximum positions" if shape.max_positions
                                                       else "a default; the config names no maximum"))
    elif shape.max_positions and seq_len > shape.max_positions and not shape.rope:
        notes.append(f"--seq-len {seq_len} is past the config's {shape.max_positions} positions: the model cannot "
                     f"run it as configured; the estimate is for the architecture")
    if shape.rope and fmt != "fp32":
        # Measured in the validation: .to(fp16) rounded inv_freq and made a Llama's layer-0 weights move 19 % instead of 3.4 %.
        angle_error = seq_len * FORMATS[fmt].relative_error_bound()
        notes.append(f"RoPE: keep its frequencies (inv_freq) in fp32. Module.to({fmt}) rounds them too, and angles at "
                     f"position {seq_len:,} are then off by up to {angle_error:.3g} rad (from_pretrained(dtype=...) and "
                     f"autocast keep them in fp32)")
    mitigations = config_mitigations(source.config if not isinstance(source.config, dict) else _object(source.config))
    upcast = upcasts(mitigations)
    init = _layer_checks(shape, seq_len, fmt, temperature, weight_growth, upcast)
    report = CheckReport(source.name, fmt, seq_len, temperature, weight_growth, shape, mitigations, init, notes=notes)

    has_weights = source.model is not None or source.model_dir is not None
    if use_weights is False and measure_pass:
        raise UserError("--measure runs the model's weights; it cannot be combined with a config-only estimate")
    want_weights = use_weights if use_weights is not None else (measure_pass or has_weights)
    if use_weights is False and has_weights:
        notes.append("verdicts from the config alone, for a fresh initialisation of this architecture; "
                     "this model's trained weights were not read")
    if want_weights:
        # agreed: a rank that cannot load the model stops every rank (the others would wait in the pooling)
        model, tokenizer = agree(env, lambda: _load(source, measure_pass, measure_device if measure_pass else "cpu"))
        found = moments_from_weights(model)
        if found:
            moments = [mo for heads in found.values() for mo in heads]
            report.weights = _layer_checks(shape, seq_len, fmt, temperature, weight_growth, upcast, moments)
        else:
            notes.append("attnkit does not know where this model keeps W_q/W_k: the estimate is from the config only")
        if measure_pass:
            if not found:
                raise UserError("--measure compares the weights' estimate with a forward, and attnkit cannot read "
                                "this model's W_q/W_k")
            if tokenizer is None:
                raise UserError(f"{source.name} has no tokenizer: --measure needs one to run text through it")
            length = seq_len
            positions = shape.max_positions
            if positions and length > positions:
                length = positions
                notes.append(f"measured at {positions} tokens, the model's maximum; the prediction beside it is for "
                             f"the same length")
            moments = [mo for heads in found.values() for mo in heads]
            at_length = estimate(shape, length, shape.layer_types[0], temperature, 1.0, moments)
            if weight_growth != 1.0:
                notes.append("the measured pass runs the weights as they are (growth 1); the prediction beside it too")
            report.measured = measure(model, tokenizer, at_length, length, texts=measure_texts, source=measure_source,
                                      samples=measure_samples, batch_size=measure_batch_size, env=env)
            report.measured_verdicts = measured_verdicts(report.measured, at_length, upcast)
            _note_disagreement(report)
    if regions:
        report.regions = sweep(shape, shape.layer_types[0], upcast)
    return report


def measured_verdicts(measured: Measurement, at_length: LogitEstimate, upcast: bool) -> dict[str, Verdict]:
    """Each format's verdict on the forward's own largest logit and |q.k|, judged like an estimate."""
    largest = max(h["logit_max"] for h in measured.heads)
    raw = max(h["qk_absmax"] for h in measured.heads)
    per_head = [{"layer": h["layer"], "head": h["head"], "head_max": h["logit_max"], "raw_absmax": h["qk_absmax"]}
                for h in measured.heads]
    seen = replace(at_length, source="measured", model_max=largest, model_max_high=largest,
                   raw_absmax=raw, raw_absmax_high=raw, per_head=per_head)
    activation = (measured.activation_absmax, measured.activation_module)
    return {dt: judge(seen, dt, upcast, activation=activation) for dt in FORMATS}


def _note_disagreement(report: CheckReport) -> None:
    estimated, seen = report.estimated_status, report.measured_verdicts[report.dtype].status
    if estimated != seen:
        report.notes.insert(0, f"the measured forward finds {report.dtype} {seen} where the estimate from the "
                               f"weights finds it {estimated}: the verdict is the worse of the two")


def _object(config: dict):
    from types import SimpleNamespace

    return SimpleNamespace(**config)


def _load(source: Source, need_tokenizer: bool, device: str = "cpu"):
    if source.model is not None:
        return source.model, None
    if source.model_dir is None:
        raise UserError(f"{source.name} has no weights (no model.safetensors or pytorch_model.bin): "
                        f"--measure needs a model directory or a built-in model")

    loaded = load_model(source.model_dir if source.name not in _builtin_names() else source.name, device=device)
    return loaded.model, loaded.tokenizer


def _builtin_names():
    return BUILTIN_MODELS
