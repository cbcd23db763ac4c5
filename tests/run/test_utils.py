"""Shared helpers: config merging errors, atomic writes, the CLI error convention."""

import json
import os

import pytest
import torch
from clitools import run_tool
from yacs.config import CfgNode

from mcl_det.config import merge_cfg, save_cfg
from mcl_det.utils.errors import MCLDetError
from mcl_det.utils.io import atomic_torch_save, atomic_write_json, sha256_file


def _defaults() -> CfgNode:
    cfg = CfgNode()
    cfg.A = 1
    cfg.B = CfgNode()
    cfg.B.C = "x"
    return cfg


def test_merge_file_and_opts(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("A: 5\nB:\n  C: y\n")
    cfg = merge_cfg(_defaults(), str(f), ["A", "7"])
    assert cfg.A == 7 and cfg.B.C == "y"


@pytest.mark.parametrize(
    "text,opts,needle",
    [
        ("A: 1\nZZZ: 2\n", [], "ZZZ"),  # unknown key in the file
        ("", ["B.NOPE", "1"], "B.NOPE"),  # unknown key in the overrides
        ("", ["A"], "odd number"),
        ("A: [unclosed\n", [], "cannot parse"),
        ("A: notanint\n", [], "bad config file"),  # type mismatch
    ],
)
def test_merge_errors_are_one_line(tmp_path, text, opts, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(MCLDetError) as e:
        merge_cfg(_defaults(), str(f), opts)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(MCLDetError, match="config file not found"):
        merge_cfg(_defaults(), str(tmp_path / "nope.yaml"))


def test_save_cfg_roundtrip(tmp_path):
    cfg = merge_cfg(_defaults(), None, ["A", "3"])
    save_cfg(cfg, tmp_path / "config.yaml")
    again = merge_cfg(_defaults(), str(tmp_path / "config.yaml"))
    assert again == cfg


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "ckpt.pth"
    atomic_torch_save({"a": 1}, p)
    before = sha256_file(p)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(MCLDetError, match="could not write .*ckpt.pth.*boom.*left intact"):
        atomic_torch_save({"a": Unpicklable()}, p)
    assert sha256_file(p) == before  # the earlier checkpoint is intact
    assert [x.name for x in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind


def test_atomic_write_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    """A full disk mid-write (ENOSPC after 1 MiB) -> MCLDetError naming the file and free space."""
    import errno

    import mcl_det.utils.io as io_mod

    p = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.zeros(10)}, p)
    before = sha256_file(p)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2**20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(io_mod.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(MCLDetError, match=r"usually a full disk.*; \d+ MiB free on that disk"):
        atomic_torch_save({"w": torch.zeros(2**20)}, p)  # 4 MiB
    monkeypatch.undo()
    assert sha256_file(p) == before
    assert [x.name for x in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_json(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2], "b": 1}


def test_run_main_user_error_is_one_line(tmp_path):
    code = (
        "from mcl_det.cli.run import run_main\n"
        "from mcl_det.utils.errors import MCLDetError\n"
        "def main():\n    raise MCLDetError('dataset not found: /x; pass DATA.ROOT')\n"
        "run_main(main)\n"
    )
    (tmp_path / "tool.py").write_text(code)
    r = run_tool(tmp_path / "tool.py", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: dataset not found: /x; pass DATA.ROOT"
    assert "Traceback" not in r.stderr


_FAULTS = """
import resource, sys
import torch
from mcl_det.utils.malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
per_step = []
for _ in range(8):  # allocate, touch and free a 64 MiB buffer, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    del x
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(per_step[-4:]))
"""


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faulting_a_reused_buffer():
    """With glibc's defaults a freed 64 MiB buffer is unmapped and its 16k pages fault in again
    on the next step; after keep_freed_memory() it is reused (a fresh process each)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    runs = {}
    for mode in ("keep", "default"):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]))
    assert runs["keep"][0] is True and runs["default"][0] is False
    assert runs["default"][1] >= 3 * pages  # glibc's default: every step faults the buffer in
    assert runs["keep"][1] < pages // 4  # kept: the last 4 steps reuse it
