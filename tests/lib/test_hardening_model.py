"""Hostile dense.pt files: refused from the archive's metadata, before any tensor is materialised.

An 11 KB checkpoint can describe a 20000x20000 tensor with stride 0 (one float
repeated), a storage that claims a billion elements, or a deflated storage
member that inflates to gigabytes.  Each is refused by ``emrctl model
validate`` and by the daemon's loader with a message naming the key, and
neither process grows by more than 64 MiB doing so (peak RSS of the real
process, from ``wait4``).
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.errors import ModelError
from flexemr.model.dense import init_dense_state, load_dense, save_dense
from flexemr.model.loader import dense_problems, validate_model_dir
from flexemr.model.presets import PRESETS, init_model_dir

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
EXTRA_LIMIT = 64 * MIB
SPEC = PRESETS["tiny"].spec
KEY = "bottom_mlp.0.weight"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), str(REPO), env.get("PYTHONPATH", "")])
    return env


# Peak RSS comes from the child's own /proc/self/status VmHWM, printed at exit: the
# rusage of a child (wait4) would include the parent's RSS at fork time.
_HWM = ("import atexit, runpy, sys\n"
        "def _hwm():\n"
        "    kb = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
        "    sys.stderr.write('\\nVmHWM_KIB %s\\n' % kb); sys.stderr.flush()\n"
        "atexit.register(_hwm)\n")


def _peak_rss(module: str, *args: str) -> tuple[int, str]:
    """(peak resident bytes, exit status + output) of ``python -m module args...`` as a real process."""
    code = _HWM + f"sys.argv = [{module!r}, *{list(args)!r}]\nrunpy.run_module({module!r}, run_name='__main__')\n"
    return _peak_rss_code(code)


def _peak_rss_code(code: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    head, _, kib = p.stderr.rpartition("VmHWM_KIB ")
    assert kib.strip().isdigit(), p.stderr
    return int(kib) * 1024, f"exit {p.returncode}\n{p.stdout}{head}"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(a good tiny model, the same model whose bottom_mlp.0.weight is a stride-0 20000x20000 tensor)."""
    root = tmp_path_factory.mktemp("hostile")
    good, bad = root / "good", root / "bad"
    init_model_dir(good, "tiny", seed=1)
    init_model_dir(bad, "tiny", seed=1)
    state = init_dense_state(SPEC, 1)
    state[KEY] = torch.zeros(1).expand(20000, 20000)   # torch.save keeps the 1-element storage and stride (0, 0)
    torch.save(state, bad / "dense.pt")
    assert (bad / "dense.pt").stat().st_size < 32 * 1024
    return good, bad


def _validate(d: Path) -> tuple[int, str]:
    return _peak_rss("emrctl", "model", "validate", str(d))


def _load(d: Path) -> tuple[int, str]:
    return _peak_rss_code(_HWM + (
        "from flexemr.errors import ModelError\n"
        "from flexemr.model.dense import load_dense\n"
        "from flexemr.model.spec import load_spec\n"
        f"d = {str(d)!r}\n"
        "try:\n"
        "    load_dense(d, load_spec(d))\n"
        "except ModelError as e:\n"
        "    print(e); sys.exit(1)\n"
        "print('loaded')\n"))


@pytest.mark.parametrize("which", ["emrctl model validate", "daemon loader"])
def test_stride0_giant_tensor_refused_with_bounded_memory(model_dirs, which):
    good, bad = model_dirs
    run = _validate if which == "emrctl model validate" else _load
    base, out_good = run(good)
    assert out_good.startswith("exit 0"), out_good
    peak, out = run(bad)
    assert out.startswith("exit 1"), out
    assert f"{KEY} has shape (20000, 20000), model.toml implies (32, 13)" in out
    extra = peak - base
    assert extra < EXTRA_LIMIT, f"{which} grew by {extra / MIB:.0f} MiB refusing the file"


def test_daemon_refuses_giant_tensor_naming_the_key(model_dirs, tmp_path):
    _, bad = model_dirs
    peak, out = _peak_rss("flexemrd", "local", "--model", str(bad), "--embedding-servers", "1", "--engines", "1",
                          "--socket", str(tmp_path / "s.sock"), "--instance", f"thard{os.getpid()}")
    assert not out.startswith("exit 0"), out
    assert f"{KEY} has shape (20000, 20000)" in out
    # The supervisor validates without torch: its whole peak is far below one giant tensor (1.6 GB).
    assert peak < 128 * MIB, f"flexemrd peaked at {peak / MIB:.0f} MiB refusing an 11 KB file"


# --------------------------------------------------------------------------- crafted archives

