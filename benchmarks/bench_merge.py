"""exme vs mergekit on the same merges: wall time, peak RSS, output agreement, and the I/O floor.

What it does, in one run:

1. Builds three bf16 Llama-style models once into ``/tmp/exme-bench/models/{base,ft1,ft2}``
   (``--size full``: hidden 1536, 16 layers, intermediate 4096, vocab 32000, untied, ~551M
   parameters; the fine-tuned ones are the base plus small seeded noise). Tensors are generated
   and streamed to disk one at a time, so building needs little memory.
2. Installs mergekit into ``benchmarks/.mergekit-venv`` (or ``--mergekit-venv``) when it is missing (torch 2.13 CPU first).
3. Runs exme and mergekit on the same task_arithmetic and TIES (density 0.5) configs,
   alternating tools and repetitions, each under ``/usr/bin/time -v``; also the floor: reading
   every input tensor and writing (and fsyncing) an output of the same size. Before every timed
   run (outside the timed region) the previous output is deleted and ``sync`` is called, so no
   run pays for the disk writeback of the run before it. exme fsyncs its output and mergekit
   does not, so mergekit's output is also ``sync``ed after its timed run and that time reported
   separately (mergekit + sync: the time to a durable output, comparable with exme's).
4. Compares the outputs element by element in units of one bf16 step.
5. Prints a Markdown table and, with ``--results``, writes it to benchmarks/RESULTS.md under
   ``## Merge engine``.

    python benchmarks/bench_merge.py --reps 3 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from exme.io import Checkpoint, TensorSpec  # noqa: E402
from exme.io.writer import ShardedSafetensorsWriter, plan_shards  # noqa: E402

ROOT = Path("/tmp/exme-bench")
MODELS = ROOT / "models"
WORK = ROOT / "work"
MERGEKIT_VENV = HERE / ".mergekit-venv"
SIZES = {
    "full": dict(hidden_size=1536, num_layers=16, intermediate_size=4096, vocab_size=32000, num_heads=16),
    "small": dict(hidden_size=768, num_layers=8, intermediate_size=2048, vocab_size=32000, num_heads=12),
}


# ------------------------------------------------------------------------------------ models


def build_models(size: str) -> dict[str, Path]:
    """Write base, ft1, ft2 (bf16 safetensors, 5GB shards) unless already built for this size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from exme.testing import char_tokenizer

    marker = MODELS / f"built-{size}.json"
    paths = {k: MODELS / k for k in ("base", "ft1", "ft2")}
    if marker.exists():
        return paths
    shutil.rmtree(MODELS, ignore_errors=True)
    MODELS.mkdir(parents=True)
    dims = SIZES[size]
    config = LlamaConfig(
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_layers"],
        intermediate_size=dims["intermediate_size"],
        num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_heads"],  # full multi-head attention, as the issue's ~550M
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    specs = [(n, TensorSpec(tuple(p.shape), torch.bfloat16)) for n, p in meta.state_dict().items()]
    n_params = sum(s.numel for _, s in specs)
    tok = char_tokenizer()
    for role, noise_seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        folder = paths[role]
        folder.mkdir()
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        writer = ShardedSafetensorsWriter(folder, plan_shards(specs, 5 * 10**9))
        for i, (name, spec) in enumerate(specs):
            gen = torch.Generator().manual_seed(1000 + i)
            if name.endswith("norm.weight"):
                base = 1.0 + 0.05 * torch.randn(spec.shape, generator=gen)
            else:
                base = 0.02 * torch.randn(spec.shape, generator=gen)
            if noise_seed is not None:  # fine-tuned = base + small noise (10% of the weight scale)
                g2 = torch.Generator().manual_seed(noise_seed * 100_003 + i)
                base += 0.002 * torch.randn(spec.shape, generator=g2)
            writer.write(name, base.to(torch.bfloat16))
        writer.close()
        print(f"built {folder} ({n_params / 1e6:.0f}M parameters)", flush=True)
    marker.write_text(json.dumps({"size": size, "params": n_params, **SIZES[size]}))
    return paths


# ------------------------------------------------------------------------------------ tools


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # CPU torch first, so no CUDA build is pulled
    subprocess.run([*pip, "mergekit"], check=True)
    return exe


def versions() -> dict[str, str]:
    mk_py = str(MERGEKIT_VENV / "bin" / "python")
    mk = subprocess.run(
        [mk_py, "-c", "import importlib.metadata as m, torch; print(m.version('mergekit'), torch.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()
    import safetensors
    import transformers

    from exme import __version__

    return {
        "exme": __version__,
        "torch (exme)": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "mergekit": mk[0] if mk else "?",
        "torch (mergekit venv)": mk[1] if len(mk) > 1 else "?",
        "python": platform.python_version(),
    }


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def config_yaml(method: str, paths: dict[str, Path]) -> str:
    """The merge configs; ``METHOD-f32`` is the same merge with mergekit computing in float32."""
    if method.endswith("-f32"):
        return config_yaml(method.removesuffix("-f32"), paths).replace("dtype: bfloat16\n", "dtype: float32\nout_dtype: bfloat16\n")
    if method == "linear":
        models = f"  - model: {paths['ft1']}\n    parameters: {{weight: 0.7}}\n  - model: {paths['ft2']}\n    parameters: {{weight: 0.3}}\n"
        return f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n"
    density = ", density: 0.5" if method in ("ties", "dare_ties", "dare_linear") else ""
    models = (
        f"  - model: {paths['ft1']}\n    parameters: {{weight: 0.6{density}}}\n"
        f"  - model: {paths['ft2']}\n    parameters: {{weight: 0.4{density}}}\n"
    )
    return f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n{models}dtype: bfloat16\n"


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (GiB) of the command."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}  # exme from this checkout
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}\n{text[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    system = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    return {"wall_s": seconds, "rss_gib": rss_kb / 2**20, "user_s": user, "sys_s": system}


def settle() -> None:
    """Flush every dirty page to disk, so the next timed run starts with no writeback pending."""
    subprocess.run(["sync"], check=True)


def sync_seconds(folder: Path) -> float:
    """Wall seconds to make every file in ``folder`` durable (``sync FILE...`` fsyncs each one)."""
    files = [str(f) for f in sorted(folder.rglob("*")) if f.is_file()]
    start = time.perf_counter()
    subprocess.run(["sync", *files], check=True)
    return time.perf_counter() - start


def exme_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "exme", "merge", str(cfg), str(out), "--force", "--quiet"]


def mergekit_cmd(exe: Path, cfg: Path, out: Path) -> list[str]:
    return [str(exe), str(cfg), str(out), "--quiet"]


FLOOR_SCRIPT = """
import os, sys
sys.path.insert(0, {src!r})
import torch
from exme.io import Checkpoint
from exme.merge.engine import CHUNK_ELEMENTS
ckpts = [Checkpoint.open(p) for p in {inputs!r}]
with open({out!r}, "wb") as fh:
    for name in ckpts[0].names:
        n = ckpts[0].spec(name).numel
        for start in range(0, n, CHUNK_ELEMENTS):
            chunks = [c.get_flat(name, start, min(n, start + CHUNK_ELEMENTS)) for c in ckpts]
            fh.write(memoryview(chunks[0].view(torch.uint8).numpy()))
    fh.flush()
    os.fsync(fh.fileno())
os.remove({out!r})
"""


def floor_cmd(paths: dict[str, Path], inputs: list[str]) -> list[str]:
    code = FLOOR_SCRIPT.format(src=str(REPO / "src"), inputs=[str(paths[k]) for k in inputs], out=str(WORK / "floor.bin"))
    return [sys.executable, "-c", code]


# ------------------------------------------------------------------------------------ agreement


def _bf16_step(mag: torch.Tensor) -> torch.Tensor:
    """One bf16 step at magnitude m: 2^(floor(log2 m) - 7) (smallest normal step for zeros)."""
    return torch.exp2(torch.floor(torch.log2(mag.clamp_min(2.0**-126))) - 7)


def agreement(a_dir: Path, b_dir: Path, base_dir: Path | None = None, ties_density: float | None = None) -> dict[str, float]:
    """Elementwise agreement of two bf16 models in units of one bf16 step.

    ``within_one_step``: |x − y| ≤ one step at max(|x|, |y|) (strict near zero, where a sum of
    large operands cancels). ``within_one_operand_step``: ≤ one step at max(|x|, |y|, |θ_b|), the
    scale at which float32 summation order can differ. With ``ties_density``: the share of the
    elements differing by more than one operand step that sit in a magnitude tie at a TIES
    threshold (|Δ_i| equal to model i's k-th largest |Δ_i|), where any top-k may choose either.
    """
    from exme.merge.methods import kth_largest

    a, b = Checkpoint.open(a_dir), Checkpoint.open(b_dir)
    base = Checkpoint.open(base_dir) if base_dir else None
    fts = [Checkpoint.open(MODELS / "ft1"), Checkpoint.open(MODELS / "ft2")] if ties_density else []
    if a.names != b.names:
        raise RuntimeError(f"different tensor names: {set(a.names) ^ set(b.names)}")
    n = within1 = within_op = exact = bad = explained = 0
    worst = 0.0
    for name in a.names:
        x, y = a.get(name).float(), b.get(name).float()
        mag = torch.maximum(x.abs(), y.abs())
        diff = (x - y).abs()
        steps = diff / _bf16_step(mag)
        n += x.numel()
        exact += int((x == y).sum())
        within1 += int((steps <= 1.0).sum())
        worst = max(worst, float(steps.max()))
        if base is not None:
            b0 = base.get(name).float()
            off = diff > _bf16_step(torch.maximum(mag, b0.abs()))
            within_op += x.numel() - int(off.sum())
            if fts:
                tied = torch.zeros_like(off)
                for ft in fts:
                    d = (ft.get(name).float() - b0).abs().reshape(-1)
                    k = max(1, int(ties_density * d.numel()))
                    if k < d.numel():
                        tied |= (d == kth_largest(d, k)).reshape(off.shape)
                bad += int(off.sum())
                explained += int((off & tied).sum())
    out = {"elements": n, "equal": exact / n, "within_one_step": within1 / n, "max_steps": worst}
    if base is not None:
        out["within_one_operand_step"] = within_op / n
    if fts:
        out["mismatch_in_threshold_ties"] = explained / bad if bad else 1.0
    return out


# ------------------------------------------------------------------------------------ main


def load_snapshot() -> str:
    up = Path("/proc/loadavg").read_text().split()[:3]
    mem = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)
    return f"load {' '.join(up)}, {int(mem) / 2**20:.1f} GiB available"


def main() -> None:
    global MERGEKIT_VENV
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    parser.add_argument("--build-only", action="store_true", help="only build the models (and mergekit's venv)")
    parser.add_argument("--agreement-only", action="store_true", help="only compare the outputs of an earlier run")
    parser.add_argument("--skip-f32", action="store_true", help="skip the extra mergekit float32 runs for agreement")
    parser.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV,
                        help="a venv with mergekit (made here, torch 2.13 CPU first, when it has no mergekit-yaml)")
    parser.add_argument("--no-agreement", action="store_true",
                        help="time only: skip the linear runs and the output comparison (outputs unchanged since the last one)")
    parser.add_argument("--exme-only", action="store_true",
                        help="time exme alone (methods and the floor, alternating) and print each method's time over task_arithmetic's")
    args = parser.parse_args()
    MERGEKIT_VENV = args.mergekit_venv
    if args.exme_only:
        exme_ratios(args, build_models(args.size))
        return

    paths = build_models(args.size)
    if args.agreement_only:
        print("\n".join(agreement_markdown(agreement_table(args.methods.split(","), paths))))
        return
    if args.build_only:
        ensure_mergekit()
        return
    exe = ensure_mergekit()
    WORK.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    cfgs = {}
    for m in [*methods, "linear"]:
        cfgs[m] = WORK / f"{m}.yaml"
        cfgs[m].write_text(config_yaml(m, paths))

    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    loads = [load_snapshot()]

    def run(tool: str, method: str, rep: int) -> None:
        out = WORK / f"out-{tool}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        (WORK / "floor.bin").unlink(missing_ok=True)
        settle()  # outside the timed region: the previous run's writeback is not charged to this one
        if tool == "exme":
            cmd = exme_cmd(cfgs[method], out)
        elif tool == "mergekit":
            cmd = mergekit_cmd(exe, cfgs[method], out)
        else:
            cmd = floor_cmd(paths, ["base", "ft1", "ft2"])
        r = timed(cmd, WORK / f"log-{tool}-{method}-{rep}.txt")
        if tool == "mergekit":  # exme fsyncs inside its run; this is mergekit's equivalent, timed apart
            r["sync_s"] = sync_seconds(out)
            r["durable_s"] = r["wall_s"] + r["sync_s"]
        runs.setdefault((tool, method), []).append(r)
        extra = f" + sync {r['sync_s']:.1f} s" if "sync_s" in r else ""
        print(
            f"rep {rep} {tool:8s} {method:16s} {r['wall_s']:7.1f} s{extra}  (user {r['user_s']:.1f}, sys {r['sys_s']:.1f})"
            f"  {r['rss_gib']:5.2f} GiB   ({load_snapshot()})",
            flush=True,
        )

    for rep in range(args.reps):
        order = ["exme", "mergekit"] if rep % 2 == 0 else ["mergekit", "exme"]
        for method in methods:
            for tool in order:
                run(tool, method, rep)
        run("floor", "read+write", rep)
        loads.append(load_snapshot())

    # Agreement (outputs of the last repetition), plus linear once for each tool, plus mergekit
    # once more per merge with float32 arithmetic (exme always computes in float32).
    if args.no_agreement:
        table = render(args, runs, {}, loads, methods)
        print(table)
        if args.results:
            write_section(args.results, table)
        return
    for tool in ("exme", "mergekit"):
        run(tool, "linear", 0)
    if not args.skip_f32:
        for m in [*methods, "linear"]:
            cfgs[f"{m}-f32"] = WORK / f"{m}-f32.yaml"
            cfgs[f"{m}-f32"].write_text(config_yaml(f"{m}-f32", paths))
            run("mergekit", f"{m}-f32", 0)
    agree = agreement_table(methods, paths)

    table = render(args, runs, agree, loads, methods)
    print(table)
    if args.results:
        write_section(args.results, table)


def exme_ratios(args, paths: dict[str, Path]) -> None:
    """exme's own methods against its task arithmetic (and the floor): interleaved, median per method."""
    WORK.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(["task_arithmetic", *args.methods.split(",")]))
    times: dict[str, list[float]] = {}
    print(f"start ({load_snapshot()})", flush=True)
    for rep in range(args.reps):
        for method in (methods if rep % 2 == 0 else methods[::-1]):
            cfg = WORK / f"{method}.yaml"
            cfg.write_text(config_yaml(method, paths))
            out = WORK / f"out-exme-{method}"
            shutil.rmtree(out, ignore_errors=True)
            settle()
            r = timed(exme_cmd(cfg, out), WORK / f"log-exme-{method}-{rep}.txt")
            times.setdefault(method, []).append(r["wall_s"])
            print(f"rep {rep} exme {method:16s} {r['wall_s']:6.1f} s (user {r['user_s']:.1f})  ({load_snapshot()})", flush=True)
        settle()
        r = timed(floor_cmd(paths, ["base", "ft1", "ft2"]), WORK / f"log-floor-{rep}.txt")
        times.setdefault("floor", []).append(r["wall_s"])
        print(f"rep {rep} floor {r['wall_s']:6.1f} s  ({load_snapshot()})", flush=True)
    ta = statistics.median(times["task_arithmetic"])
    for method, vals in times.items():
        med = statistics.median(vals)
        print(f"| {method} | {med:.1f} ({min(vals):.1f}–{max(vals):.1f}) | {med / ta:.2f}× |")


