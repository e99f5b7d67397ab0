"""``PIPELINE.yaml``: what one ExMe run needs, validated completely before any model is loaded.

A typo in a key or an impossible value (a negative α, β outside [0, 1], a missing checkpoint folder,
an output folder inside an input) is found here and reported as one :class:`ExmeError` naming the
file and the key, so a run never fails an hour in because of its configuration.
"""

from __future__ import annotations

import glob as _glob
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator, model_validator

from exme.common import StrictModel
from exme.errors import ExmeError
from exme.evaluate import spec_kind
from exme.evaluate.backends import VllmOptions, backend_names, get_backend
from exme.merge.registry import BASELINE_METHODS  # the registry decides which methods are baselines

DEFAULT_GRID = [round(0.1 * i, 1) for i in range(11)]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
RUN_FOLDER_FILES = ("study.db", "results.json", "report.md", "model", "model.spec.json", "pipeline.yaml", "preflight.json",
                    "merge.yaml")

_STEP = re.compile(r"checkpoint-(\d+)$")


_Strict = StrictModel  # one config base for every user-facing document (exme.common)


def _check_grid(values: list[float], what: str) -> list[float]:
    if not values:
        raise ValueError(f"{what} grid is empty; give at least one value")
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{what} grid holds {v}; every value must be a finite number")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} grid repeats a value: {values}")
    return sorted(values)


def _baseline_method(name: str) -> str:
    if name not in BASELINE_METHODS:
        raise ValueError(f"{name!r} is not a baseline merge method; use one of {', '.join(BASELINE_METHODS)}")
    return name


class AlphaSpec(_Strict):
    """α candidates for the extrapolation stage (ExPO: θ + α(θ − θ_b), α ≥ 0)."""

    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))
    refine: bool = False
    """After the grid, try a finer grid (step/5) around the best α, as ExPO's coarse-to-fine search."""
    stop_on_collapse: bool = True
    """Stop raising α for a checkpoint after a collapsed point that also scored below its best so far:
    a model pushed further only rambles more (ExPO's known failure), so the larger α are not evaluated."""

    granularity: str = "global"
    """``global``: one α per kept checkpoint (the paper). ``module``: then one α per checkpoint for each of
    attention, MLP, and the rest (embeddings, head, norms); ``layers:N``: one per checkpoint for each of N
    contiguous blocks of decoder layers and one for the tensors outside them. The finer α are searched
    after the global α and β, starting from their optimum (:func:`exme.pipeline.stages.per_module`)."""
    n_trials: int = Field(30, ge=1, description="trials of the per-module α search (granularity module or layers:N; alpha.sampler draws them)")
    module_range: tuple[float, float] | None = None
    """[low, high] of each per-module α; default: the α grid's range, widened to hold the global optimum."""
    sampler: str = "tpe"
    """How the per-module α are searched: ``tpe`` (Optuna's multivariate TPE) or ``cmaes`` (CMA-ES, its mean
    starting at the global optimum; needs the ``cmaes`` package): :func:`exme.search.sampled.sampled_strategies`."""

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        v = _check_grid(v, "alpha")
        if v[0] < 0:
            raise ValueError(f"alpha must be >= 0 (extrapolation moves away from the base), got {v[0]}")
        return v

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        from exme.merge.groups import parse_granularity

        parse_granularity(v)
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        from exme.search.sampled import sampled_strategies

        names = sampled_strategies()
        if v not in names:
            raise ValueError(f"sampler {v!r} is not one of {', '.join(names)}")
        missing = names[v].missing()
        if missing:
            raise ValueError(f"sampler {v!r} {missing}")
        return v

    @field_validator("module_range")
    @classmethod
    def _module_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None:
            lo, hi = v
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
                raise ValueError(f"per-module α must be >= 0 (extrapolation), with low <= high; got [{lo}, {hi}]")
        return v

    @model_validator(mode="after")
    def _per_module_keys(self) -> "AlphaSpec":
        unread = self.model_fields_set & {"n_trials", "module_range", "sampler"}
        if self.granularity == "global" and unread:
            raise ValueError(f"{', '.join('alpha.' + k for k in sorted(unread))} only apply with granularity module or layers:N; remove them or set a granularity")
        return self


