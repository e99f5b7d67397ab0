"""The engine-only live model: no transformers module holds weights; every candidate is computed
tensor by tensor and streamed into a sink (the vLLM engine's weight loader in a search). Here the
sink is a dict, so what an engine would receive is compared bitwise with the merge engine's output."""

from __future__ import annotations

import pytest
import torch

from exme.errors import ExmeError
from exme.io import Checkpoint
from exme.pipeline import exme_coefficients
from exme.search.live import LiveModel, NonFiniteCandidate


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


class Sink:
    """Records what a live model streams: every tensor as received, and how many loads."""

    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}
        self.loads = 0

    def __call__(self, weights):
        self.loads += 1
        for name, tensor in weights:
            self.weights[name] = tensor.clone()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bf16 base and two fine-tunes whose MLP matrices exceed one CPU chunk."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("sink")
    base = make_tiny_model(root / "base", seed=3, dtype=torch.bfloat16, hidden_size=64, intermediate_size=1100, num_layers=1)
    return [base] + [make_finetuned(base, root / f"sft{i}", seed=10 + i, scale=0.05) for i in (1, 2)]


def test_streamed_candidate_is_bitwise_the_merge_engine_output_and_no_module_holds_weights(models, tmp_path):
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    base, sft1, sft2 = models
    beta, alphas = 0.7, [0.4, 0.9]
    config = MergeConfig.model_validate({
        "merge_method": "exme", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(sft1), "parameters": {"weight": beta, "alpha": alphas[0]}},
                   {"model": str(sft2), "parameters": {"weight": 1 - beta, "alpha": alphas[1]}}],
    })
    written = _tensors(run_merge(config, tmp_path / "merged", progress=False))
    sink = Sink()
    live = LiveModel.load(base, shell=True)
    live.sink = sink
    assert live.dtype == torch.bfloat16
    assert all(p.device.type == "meta" for p in live.model.parameters())  # the module holds no weights
    live.set_models([sft1, sft2])
    live.apply(exme_coefficients([beta, 1 - beta], alphas))
    assert set(sink.weights) == set(written) == set(live.targets)
    for name, tensor in written.items():
        assert sink.weights[name].dtype == torch.bfloat16 and torch.equal(sink.weights[name], tensor), name

    live.load_checkpoint(sft2)
    assert all(torch.equal(sink.weights[n], t) for n, t in _tensors(sft2).items())
    live.apply_method("ties", density=0.5, weights=[0.5, 0.5])  # a baseline, per tensor like the module path
    module_live = LiveModel.load(base)
    module_live.set_models([sft1, sft2])
    module_live.apply_method("ties", density=0.5, weights=[0.5, 0.5])
    assert all(torch.equal(sink.weights[n], t) for n, t in module_live.state_dict().items())
    live.apply_base()
    assert all(torch.equal(sink.weights[n], t) for n, t in _tensors(base).items())
    assert sink.loads == 4
    with pytest.raises(ExmeError, match="holds no weights of its own"):
        live.state_dict()


def test_a_non_finite_candidate_ends_the_stream_and_the_base_is_written_back(tmp_path):
    from exme.testing import make_finetuned, make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0, dtype=torch.float16)
    sfts = [make_finetuned(base, tmp_path / f"sft{i}", seed=i, scale=0.05) for i in (1, 2)]
    sink = Sink()
    live = LiveModel.load(base, shell=True)
    live.sink = sink
    live.set_models(sfts)
    with pytest.raises(NonFiniteCandidate, match="has NaN or Inf in float16"):
        live.apply([1e7, 0.0])
    assert sink.loads == 2  # the cut stream, then the base
    assert all(torch.equal(sink.weights[n], t) for n, t in _tensors(base).items())
    assert live.current == ("base",)


def test_store_host_without_the_memory_is_one_line_with_bytes_needed_and_available(models, monkeypatch):
    from exme.evaluate.backends import vllm as vllm_backend

    base = models[0]
    nbytes = sum(Checkpoint.open(base).spec(n).numel * 2 for n in Checkpoint.open(base).names)  # bf16
    monkeypatch.setattr(vllm_backend, "host_memory_available", lambda: 5 * nbytes - 1)
    assert vllm_backend.check_host_memory(base, held=3, engine_on_host=False) == 3 * nbytes
    with pytest.raises(ExmeError) as err:  # base + 2 checkpoints + the engine's float32 copy (2× bf16) > 5 copies
        vllm_backend.check_host_memory(base, held=3, engine_on_host=True, dtype="float32")
    message = str(err.value)
    assert f"needs 0.0 GiB ({5 * nbytes} bytes)" in message and f"({5 * nbytes - 1} bytes) is available" in message
    assert "\n" not in message


def test_start_live_checks_the_host_memory_before_loading_anything(models, monkeypatch):
    """``store: host`` with a GPU engine: base + K checkpoints on the host, refused before any read."""
    from exme.evaluate.backends import vllm as vllm_backend

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the memory check")

    monkeypatch.setattr(LiveModel, "__init__", refuse)
    monkeypatch.setattr(vllm_backend, "host_memory_available", lambda: 1000)
    base = models[0]
    nbytes = sum(Checkpoint.open(base).spec(n).numel * 2 for n in Checkpoint.open(base).names)  # bf16
    with pytest.raises(ExmeError) as err:
        vllm_backend.start_live(base, device="cuda", store="host", kept=2)
    message = str(err.value)
    assert f"({3 * nbytes} bytes)" in message and "(1000 bytes) is available" in message and "\n" not in message


_FREED_PROBE = """
import gc, json, torch
from exme.evaluate.backends.vllm import freed_tensors_leave_the_process

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

big = torch.ones(16 << 18)  # 16 MiB freed: glibc's dynamic threshold rises to it, so 4 MiB blocks come from the heap
del big
with freed_tensors_leave_the_process():
    blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, as a swap's streamed tensors
    pin = torch.ones(1 << 15)  # 128 KiB above them on the heap: a heap could not give them back from its top
    before = anon()
    del blocks
    gc.collect()
    after = anon()
print(json.dumps({"freed": before - after}))
"""


def test_tensors_freed_while_weights_load_leave_the_process():
    """Inside the context, 256 MiB of tensor-sized blocks freed under a live small block are returned
    to the kernel at once (without it, glibc's raised threshold keeps them on the heap, pinned: 0 bytes freed)."""
    import json
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the threshold is glibc's")
    proc = subprocess.run([sys.executable, "-c", _FREED_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    freed = json.loads(proc.stdout.strip().splitlines()[-1])["freed"]
    assert freed >= 240 * 2**20, freed