def agreement_table(methods: list[str], paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """exme's outputs against mergekit's (bf16 arithmetic, and float32 where that run exists)."""
    agree = {}
    for m in [*methods, "linear"]:
        for suffix, label in (("", "mergekit dtype bfloat16"), ("-f32", "mergekit dtype float32, out_dtype bfloat16")):
            theirs = WORK / f"out-mergekit-{m}{suffix}"
            if theirs.exists():
                agree[f"{m} ({label})"] = agreement(
                    WORK / f"out-exme-{m}", theirs,
                    base_dir=paths["base"] if m != "linear" else None,
                    ties_density=0.5 if m == "ties" else None,
                )
    return agree


def agreement_markdown(agree: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| merge | elements | bitwise equal | within one bf16 step of the result | within one bf16 step of the operands | differing elements in a top-k magnitude tie |",
        "|---|---|---|---|---|---|",
    ]
    for m, a in agree.items():
        op = f"{100 * a['within_one_operand_step']:.4f}%" if "within_one_operand_step" in a else "—"
        tie = f"{100 * a['mismatch_in_threshold_ties']:.2f}%" if "mismatch_in_threshold_ties" in a else "—"
        lines.append(
            f"| {m} | {a['elements']:,} | {100 * a['equal']:.4f}% | {100 * a['within_one_step']:.4f}% (max {a['max_steps']:.0f} steps) | {op} | {tie} |"
        )
    return lines


def render(args, runs, agree, loads, methods) -> str:
    v = versions()
    marker = json.loads(next(MODELS.glob("built-*.json")).read_text())
    lines = [
        "## Merge engine",
        "",
        f"Command: `python benchmarks/bench_merge.py --size {args.size} --reps {args.reps} --results benchmarks/RESULTS.md`",
        f"(run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "",
        f"Machine: {machine()}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Models: three bf16 Llama-style models, {marker['params'] / 1e6:.0f}M parameters each "
        f"(hidden {marker['hidden_size']}, {marker['num_layers']} layers, intermediate {marker['intermediate_size']}, "
        f"vocab {marker['vocab_size']}, untied), fine-tuned = base + N(0, 0.002²) noise; one 5GB shard each; inputs in the page cache.",
        "Both tools: `dtype: bfloat16`, CPU, default options (mergekit: `mergekit-yaml CONFIG OUT --quiet`;"
        " exme: `exme merge CONFIG OUT --quiet`). exme fsyncs its output, mergekit does not.",
        "Before every timed run (exme, mergekit and the floor), outside the timed region, the previous output is deleted and `sync` is called,"
        " so no run pays for another's disk writeback. \"mergekit + sync\": mergekit's wall time plus a `sync` of its output files"
        " run right after it (the time to a durable output, as exme's time includes its fsync).",
        f"Runs alternate between the tools, {args.reps} repetitions; median (min–max) wall time, median peak RSS from `/usr/bin/time -v`.",
        "Load (1/5/15-min load average, memory available) seen between repetitions: " + "; ".join(loads) + ".",
        "Other processes shared the 2 cores during the run, so absolute times are noisy; ratios come from interleaved runs.",
        "",
        "| merge | exme wall s | mergekit wall s | speed-up | mergekit + sync s | speed-up (durable) | exme peak RSS GiB | mergekit peak RSS GiB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def stat(tool, m, key):
        vals = [r[key] for r in runs[(tool, m)]]
        return statistics.median(vals), min(vals), max(vals)

    for m in methods:
        ew, ewl, ewh = stat("exme", m, "wall_s")
        mw, mwl, mwh = stat("mergekit", m, "wall_s")
        dw, dwl, dwh = stat("mergekit", m, "durable_s")
        er, mr = stat("exme", m, "rss_gib")[0], stat("mergekit", m, "rss_gib")[0]
        lines.append(
            f"| {m} | {ew:.1f} ({ewl:.1f}–{ewh:.1f}) | {mw:.1f} ({mwl:.1f}–{mwh:.1f}) | {mw / ew:.1f}× "
            f"| {dw:.1f} ({dwl:.1f}–{dwh:.1f}) | {dw / ew:.1f}× | {er:.2f} | {mr:.2f} | {er / mr:.2f} |"
        )
    lines += ["", "Per repetition, wall s (user / system s): exme; mergekit (+ sync s):", ""]
    for m in methods:
        per = []
        for i, (e, k) in enumerate(zip(runs[("exme", m)], runs[("mergekit", m)])):
            per.append(
                f"rep {i}: exme {e['wall_s']:.1f} ({e['user_s']:.1f} / {e['sys_s']:.1f}); "
                f"mergekit {k['wall_s']:.1f} ({k['user_s']:.1f} / {k['sys_s']:.1f}) + {k['sync_s']:.1f}"
            )
        lines.append(f"- {m}: " + "; ".join(per) + ".")
    fw, fwl, fwh = stat("floor", "read+write", "wall_s")
    lines += [
        "",
        f"Floor (a Python process that reads the three inputs with exme.io in the same chunks and writes and fsyncs an output of the same size, no arithmetic): {fw:.1f} s "
        f"({fwl:.1f}–{fwh:.1f}), peak RSS {stat('floor', 'read+write', 'rss_gib')[0]:.2f} GiB. "
        + ", ".join(f"exme {m} = {stat('exme', m, 'wall_s')[0] / fw:.2f}× the floor" for m in methods)
        + ".",
        "",
        "Output agreement, exme vs mergekit, per element. \"Result step\": one bf16 step at max(|exme|, |mergekit|);"
        " \"operand step\": one bf16 step at max(|exme|, |mergekit|, |θ_base|), the scale at which float32 rounding"
        " of a sum can differ when large operands cancel. Last column: of the elements that differ by more than an"
        " operand step, the share whose |Δ_i| equals model i's top-k threshold (a tie that any top-k may break either way).",
        "",
        *agreement_markdown(agree),
    ]
    return "\n".join(lines) + "\n"


def write_section(results: Path, section: str) -> None:
    """Replace (or append) the ``## Merge engine`` section, leaving other sections as they are."""
    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    pattern = re.compile(r"## Merge engine\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


if __name__ == "__main__":
    main()
