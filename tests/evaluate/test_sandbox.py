"""The sandbox: hostile programs fail without harming the host, and the run goes on after each."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exme.evaluate.sandbox import (
    SandboxLimits,
    _processes_of,
    _uid_for_slot,
    run_program,
    run_programs,
    sandbox_isolation,
    sandbox_python,
)

LIMITS = SandboxLimits(timeout=3.0, memory_mb=512, max_procs=8)  # generous: CI machines are shared
CORRECT = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"


def _then_a_correct_program_passes():
    result = run_program(CORRECT, LIMITS)
    assert result.passed and result.status == "passed", result.output


def test_correct_solution_passes_and_wrong_one_fails():
    assert run_program(CORRECT, LIMITS).passed
    wrong = run_program(CORRECT.replace("a + b", "a - b"), LIMITS)
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.output


def test_infinite_loop_is_killed_on_time():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", LIMITS)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert LIMITS.timeout <= elapsed < LIMITS.timeout + 3.0
    _then_a_correct_program_passes()


def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_program(bomb, LIMITS, slot=5)
    assert not result.passed
    if os.getuid() == 0 and sandbox_python()[1]:
        live, zombies = _processes_of(_uid_for_slot(5))
        assert live == [] and zombies == 0  # every process of the slot's uid is gone
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).returncode == 0  # host can still fork
    _then_a_correct_program_passes()


def test_child_that_leaves_the_process_group_is_killed():
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    time.sleep(60)\n"
    result = run_program(escape, LIMITS, slot=6)
    assert result.status == "timeout"
    if os.getuid() == 0 and sandbox_python()[1]:
        assert _processes_of(_uid_for_slot(6)) == ([], 0)


def test_memory_hog_fails():
    limits = SandboxLimits(timeout=10, memory_mb=256)  # generous time: touching the pages is slow on a busy host
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))\n", limits)
    assert result.status == "failed" and "MemoryError" in result.output
    _then_a_correct_program_passes()


@pytest.mark.parametrize("opener", ["open(TARGET, 'w').write('x')", "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))"])
def test_writing_outside_the_sandbox_folder_fails(tmp_path, opener):
    target = tmp_path / "escaped.txt"
    result = run_program(f"TARGET = {str(target)!r}\n{opener}\n", LIMITS)
    assert result.status == "failed" and "PermissionError" in result.output
    assert not target.exists()
    inside = run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n", LIMITS)
    assert inside.passed, inside.output


def test_network_socket_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        plain = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
        raw = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        # The same program reaches the server outside the sandbox, so the check below can fail.
        assert subprocess.run([sys.executable, "-c", raw], timeout=10).returncode == 0
        assert not run_program(plain, LIMITS).passed
        raw_result = run_program(raw, LIMITS)
        assert not raw_result.passed
        if os.getuid() == 0:  # the network namespace, not just the Python-level guard, stops it
            assert "unreachable" in raw_result.output.lower()
    finally:
        server.close()
    _then_a_correct_program_passes()


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("EXME_TEST_SECRET_TOKEN", "hunter2")
    result = run_program("import os, sys\nassert 'EXME_TEST_SECRET_TOKEN' not in os.environ\nassert os.getcwd() == os.environ['HOME']\n", LIMITS)
    assert result.passed, result.output


def test_parallel_workers_keep_input_order_and_overlap():
    sleeper = "import time\nprint('start', time.time())\ntime.sleep(1.0)\nprint('end', time.time())\n"
    programs = [CORRECT, "raise SystemExit(3)", sleeper, sleeper, CORRECT]
    results = run_programs(programs, SandboxLimits(timeout=5, memory_mb=512), workers=3)
    assert [r.status for r in results] == ["passed", "failed", "passed", "passed", "passed"]
    assert results[1].returncode == 3
    spans = [[float(line.split()[1]) for line in results[i].output.split("\n") if line] for i in (2, 3)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two sleeps ran at the same time


# The effective capability sets from capget(2) (no /proc inside the sandbox's minimal view).
CAPGET = (
    "import ctypes\n"
    "class H(ctypes.Structure): _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]\n"
    "class D(ctypes.Structure): _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32), ('inheritable', ctypes.c_uint32)]\n"
    "h, d = H(0x20080522, 0), (D * 2)()\n"
    "assert ctypes.CDLL(None).capget(ctypes.byref(h), d) == 0\n"
)


@pytest.mark.skipif(os.getuid() != 0, reason="the capability-dropping fallback exists only for root")
def test_root_without_a_readable_interpreter_drops_capabilities(monkeypatch, tmp_path):
    from exme.evaluate import sandbox

    monkeypatch.setattr(sandbox, "sandbox_python", lambda: (sys.executable, False))
    forks = run_program("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n", LIMITS)
    assert forks.status == "failed" and "creating processes is disabled" in forks.output  # uid 0 ignores RLIMIT_NPROC
    caps = run_program(CAPGET + "assert [d[0].effective, d[1].effective] == [0, 0], list(d)\n", LIMITS)
    assert caps.passed, caps.output
    target = tmp_path / "escaped.txt"
    assert not run_program(f"open({str(target)!r}, 'w').write('x')\n", LIMITS).passed and not target.exists()
    _then_a_correct_program_passes()


# -- a pass means the harness ran every test to the end ------------------------------------------

WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(0, 0) == 0\n"


@pytest.mark.parametrize(
    "trick",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "exit()\n",
        "import os\nos._exit(0)\n",
        "import atexit, os\natexit.register(os._exit, 0)\n",
        "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(0.5)\n",
        "import sys\nsys.stdout.write('pass 0123456789abcdef0123456789abcdef\\n')\n",  # a forged marker on stdout
    ],
)
def test_exiting_before_the_tests_never_passes(trick):
    result = run_program(WRONG + trick, LIMITS, tests=TESTS)
    assert not result.passed and result.status == "failed", result
    if "atexit" not in trick and "stdout" not in trick:  # those two only act after the tests ran
        correct_but_exits = run_program(CORRECT.split("\n\n")[0] + "\n" + trick, LIMITS, tests=TESTS)
        assert not correct_but_exits.passed  # its tests never ran, so it has not shown it is correct


def test_atexit_exit_zero_after_a_failed_assert_is_a_failure():
    result = run_program("import atexit, os\natexit.register(os._exit, 0)\n" + WRONG, LIMITS, tests=TESTS)
    assert not result.passed and "AssertionError" in result.output


def test_main_block_of_a_completion_does_not_run():
    """As in HumanEval's harness: a demo or an exit in `if __name__ == "__main__":` changes nothing."""
    exits = WRONG + "if __name__ == '__main__':\n    import sys\n    sys.exit(0)\n"
    assert not run_program(exits, LIMITS, tests=TESTS).passed
    reads_input = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n"
    assert run_program(reads_input, LIMITS, tests=TESTS).passed