def _rewrite(path: Path, edit) -> None:
    """Rewrite a torch zip with ``edit(name, data, info) -> (data, compress_type)`` applied to each member."""
    src = zipfile.ZipFile(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data, ctype = edit(info.filename, src.read(info), info)
            dst.writestr(zipfile.ZipInfo(info.filename, info.date_time), data, compress_type=ctype)
    src.close()
    path.write_bytes(buf.getvalue())


def _good_dense(tmp_path: Path) -> Path:
    save_dense(tmp_path, init_dense_state(SPEC, 0))
    return tmp_path / "dense.pt"


def test_storage_claiming_more_elements_than_the_archive_holds_is_refused(tmp_path):
    """The pickle says data/0 holds 10**9 floats; the member holds 1,664 bytes."""
    path = _good_dense(tmp_path)

    def edit(name, data, info):
        if name.endswith("data.pkl"):
            data = data.replace(pickle.dumps(416, protocol=2)[2:-1], pickle.dumps(10**9, protocol=2)[2:-1], 1)
            assert b"J\x00\xca\x9a;" in data
        return data, zipfile.ZIP_STORED

    _rewrite(path, edit)
    problems = dense_problems(tmp_path, SPEC)
    assert any(KEY in p and "storage" in p for p in problems), problems
    with pytest.raises(ModelError) as ei:
        load_dense(tmp_path, SPEC)
    assert any(KEY in p for p in ei.value.problems)


def test_deflated_storage_bomb_is_refused_before_inflating(tmp_path):
    """A storage member deflated from 256 MiB of zeros: refused from the zip directory, never inflated."""
    path = _good_dense(tmp_path)
    big = bytes(256 * MIB)

    def edit(name, data, info):
        if name.endswith("/data/0"):
            return big, zipfile.ZIP_DEFLATED
        return data, zipfile.ZIP_STORED

    _rewrite(path, edit)
    del big
    assert path.stat().st_size < 2 * MIB
    code = ("import resource, sys\n"
            "from flexemr.model.loader import dense_problems\n"
            "from flexemr.model.presets import PRESETS\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"p = dense_problems({str(tmp_path)!r}, PRESETS['tiny'].spec)\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(p); print('extra_kib', after - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(),
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "storage" in out.stdout and KEY in out.stdout, out.stdout
    extra = int(out.stdout.rsplit("extra_kib", 1)[1]) * 1024
    assert extra < EXTRA_LIMIT, f"validation inflated {extra / MIB:.0f} MiB"


def test_right_shape_with_stride0_is_still_checked_for_nan(tmp_path):
    """A legal but odd layout (one NaN repeated by stride 0) is read in its declared shape and refused."""
    state = init_dense_state(SPEC, 0)
    state[KEY] = torch.full((1,), float("nan")).expand(32, 13)
    torch.save(state, tmp_path / "dense.pt")
    problems = dense_problems(tmp_path, SPEC)
    assert problems == [f"{tmp_path / 'dense.pt'}: {KEY} contains NaN or infinite values"]


def test_pickled_code_and_object_tables_are_still_refused(tmp_path):
    init_model_dir(tmp_path, "tiny", seed=0)
    np.save(tmp_path / "tables" / "t0.npy", np.array([object()] * 4, dtype=object), allow_pickle=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "dense.pt")
    problems = validate_model_dir(tmp_path)
    joined = "\n".join(problems)
    assert "t0.npy: not a readable .npy file" in joined
    assert "not a plain state_dict: it pickles" in joined
    with pytest.raises(ModelError):
        load_dense(tmp_path, SPEC)
    assert not (tmp_path / "pwned").exists()


def test_legacy_pickle_checkpoint_with_a_giant_view_is_refused_by_torch_path_with_bounded_memory(tmp_path):
    """torch < 1.6 files are bare pickles the torch-free reader leaves to torch: shapes are compared first there too.

    The baseline is a valid legacy checkpoint, which imports torch the same way.
    """
    dirs = {}
    for name in ("good", "bad"):
        d = dirs[name] = tmp_path / name
        init_model_dir(d, "tiny", seed=1)
        state = init_dense_state(SPEC, 1)
        if name == "bad":
            state[KEY] = torch.zeros(1).expand(20000, 20000)
        torch.save(state, d / "dense.pt", _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(d / "dense.pt")
    for run in (_validate, _load):
        base, out_good = run(dirs["good"])
        assert out_good.startswith("exit 0"), out_good
        peak, out = run(dirs["bad"])
        assert out.startswith("exit 1"), out
        assert f"{KEY} has shape (20000, 20000), model.toml implies (32, 13)" in out
        assert peak - base < EXTRA_LIMIT, f"{run.__name__} grew by {(peak - base) / MIB:.0f} MiB"