class BetaSpec(_Strict):
    """β candidates for the merge stage: β·θ'₁ + (1 − β)·θ'₂, β ∈ [0, 1]."""

    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID))

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        v = _check_grid(v, "beta")
        if v[0] < 0 or v[-1] > 1:
            raise ValueError(f"beta values must lie in [0, 1], got {v}")
        return v


class SearchSpec(_Strict):
    """How candidates are chosen: a grid (α per checkpoint, then β) or a joint TPE search."""

    mode: Literal["grid", "tpe"] = "grid"
    n_trials: int = Field(40, ge=1, description="trials of the joint TPE search (mode: tpe)")
    prune: bool = False
    """Successive halving on grids: score every point on a small dev subset first, keep the best 1/eta."""
    prune_min_items: int = Field(8, ge=1, description="items per task on the first pruning rung")
    prune_eta: int = Field(3, ge=2, description="keep the best 1/eta of the points at each rung")
    race: bool = True
    """Race the checkpoints of the rank stage on growing chunks of the search items: one that k others
    beat with confidence stops early; the rest are scored on every search item (:mod:`exme.search.racing`).
    On by default: on the demo over five seeds racing (with ``race_grids``) kept every choice and
    scored 74–89% of the search items of scoring everything (benchmarks/RESULTS.md, "Fewer evaluations")."""
    race_error_rate: float = 0.05
    """The chance that a checkpoint which is not worse than the k-th best stops early (in (0, 0.5))."""
    race_chunk: int = Field(8, ge=1, description="search items per task at the race's first look; each later look "
                                                 "doubles the items scored (8, 16, 32, ...)")
    race_grids: bool | None = None
    """Race the points of every grid search (β, the baselines, α when it does not stop on collapse) for the
    best place, with the rank stage's test, error rate and chunks: a point the best beats with confidence stops early.
    Unset: on, unless ``prune`` is (both cut grid searches short; see :attr:`grids_race`)."""

    @property
    def grids_race(self) -> bool:
        """Whether grid searches race: ``race_grids`` as given, else on unless successive halving prunes them."""
        return self.race_grids if self.race_grids is not None else not self.prune

    @field_validator("race_error_rate")
    @classmethod
    def _race_error_rate(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"must lie in (0, 0.5) (the chance a checkpoint that is not worse stops early), got {v}")
        return v


VllmSpec = VllmOptions  # the ``vllm:`` section: the vllm backend's options model (exme.evaluate.backends)