def test_tests_run_in_the_program_namespace_and_can_fail():
    assert run_program(CORRECT.split("\n\n")[0] + "\n", LIMITS, tests=TESTS).passed
    assert not run_program(WRONG, LIMITS, tests=TESTS).passed
    assert not run_program("def add(a, b):\n    return a + b\n", LIMITS, tests="assert add(1, 1) == 3\n").passed


def test_code_task_with_an_early_exit_scores_zero(tmp_path):
    from exme.evaluate.code import mbpp_program

    record = {"text": "add", "test_list": ["assert add(2, 3) == 5"]}
    for completion in ["def add(a, b):\n    return 0\nimport sys\nsys.exit(0)", "def add(a, b):\n    return 0\nimport os\nos._exit(0)"]:
        program, tests = mbpp_program(record, completion)
        assert run_programs([program], LIMITS, tests=[tests])[0].passed is False


# -- the filesystem: nothing outside the program's own folder can be changed ----------------------

needs_isolation = pytest.mark.skipif(
    not sandbox_isolation()["filesystem"], reason="no mount/user namespaces on this machine (the sandbox warns and degrades)"
)


@pytest.fixture
def open_folder():
    """A world-writable folder outside every temp folder, holding one file owned by the test.

    Beside this file, unless the checkout itself lies in a temp folder (a clone in /tmp): the sandbox
    hides those behind tmpfs mounts of its own, so a probe there would not test the read-only mount.
    Then the first writable, world-traversable folder of home, /srv, /opt, /mnt, /var/lib holds it.
    """
    import shutil
    import uuid

    def outside_temp(path: Path) -> bool:
        path = path.resolve()
        return not any(path == Path(t).resolve() or Path(t).resolve() in path.parents for t in ("/tmp", "/var/tmp", "/dev/shm"))

    def usable(path: Path) -> bool:  # the sandboxed program may run as another uid: every parent must be traversable
        return (path.is_dir() and outside_temp(path) and os.access(path, os.W_OK)
                and all(p.stat().st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents]))

    candidates = [Path(__file__).parent, Path.home(), Path("/srv"), Path("/opt"), Path("/mnt"), Path("/var/lib")]
    parent = next((c for c in candidates if usable(c)), None)
    if parent is None:
        pytest.skip("no writable folder outside the temp folders to probe the read-only mount with")
    folder = parent / f".sandbox-probe-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "keep.txt").write_text("host data")
    (folder / "keep.txt").chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


