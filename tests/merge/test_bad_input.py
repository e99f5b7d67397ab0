"""Every bad input: one line naming the problem, exit code 2, no output folder, inputs untouched."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml


@pytest.fixture
def models(tiny_models, tmp_path):
    """Private copies of the tiny models (these tests damage some of them)."""
    root = tmp_path / "in"
    root.mkdir()
    return type(
        "Models",
        (),
        {
            "root": root,
            "base": shutil.copytree(tiny_models.base, root / "base"),
            "sft1": shutil.copytree(tiny_models.sft1, root / "sft1"),
            "sft2": shutil.copytree(tiny_models.sft2, root / "sft2"),
        },
    )


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def ta_config(models, **extra):
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(models.base),
        "models": [{"model": str(models.sft1), "parameters": {"weight": 0.5}}, {"model": str(models.sft2), "parameters": {"weight": 0.5}}],
    }
    data.update(extra)
    return data


def assert_refused(run_cli, args, message, out, inputs, model_files):
    """Run the CLI, check the one-line message and exit code, no output and no temporary folder."""
    before = {p: model_files.snapshot(p) for p in inputs}
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("exme: error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.exme-*")), "temporary folder left behind"
    assert before == {p: model_files.snapshot(p) for p in inputs}, "an input was modified"


def test_missing_model_folder(models, tmp_path, run_cli, model_files):
    cfg = write_config(tmp_path / "m.yaml", ta_config(models, base_model=str(tmp_path / "no_such_model")))
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], "no_such_model does not exist", out, [models.sft1], model_files)


def test_missing_config_file(tmp_path, run_cli, model_files):
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", tmp_path / "absent.yaml", out], "config file", out, [], model_files)


def test_missing_shard_file(models, tmp_path, run_cli, model_files):
    shard = sorted(models.sft1.glob("model-*.safetensors"))[-1]
    shard.unlink()
    cfg = write_config(tmp_path / "m.yaml", ta_config(models))
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], f"{shard} is missing", out, [models.base, models.sft1], model_files)


def test_tensor_missing_in_one_model(models, tmp_path, run_cli, model_files):
    name = "model.layers.1.mlp.up_proj.weight"
    damaged = model_files.rewrite_model(models.sft2, tmp_path / "in" / "damaged", lambda ts: {k: v for k, v in ts.items() if k != name})
    data = ta_config(models)
    data["models"][1]["model"] = str(damaged)
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], f"tensor '{name}' is missing in model 2 ({damaged})", out, [models.base, damaged], model_files)


def test_shape_mismatch_names_tensor_and_models(models, tmp_path, run_cli, model_files):
    name = "model.layers.0.self_attn.q_proj.weight"
    damaged = model_files.rewrite_model(models.sft2, tmp_path / "in" / "damaged", lambda ts: {**ts, name: ts[name][:, :16].contiguous()})
    data = ta_config(models)
    data["models"][1]["model"] = str(damaged)
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], f"shape mismatch in tensor '{name}': base (32, 32), model 1 (32, 32), model 2 (32, 16)", out, [damaged], model_files)


def test_dtype_mismatch_names_tensor_and_models(models, tmp_path, run_cli, model_files):
    damaged = model_files.rewrite_model(models.sft2, tmp_path / "in" / "bf16", lambda ts: {k: v.bfloat16() for k, v in ts.items()})
    data = ta_config(models)
    data["models"][1]["model"] = str(damaged)
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], "dtype mismatch in tensor", out, [damaged], model_files)
    code, _, err = run_cli("merge", cfg, out)
    assert "torch.float32 in base" in err and f"torch.bfloat16 in model 2 ({damaged})" in err


def test_truncated_safetensors(models, tmp_path, run_cli, model_files):
    file = models.sft2 / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-64])
    out = tmp_path / "out"
    assert_refused(
        run_cli, ["extrapolate", "--base", models.base, "--model", models.sft2, "--alpha", "0.5", out],
        "model.safetensors is truncated", out, [models.base, models.sft2], model_files,
    )


def test_corrupt_safetensors_header(models, tmp_path, run_cli, model_files):
    file = models.sft2 / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"#garbage####"
    file.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(
        run_cli, ["extrapolate", "--base", models.base, "--model", models.sft2, "--alpha", "0.5", out],
        "corrupt safetensors header", out, [models.base, models.sft2], model_files,
    )


def test_nan_in_an_input_tensor_late_in_the_stream(models, tmp_path, run_cli, model_files):
    # The last tensor in storage order: the merge is well under way (shards written) when it fails.
    name = "model.norm.weight"

    def poison(ts):
        t = ts[name].clone()
        t[3] = float("nan")
        return {**ts, name: t}

    damaged = model_files.rewrite_model(models.sft2, tmp_path / "in" / "nan", poison)
    out = tmp_path / "out"
    assert_refused(
        run_cli, ["extrapolate", "--base", models.base, "--model", damaged, "--alpha", "0.5", out, "--max-shard-size", "5KB"],
        f"tensor '{name}' in model 1 ({damaged}) contains NaN or Inf", out, [models.base, damaged], model_files,
    )


def test_inf_produced_by_the_merge(models, tmp_path, run_cli, model_files):
    out = tmp_path / "out"
    assert_refused(
        run_cli, ["extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "1e9", "--dtype", "float16", out],
        "the merge produced NaN or Inf in tensor", out, [models.base, models.sft1], model_files,
    )


def test_yaml_syntax_error(tmp_path, run_cli, model_files):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], "is not valid YAML at line", out, [], model_files)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(paramters={"normalize": True}), "unknown key 'paramters'"),
        (lambda d: d["models"][0]["parameters"].update(wieght=1.0), "unknown key 'models.0.parameters.wieght'"),
        (lambda d: d.update(modules={}), "key 'modules' (per-module merge definitions) is a mergekit feature exme does not support"),
        (lambda d: d.update(slices=[]), "give either models or slices"),
        (lambda d: d.update(merge_method="model_stock"), "'merge_method': Input should be"),
        (lambda d: d.update(parameters={"normalize": [True, False]}), "parameters.normalize: a list (a per-layer gradient) needs a numeric parameter"),
        (lambda d: d.update(parameters={"t": 0.5}), "parameters.t has no meaning for merge_method task_arithmetic"),
        (lambda d: d.update(dtype="float8"), "unknown dtype 'float8'"),
        (lambda d: d.pop("base_model"), "merge_method task_arithmetic needs base_model"),
    ],
)
def test_config_key_errors(models, tmp_path, run_cli, model_files, edit, message):
    data = ta_config(models)
    edit(data)
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], message, out, [], model_files)


@pytest.mark.parametrize(
    "method, model_params, params, message",
    [
        ("ties", {"weight": 1.0, "density": 1.5}, {}, "models[0].parameters.density = 1.5 is out of range; it must be in (0, 1]"),
        ("ties", {"weight": 1.0, "density": 0.0}, {}, "density = 0.0 is out of range"),
        ("dare_linear", {"weight": float("nan"), "density": 0.5}, {}, "weight must be a finite number"),
        ("exme", {"alpha": -1.0}, {"beta": 0.5}, "models[0].parameters.alpha = -1.0 is out of range; it must be >= 0"),
        ("exme", {"alpha": 1.0}, {"beta": 1.5}, "parameters.beta = 1.5 is out of range; it must be in [0, 1]"),
        ("exme", {"alpha": 1.0, "weight": 0.9}, {}, "exme weights must be >= 0 and sum to 1"),
        ("slerp", {}, {"t": 2.0}, "parameters.t = 2.0 is out of range"),
    ],
)
def test_parameter_out_of_range(models, tmp_path, run_cli, model_files, method, model_params, params, message):
    second = dict(model_params)
    if method == "exme" and "weight" in second:
        second["weight"] = 0.3  # 0.9 + 0.3 != 1
    data = {"merge_method": method, "base_model": str(models.base), "models": [{"model": str(models.sft1), "parameters": model_params}]}
    if method != "slerp":
        data["models"].append({"model": str(models.sft2), "parameters": second})
    if params:
        data["parameters"] = params
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], message, out, [], model_files)


def test_negative_alpha_on_the_shortcut(models, tmp_path, run_cli, model_files):
    out = tmp_path / "out"
    assert_refused(run_cli, ["extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "-0.2", out], "--alpha -0.2 must be a number ≥ 0", out, [], model_files)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_inside_an_input_is_always_refused(models, tmp_path, run_cli, model_files, where):
    out = models.sft1 if where == "same" else models.sft1 / "merged"
    before = model_files.snapshot(models.sft1)
    code, _, err = run_cli("extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "0.5", out, "--force")
    assert code == 2 and "is inside input model" in err
    assert model_files.snapshot(models.sft1) == before
    assert not (models.sft1 / "merged").exists()


def test_output_containing_an_input_is_refused_even_with_force(models, tmp_path, run_cli, model_files):
    before = {p: model_files.snapshot(p) for p in (models.base, models.sft1)}
    code, _, err = run_cli("extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "0.5", models.root, "--force")
    assert code == 2 and "contains input model" in err
    assert before == {p: model_files.snapshot(p) for p in before}


def test_existing_output_refused_without_force(models, tmp_path, run_cli, model_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "0.5", out)
    assert code == 2 and "exists and is not empty; pass --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_device_and_shard_size(models, tmp_path, run_cli, model_files):
    out = tmp_path / "out"
    base_args = ["extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "0.5", out]
    assert_refused(run_cli, [*base_args, "--max-shard-size", "5 parsecs"], "cannot read size '5 parsecs'", out, [], model_files)
    if not torch.cuda.is_available():
        assert_refused(run_cli, [*base_args, "--device", "cuda"], "CUDA is not available", out, [], model_files)
    assert_refused(run_cli, [*base_args, "--dtype", "int4"], "unknown output dtype 'int4'", out, [], model_files)


def test_cli_success_prints_the_output_path(models, tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("extrapolate", "--base", models.base, "--model", models.sft1, "--alpha", "0.5", out, "--quiet")
    assert code == 0 and stdout == ""
    code, stdout, _ = run_cli("merge", write_config(tmp_path / "c.yaml", ta_config(models)), tmp_path / "out2")
    assert code == 0 and stdout.strip() == f"wrote {tmp_path / 'out2'}"


def _slices(models, ranges_per_slice):
    return [{"sources": [{"model": str(m), "layer_range": list(r), "parameters": {"weight": 0.5}} for m, r in zip((models.sft1, models.sft2), rs)]}
            for rs in ranges_per_slice]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d, m: d["models"][0]["parameters"].update(weight=[{"filter": "mlpp", "value": 0.3}, {"value": 0.5}]),
         "models[0].parameters.weight: filter 'mlpp' matches no tensor of the models"),
        (lambda d, m: d.update(parameters={"majority_sign_method": ["sum", "count"]}),
         "parameters.majority_sign_method: a list (a per-layer gradient) needs a numeric parameter"),
        (lambda d, m: d.update(merge_method="exme", parameters={"beta": 0.5}, models=[
            {"model": str(m.sft1), "parameters": {"alpha": [{"filter": "mlp", "value": [0.5, -0.2]}, {"value": 0.1}]}},
            {"model": str(m.sft2), "parameters": {"alpha": 0.3}}]),
         "models[0].parameters.alpha[0].value[1] = -0.2 is out of range; it must be >= 0"),
        (lambda d, m: (d.pop("models"), d.update(slices=_slices(m, [[(0, 2), (0, 1)]]))),
         "slices[0].sources[1].layer_range [0, 1] differs from slices[0].sources[0]'s [0, 2]"),
        (lambda d, m: (d.pop("models"), d.update(slices=_slices(m, [[(0, 2), (0, 2)], [(1, 2), (1, 2)]]))),
         "slices[1].sources[0].layer_range [1, 2]: exme accepts slices that cover the layers in order, each once"),
        (lambda d, m: (d.pop("models"), d.update(slices=_slices(m, [[(0, 1), (0, 1)]]))),
         "slices[0].sources[0].layer_range ends at layer 1, but the models have 2 layers"),
        (lambda d, m: d.update(tokenizer_source="union"), "tokenizer_source: union is not supported"),
        (lambda d, m: d.update(merge_method="della"), "'merge_method': Input should be"),
        (lambda d, m: d.update(merge_method="exme", parameters={"beta": 0.5}, models=[
            {"model": str(m.sft1), "parameters": {"alpha": 0.1, }}, {"model": str(m.sft2), "parameters": {"alpha": 0.3}}],
            slices=None) or d.pop("slices"),
         None),
    ],
)
def test_per_tensor_syntax_refusals(models, tmp_path, run_cli, model_files, edit, message):
    """Refused in one line naming the key, before any tensor is read (the inputs are untouched)."""
    data = ta_config(models)
    edit(data, models)
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    if message is None:  # the control: the same config without the mistake merges
        code, _, stderr = run_cli("merge", cfg, out, "--quiet")
        assert code == 0, stderr
        return
    assert_refused(run_cli, ["merge", cfg, out], message, out, [models.base, models.sft1, models.sft2], model_files)


def test_filter_leaving_a_model_without_weight_names_the_tensor(models, tmp_path, run_cli, model_files):
    data = ta_config(models)
    data["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 0.5}]  # nothing for the other tensors
    cfg = write_config(tmp_path / "m.yaml", data)
    out = tmp_path / "out"
    assert_refused(run_cli, ["merge", cfg, out], "needs a weight for every model; no weight entry of", out, [], model_files)