class DevSpec(_Strict):
    """How dev is divided: ``search`` (every choice reads only it) and ``confirm`` (scored once, after)."""

    confirm_fraction: float = 0.3
    """Share of each task's dev items held out to confirm the chosen models; 0 turns the split off."""

    @field_validator("confirm_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not (0.0 <= v <= 0.9):
            raise ValueError(f"must lie in [0, 0.9] (0 turns the confirm split off), got {v}")
        return v


class CollapseSpec(_Strict):
    """When a generating model counts as collapsed: its share of generations that hit ``max_new_tokens``
    exceeds the best SFT checkpoint's by more than ``margin`` (on some generative task)."""

    margin: float = Field(0.2, gt=0.0, le=1.0)


class StatsSpec(_Strict):
    """The paired statistics of the comparisons."""

    bootstrap: int = 2000
    """Paired bootstrap resamples for the 95% intervals (and sign-flip permutations for p-values)."""

    @field_validator("bootstrap")
    @classmethod
    def _resamples(cls, v: int) -> int:
        if v < 100:
            raise ValueError(f"needs at least 100 resamples for a 95% interval, got {v}")
        return v


class PipelineConfig(_Strict):
    """One ExMe run: base, SFT checkpoints, evaluation suite, search space, output folder."""

    base: Path
    checkpoints: str | list[str]
    suite: str
    top_k: int = Field(2, ge=1)
    alpha: AlphaSpec = Field(default_factory=AlphaSpec)
    beta: BetaSpec = Field(default_factory=BetaSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    lm_eval_include_path: list[str] | None = None
    """Folders of lm-eval task YAMLs (relative to the PIPELINE.yaml), for ``suite: lm-eval:...``."""
    dev: DevSpec = Field(default_factory=DevSpec)
    collapse: CollapseSpec = Field(default_factory=CollapseSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    baselines: list[Annotated[str, AfterValidator(_baseline_method)]] = Field(
        default_factory=lambda: list(BASELINE_METHODS)
    )
    """Merge methods searched as baselines: every registry method with a baseline grid (``baseline_space``)."""
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: str = "hf"
    """Evaluation engine, a name in ``exme.evaluate.backends.REGISTRY``: the live transformers module (hf)
    or one vLLM engine with weights swapped in (vllm)."""
    rescore_items: int = Field(32, ge=0)
    """Test items per task of the ExMe model scored again in another batch composition (0: off); the report
    shows how many changed."""
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    """The vllm backend's options (its own section, kept from before backends had a registry)."""
    backend_options: dict[str, Any] | None = None
    """Options of the chosen backend, validated by its options model (``exme eval --backend-option``);
    for vllm, the ``vllm:`` section says the same."""
    output: Path
    output_format: Literal["model", "peft"] = "model"
    """How ``<output>/model`` is written: a full model folder, or (checkpoints that are LoRA adapters of
    ``base``) one PEFT adapter equal to the ExMe merge (``exme merge --format peft``)."""
    storage: str | None = None
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    """torch CPU threads; ``None``: the CPUs not busy with other work (:func:`exme.threads.default_threads`)."""
    log_samples: bool = False
    """Write every final-table row's test items (record, output, score) to ``<output>/samples/<row>_test.jsonl``
    when the row is evaluated; suite YAML files only (lm-eval and custom objectives keep no per-item records)."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not one of cpu, cuda, cuda:N, mps")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in backend_names():
            raise ValueError(f"backend {v!r} is not one of {backend_names()}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(
                f"storage {v!r} is not a database URL; use e.g. sqlite:///run/study.db or "
                "postgresql://user@host/db, or leave it out for <output>/study.db"
            )
        return v

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"baselines repeat a method: {v}")
        return v

    @model_validator(mode="after")
    def _modes(self) -> "PipelineConfig":
        if self.search.mode == "grid" and self.top_k > 2:
            raise ValueError(
                f"top_k {self.top_k} needs a weight simplex: set search.mode: tpe (grid search merges two checkpoints)"
            )
        # A setting that the chosen mode would not read is a mistake to report, never to ignore.
        given = self.search.model_fields_set
        if self.search.mode == "grid" and "n_trials" in given:
            raise ValueError("search.n_trials counts TPE trials, but search.mode is grid (every grid point is evaluated); remove n_trials or set mode: tpe")
        if not self.search.prune and given & {"prune_min_items", "prune_eta"}:
            raise ValueError("search.prune_min_items and search.prune_eta only apply with search.prune: true")
        if not (self.search.race or self.search.grids_race) and given & {"race_error_rate", "race_chunk"}:
            raise ValueError("search.race_error_rate and search.race_chunk only apply with search.race or search.race_grids "
                             "on (both are off here)")
        if self.search.race_grids and self.search.prune:
            raise ValueError("search.race_grids and search.prune both cut grid searches short; choose one")
        for name in _backend_sections():
            if name in self.model_fields_set and name != self.backend:
                raise ValueError(f"{name} settings are given but backend is {self.backend}; set backend: {name} or remove the {name} key")
        entry = get_backend(self.backend)
        if self.backend_options is not None:
            if self.backend in _backend_sections() and self.backend in self.model_fields_set:
                raise ValueError(f"give the {self.backend} options once: in backend_options or in the {self.backend} section")
            try:
                entry.parse_options(self.backend_options, where="backend_options key")
            except ExmeError as err:
                raise ValueError(str(err)) from None
        refusal = entry.refusal(spec_kind(self.suite), self.suite)
        if refusal:
            raise ValueError(f"{refusal}; use backend: hf")
        if self.log_samples and spec_kind(self.suite) != "suite":
            raise ValueError(
                f"log_samples (--log-samples) needs a suite YAML file, but suite {self.suite!r} keeps no per-item "
                "records (lm-eval tasks and custom objectives); remove log_samples, or log lm-eval samples with lm-eval itself"
            )
        if self.alpha.granularity != "global" and self.output_format == "peft":
            raise ValueError(f"alpha.granularity {self.alpha.granularity} writes the final model with per-tensor "
                             "coefficients, which output_format: peft does not express yet; set output_format: model or granularity: global")
        if self.search.mode == "tpe" and "beta" in self.model_fields_set:
            raise ValueError("beta.grid is not used with search.mode: tpe (the merge weights are searched jointly with α); remove beta or set mode: grid")
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        """Read, validate and check a ``PIPELINE.yaml``; relative paths are relative to the file.

        ``overrides`` (e.g. ``storage=...``, ``device=...`` from the command line) replace keys of
        the file when not ``None``.
        """
        path = Path(path)
        if not path.is_file():
            raise ExmeError(f"{path}: pipeline file not found; pass the path of a PIPELINE.yaml")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ExmeError(f"{path}: not valid YAML ({err}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise ExmeError(f"{path}: expected a mapping of keys (base, checkpoints, suite, output, ...)")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, root=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, root: str | Path = ".", source: str = "pipeline config") -> "PipelineConfig":
        """Validate a mapping (paths relative to ``root``) and check every path; one error for all problems."""
        root = Path(root)
        raw = dict(raw)
        for key in ("base", "output"):
            if isinstance(raw.get(key), str) and raw[key]:
                raw[key] = str(_resolve(root, raw[key]))
        ck = raw.get("checkpoints")
        if isinstance(ck, str):
            raw["checkpoints"] = str(_resolve(root, ck))
        elif isinstance(ck, list):
            raw["checkpoints"] = [str(_resolve(root, c)) if isinstance(c, str) else c for c in ck]
        inc = raw.get("lm_eval_include_path")
        if isinstance(inc, str):
            inc = raw["lm_eval_include_path"] = [inc]
        if isinstance(inc, list):
            raw["lm_eval_include_path"] = [str(_resolve(root, p)) if isinstance(p, str) else p for p in inc]
        suite = raw.get("suite")
        if isinstance(suite, str):
            try:
                kind = spec_kind(suite, root=root)
            except ExmeError as err:
                raise ExmeError(f"{source}: 'suite': {err}; fix the 'suite' key") from None
            if kind == "suite":
                raw["suite"] = str(_resolve(root, suite))
        try:
            config = cls.model_validate(raw)
        except ValidationError as err:
            raise ExmeError(f"{source}: {_format_errors(err)}") from None
        config.check_paths(source)
        get_backend(config.backend).check()
        return config

    def engine_options(self) -> dict[str, Any]:
        """The chosen backend's options, validated: ``backend_options``, else its own section (``vllm:``)."""
        entry = get_backend(self.backend)
        if self.backend_options is not None:
            return entry.parse_options(self.backend_options).model_dump()
        if self.backend in _backend_sections():
            return getattr(self, self.backend).model_dump()
        return entry.parse_options({}).model_dump()

    def evaluator_spec(self):
        """``suite`` (with ``lm_eval_include_path``) parsed by the one parser ``exme eval`` uses too."""
        from exme.evaluate import parse_evaluator_spec

        return parse_evaluator_spec(self.suite, include_path=list(self.lm_eval_include_path or []) or None)

    def check_paths(self, source: str = "pipeline config") -> None:
        """Every input exists and looks like a model folder; the output is not inside an input."""
        _check_model_dir(self.base, "base", source)
        ckpts = self.checkpoint_paths(source)
        if self.top_k > len(ckpts):
            raise ExmeError(
                f"{source}: top_k is {self.top_k} but only {len(ckpts)} checkpoint(s) were found; lower top_k"
            )
        if spec_kind(self.suite) == "suite" and not Path(self.suite).is_file():
            raise ExmeError(f"{source}: suite file {self.suite} not found; fix the 'suite' key")
        out = self.output.resolve()
        for name, inp in [("base", self.base), *[("checkpoint", p) for p in ckpts]]:
            inp = Path(inp).resolve()
            if out == inp or inp in out.parents:
                raise ExmeError(
                    f"{source}: output {self.output} lies inside the {name} folder {inp}; choose an output outside every input"
                )
        if out.exists():
            if not out.is_dir():
                raise ExmeError(f"{source}: output {self.output} exists and is not a folder")
            entries = {p.name for p in out.iterdir()}
            if entries and not entries & set(RUN_FOLDER_FILES):
                raise ExmeError(
                    f"{source}: output {self.output} is a non-empty folder that is not an exme run folder; "
                    "choose a new or empty output folder"
                )

    def checkpoint_paths(self, source: str = "pipeline config") -> list[Path]:
        """The SFT checkpoints in order: listed, globbed, or every ``checkpoint-*`` of a run folder by step."""
        if isinstance(self.checkpoints, list):
            paths = [Path(p) for p in self.checkpoints]
        elif any(ch in self.checkpoints for ch in "*?["):
            paths = sorted((Path(p) for p in _glob.glob(self.checkpoints)), key=_step_key)
            if not paths:
                raise ExmeError(f"{source}: checkpoints glob {self.checkpoints!r} matches nothing")
        else:
            folder = Path(self.checkpoints)
            if not folder.is_dir():
                raise ExmeError(f"{source}: checkpoints folder {folder} not found; fix the 'checkpoints' key")
            paths = sorted((p for p in folder.iterdir() if p.is_dir() and _STEP.search(p.name)), key=_step_key)
            if not paths:
                raise ExmeError(
                    f"{source}: {folder} holds no checkpoint-* folders; list the checkpoints or use a glob"
                )
        if not paths:
            raise ExmeError(f"{source}: 'checkpoints' is empty; give at least one checkpoint")
        if len({p.resolve() for p in paths}) != len(paths):
            raise ExmeError(f"{source}: 'checkpoints' lists the same folder twice")
        for p in paths:
            _check_model_dir(p, "checkpoint", source)
        if self.output_format == "peft":
            from exme.io.source import is_adapter

            full = [p for p in paths if not is_adapter(p)]
            if full:
                raise ExmeError(
                    f"{source}: output_format is peft, but {full[0]} is a full model, not a LoRA adapter; "
                    "output_format: peft needs every checkpoint to be a PEFT adapter of base (or set output_format: model)"
                )
        return paths

    @property
    def storage_url(self) -> str:
        """Where the studies live: ``storage`` or ``sqlite:///<output>/study.db``."""
        return self.storage or f"sqlite:///{(self.output / 'study.db').resolve()}"


def checkpoint_step(path: Path) -> int | None:
    """The training step in a ``checkpoint-N`` folder name, or ``None``."""
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def _step_key(path: Path) -> tuple[int, str]:
    step = checkpoint_step(path)
    return (step if step is not None else -1, str(path))


def _resolve(root: Path, value: str) -> Path:
    """Absolute and normalised (``a/../b`` → ``b``; symlinks kept): the run folder's copy of the
    configuration then works from any directory, and the report shows plain paths."""
    p = Path(value).expanduser()
    return Path(os.path.normpath(os.path.abspath(p if p.is_absolute() else root / p)))


def _backend_sections() -> list[str]:
    """Backends whose options have a section of their own here (a field named after the backend, typed
    by its options model)."""
    fields = PipelineConfig.model_fields
    return [n for n in backend_names() if n in fields and fields[n].annotation is get_backend(n).options]


def _check_model_dir(path: Path, what: str, source: str) -> None:
    path = Path(path)
    if not path.is_dir():
        raise ExmeError(f"{source}: {what} folder {path} not found")
    if what != "base" and (path / "adapter_config.json").is_file():
        return  # a LoRA adapter checkpoint: opened and checked against the base by exme.io.source
    if not (path / "config.json").is_file():
        raise ExmeError(f"{source}: {what} folder {path} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ExmeError(
            f"{source}: {what} folder {path} has no weights (model.safetensors, a sharded index or pytorch_model.bin)"
        )


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (check the spelling; the keys there are {', '.join(_keys_at(e['loc'][:-1]))})")
        elif e["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"'{loc}': {msg}")
    return "; ".join(parts)


def _keys_at(loc: tuple) -> list[str]:
    """The keys a PIPELINE.yaml accepts at ``loc`` (named in the message: installed users have no docs folder)."""
    model: Any = PipelineConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(getattr(model, "model_fields", {}))