HOSTILE = {
    "fileio": "import _io\nf = _io.FileIO(TARGET, 'w')\nf.write(b'x')\nf.close()\n",
    "mkdir": "import os\nos.mkdir(TARGET)\n",
    "shell": "import subprocess\nsubprocess.run('echo x > ' + TARGET, shell=True, check=True)\n",
    "ctypes": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "fd = libc.open(TARGET.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\nassert fd >= 0, os.strerror(ctypes.get_errno())\n",
    "delete": "import os\nos.remove(KEEP)\n",
    "rename": "import os\nos.rename(KEEP, TARGET)\n",
}


@needs_isolation
@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_hostile_writes_fail_and_score_zero(open_folder, how):
    target, keep = open_folder / "escaped", open_folder / "keep.txt"
    source = f"TARGET = {str(target)!r}\nKEEP = {str(keep)!r}\n" + HOSTILE[how] + WRONG
    result = run_program(source, LIMITS, tests=f"import os\nassert os.path.exists(TARGET) or not os.path.exists(KEEP)\n" + TESTS)
    assert not result.passed and result.fs_isolated, result
    # Stopped by the mounts, not by a Python guard: the folder is read-only, or (minimal view) not there at all.
    assert "Read-only file system" in result.output or (result.reads_isolated and "No such file or directory" in result.output)
    assert not target.exists() and keep.read_text() == "host data"


@needs_isolation
@pytest.mark.parametrize("how", ["fileio", "mkdir", "ctypes"])
def test_hostile_writes_into_what_the_program_can_see_meet_a_read_only_mount(how):
    """The standard library is visible to the program, and read-only."""
    import sysconfig

    from exme.evaluate.sandbox import sandbox_python

    python = sandbox_python()[0]
    stdlib = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    target = Path(stdlib) / "exme-escaped"
    source = f"TARGET = {str(target)!r}\nKEEP = ''\n" + HOSTILE[how] + WRONG
    result = run_program(source, LIMITS, tests=TESTS)
    assert not result.passed and "Read-only file system" in result.output, result
    assert not target.exists() and sysconfig


@needs_isolation
def test_reading_a_world_readable_file_outside_the_programs_folder_fails(open_folder):
    """Only the interpreter, its standard library and the program's own folder are visible."""
    from exme.evaluate import sandbox

    if not sandbox_isolation()["reads"]:
        pytest.skip("this machine gives the sandbox no minimal filesystem view")
    secret = open_folder / "keep.txt"
    secret.chmod(0o644)
    here = Path(sandbox.__file__).resolve()  # exme's own source: world-readable, outside the folder
    for path in (secret, here, Path("/etc/passwd"), Path("/etc/hostname")):
        if not path.exists():
            continue
        program = f"import _io\ndata = _io.FileIO({str(path)!r}).read()\n"
        result = run_program(program, LIMITS)
        assert not result.passed and result.reads_isolated and "No such file or directory" in result.output, (path, result)
        # The same read succeeds outside the sandbox: the test can fail.
        assert path.read_bytes() is not None
    listing = run_program("import os\nprint(sorted(os.listdir('/')))\nassert not os.path.exists('/proc/1') and not os.path.exists('/home')\n", LIMITS)
    assert listing.passed, listing.output


@needs_isolation
def test_the_standard_library_stays_importable_in_the_minimal_view():
    """What code benchmarks' reference solutions import (MBPP: re, math, heapq, collections, ...), and the
    modules whose C parts load shared libraries of their own (sqlite3, ssl, lzma, bz2, zlib, ctypes, decimal)."""
    modules = ["re", "math", "heapq", "collections", "itertools", "functools", "operator", "string", "bisect", "cmath",
               "random", "statistics", "fractions", "decimal", "datetime", "json", "hashlib", "array", "struct",
               "copy", "typing", "unicodedata", "textwrap", "sqlite3", "ssl", "lzma", "bz2", "zlib", "ctypes",
               "zoneinfo", "csv", "pickle", "io", "tempfile", "enum", "dataclasses", "difflib", "queue", "uuid"]
    program = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + (
        "import sqlite3, hashlib, lzma, zlib, decimal\n"
        "assert sqlite3.connect(':memory:').execute('select 6 * 7').fetchone() == (42,)\n"
        "assert hashlib.sha256(b'abc').hexdigest().startswith('ba7816bf')\n"
        "assert lzma.decompress(lzma.compress(b'x' * 100)) == b'x' * 100 and zlib.crc32(b'abc') == 891568578\n"
        "assert str(decimal.Decimal(1) / decimal.Decimal(8)) == '0.125'\n"
    )
    result = run_program(program, LIMITS)
    assert result.passed, result.output


@needs_isolation
@pytest.mark.parametrize("folder", ["/tmp", "/var/tmp", "/dev/shm"])
def test_temp_folders_are_private_and_empty(folder):
    import uuid

    host_file = Path(folder) / f"exme-sandbox-probe-{uuid.uuid4().hex[:8]}"
    host_file.write_text("host")
    try:
        program = f"import os\nassert not os.path.exists({str(host_file)!r})\nopen({str(host_file)!r}, 'w').write('inside')\n"
        result = run_program(program.replace("open(", "__import__('_io').FileIO(").replace(", 'w').write('inside')", ", 'w').write(b'inside')"), LIMITS)
        assert result.passed, result.output  # it may write there, into a tmpfs of its own
        assert host_file.read_text() == "host"
    finally:
        host_file.unlink()


@needs_isolation
def test_the_program_keeps_a_writable_folder_of_its_own():
    result = run_program("import os\nopen('a.txt', 'w').write('ok')\nos.mkdir('sub')\nassert os.listdir('.') \n", LIMITS)
    assert result.passed, result.output


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(), reason="needs root to switch to a plain user")
def test_plain_user_gets_the_same_isolation(open_folder):
    """The mount and network namespaces come from a user namespace when not root (no uid switch)."""
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    sandbox_py = Path(__file__).resolve().parents[2] / "src" / "exme" / "evaluate" / "sandbox.py"
    script = open_folder / "probe.py"
    script.write_text(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('sb', {str(sandbox_py)!r})\n"
        "sb = importlib.util.module_from_spec(spec); sys.modules['sb'] = sb; spec.loader.exec_module(sb)\n"
        f"src = {('import os' + chr(10) + 'os.remove(' + repr(str(open_folder / 'keep.txt')) + ')' + chr(10))!r}\n"
        "r = sb.run_program(src, sb.SandboxLimits(timeout=10))\n"
        "ok = sb.run_program('import os\\nassert os.getuid() != 0\\n', sb.SandboxLimits(timeout=10))\n"
        "print(json.dumps([r.passed, r.fs_isolated, r.net_isolated, ok.passed, ok.output]))\n"
    )
    script.chmod(0o644)
    if not all(p.stat().st_mode & 0o001 for p in sandbox_py.parents) or not all(p.stat().st_mode & 0o001 for p in script.parents):
        pytest.skip("the source tree is not readable by a plain user")
    run = subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "/usr/bin/python3", "-I", str(script)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert run.returncode == 0, run.stderr
    passed, fs, net, ok, out = json.loads(run.stdout.strip().splitlines()[-1])
    if not fs:
        pytest.skip("unprivileged user namespaces are disabled on this machine")
    assert (passed, fs, net, ok) == (False, True, True, True), out
    assert (open_folder / "keep.txt").read_text() == "host data"


def test_without_filesystem_isolation_the_result_says_so_and_the_guard_still_refuses(tmp_path):
    limits = SandboxLimits(timeout=5, memory_mb=512, isolate_filesystem=False)
    result = run_program(f"open({str(tmp_path / 'x')!r}, 'w')\n", limits)
    assert result.fs_isolated is False and not result.passed and "PermissionError" in result.output
    assert not (tmp_path / "x").exists()
