"""Fault injection for what a user relies on (docs/guarantees.md): run-folder locks, checkpoint checksums and
the refusal of damaged checkpoints, one checkpoint per step and run configuration, a cut metrics line, and
sweep workers that die with their parent."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spannorm.cli.main import main
from spannorm.model.checksums import MANIFEST_NAME, CorruptCheckpoint, write_manifest
from spannorm.model.io import load_model
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.run_lock import LOCK_NAME, RunFolderBusy, RunLock, hold_run_folder

TEXT = (inspect.getsource(json.decoder) + inspect.getsource(textwrap)).encode()
SRC = str(Path(__file__).resolve().parents[1] / "src")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(tmp_path: Path, steps: int = 6) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_bytes(TEXT)
    return [f"--{o}" for o in (
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context_length=32", f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4", f"train.steps={steps}", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.precision=fp32",
        "train.progress=none", "train.tensorboard=false", "train.device=cpu")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 (each test copies it)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", "--out", str(root / "run"), *tiny(root)]) == 0
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(trained, tmp_path / "t")
    return tmp_path / "t" / "run"


# ---------------------------------------------------------------------- locks
def test_lock_refuses_a_live_holder_and_takes_over_after_kill_9(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from spannorm.train.run_lock import RunLock
        RunLock({str(run)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
        """)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((run / LOCK_NAME).read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname() and owner["started"] > 0
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on host"):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert (run / LOCK_NAME).is_file()  # kill -9 leaves it, stale
        lock = RunLock(run)
        lock.acquire()  # a dead pid on this host: taken over
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (run / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": 1.0, "proc_start": -5}))
    lock = RunLock(tmp_path)
    lock.acquire()  # our own pid, but a process start time that is not ours: another process's stale lock
    lock.release()


def test_hold_run_folder_leaves_no_folder_behind_when_the_command_is_refused(tmp_path):
    from spannorm.config import ConfigError

    target = tmp_path / "a" / "b"
    with pytest.raises(ConfigError):
        with hold_run_folder(target):
            assert (target / LOCK_NAME).is_file()
            raise ConfigError("bad input found after the lock was taken")
    assert not (tmp_path / "a").exists()


def test_two_concurrent_trains_into_one_folder_one_runs_the_other_exits_2(tmp_path):
    args = [sys.executable, "-m", "spannorm", "train", "--out", str(tmp_path / "same"), *tiny(tmp_path, steps=20)]
    main(["train", "--out", str(tmp_path / "warm"), *tiny(tmp_path, steps=1)])  # fill the token cache first
    procs = [subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused, refused
    assert "in use by pid" in refused or "already holds" in refused, refused
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert summary["steps"] == 20 and not (tmp_path / "same" / LOCK_NAME).exists()


def test_train_takes_over_a_stale_lock(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 1.0}))
    assert main(["train", "--out", str(out), *tiny(tmp_path, steps=2)]) == 0
    assert (out / "summary.json").is_file() and not (out / LOCK_NAME).exists()


def test_a_lock_held_on_another_host_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 1.0}))
    args = tiny(tmp_path, steps=2)
    before = snapshot(tmp_path)
    assert main(["train", "--out", str(out), *args]) == 2
    assert "host elsewhere.example" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------- checksums
def test_checkpoints_carry_checksums_of_every_file(trained):
    ckpt = trained / "run" / "checkpoints" / "step_00000006"
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    listed = set(manifest["files"])
    on_disk = {p.name for p in ckpt.iterdir() if p.name != MANIFEST_NAME}
    assert listed == on_disk and {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= listed
    ckpt_io.verify_checkpoint(ckpt)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_shape(path: Path) -> None:
    tensors = load_file(str(path))
    name = next(n for n in tensors if n.endswith("weight") and tensors[n].dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(path))


def _missing_key(path: Path) -> None:
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path))


def _extra_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["stowaway.weight"] = torch.zeros(2)
    save_file(tensors, str(path))


DAMAGE = {
    "truncated safetensors": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "flipped byte": ("model.safetensors", _flip_a_byte),
    "bad JSON": ("trainer_state.json", lambda p: p.write_text('{"step": 6,')),
    "bad model config": ("model_config.json", lambda p: p.write_text("[1, 2]")),
    "missing key": ("model.safetensors", _missing_key),
    "wrong shape": ("model.safetensors", _other_shape),
    "extra tensor": ("model.safetensors", _extra_tensor),
}


@pytest.mark.parametrize("manifest", ["checksums", "rewritten manifest", "no manifest (old checkpoint)"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_intact_one(trained, tmp_path, damage, manifest):
    run = copy_run(trained, tmp_path)
    latest = run / "checkpoints" / "step_00000006"
    name, damage_fn = DAMAGE[damage]
    damage_fn(latest / name)
    if manifest == "rewritten manifest":  # damage that the checksums cannot see: the structure check must
        write_manifest(latest, [p.name for p in latest.iterdir() if p.name != MANIFEST_NAME])
    elif manifest == "no manifest (old checkpoint)":
        (latest / MANIFEST_NAME).unlink()
    structural = damage in ("missing key", "wrong shape", "extra tensor", "bad JSON", "bad model config",
                            "truncated safetensors")
    if manifest != "checksums" and not structural:
        pytest.skip("a flipped data byte is found by the checksums only")
    with pytest.raises(CorruptCheckpoint) as err:
        ckpt_io.resolve_checkpoint(run)
    message = str(err.value)
    assert name in message and "step_00000004" in message and "\n" not in message
    assert ckpt_io.resolve_checkpoint(run, use_intact=True).name == "step_00000004"


@pytest.mark.parametrize("command", ["eval", "generate", "export-hf", "init-from", "resume"])
def test_every_command_refuses_a_damaged_checkpoint_in_one_line(trained, tmp_path, capsys, command):
    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / "step_00000006" / "model.safetensors").write_bytes(b"\x00" * 10)
    argv = {"eval": ["eval", str(run)],
            "generate": ["generate", str(run), "--max-new-tokens", "2"],
            "export-hf": ["export-hf", str(run), "--out", str(tmp_path / "hf")],
            "init-from": ["train", "--out", str(tmp_path / "new"), "--init-from", str(run), *tiny(tmp_path)],
            "resume": ["train", "--out", str(run), "--resume", *tiny(tmp_path, steps=8)]}[command]
    before = snapshot(tmp_path)  # tiny() above has written the corpus
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "model.safetensors" in line and "step_00000004" in line, line
    assert snapshot(tmp_path) == before


def test_resume_with_use_intact_continues_from_the_newest_intact_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / "step_00000006" / "optimizer.json").write_text("{")
    assert main(["train", "--out", str(run), "--resume", "--use-intact", *tiny(tmp_path, steps=8)]) == 0
    assert "using the newest intact checkpoint" in capsys.readouterr().err
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8
    ckpt_io.verify_checkpoint(run / "checkpoints" / "step_00000006")  # rewritten by the resumed run


def test_a_checkpoint_without_checksums_still_loads(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000006"
    (ckpt / MANIFEST_NAME).unlink()
    model = load_model(ckpt)
    assert ckpt_io.resolve_checkpoint(run) == ckpt and model.cfg.n_layers == 2


# ---------------------------------------------------------------------- one checkpoint per step and settings
def test_a_resume_with_changed_settings_never_reuses_a_step_folder_of_other_settings(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    old_weights = (root / "step_00000006" / "model.safetensors").read_bytes()
    (root / "latest").write_text("step_00000004\n")  # killed between the step-6 rename and the pointer update
    assert main(["train", "--out", str(run), "--resume", *tiny(trained), "--optim.lr=5e-3"]) == 0
    saved = json.loads((root / "step_00000006" / "run_config.json").read_text())
    assert saved["optim"]["lr"] == 5e-3
    assert (root / "step_00000006" / "model.safetensors").read_bytes() != old_weights
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint"] == "checkpoints/step_00000006"


def test_a_resume_with_the_same_settings_keeps_the_intact_step_folder(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    inode = (root / "step_00000006" / "model.safetensors").stat().st_ino
    (root / "latest").write_text("step_00000004\n")
    assert main(["train", "--out", str(run), "--resume", *tiny(trained)]) == 0  # the settings it was trained with
    assert (root / "step_00000006" / "model.safetensors").stat().st_ino == inode


def test_a_cut_last_metrics_line_does_not_break_resume(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "train_lo')
    assert main(["train", "--out", str(run), "--resume", *tiny(tmp_path, steps=8)]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_on_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume", *tiny(tmp_path)]) == 2
    assert "holds no run to continue" in one_line_error(capsys)
    assert list((tmp_path / "empty").iterdir()) == []


def test_overwrite_deletes_only_what_train_wrote_under_checkpoints(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    mine = run / "checkpoints" / "my_notes.txt"
    mine.write_text("keep me")
    (run / "checkpoints" / "step_99999999").mkdir()  # not a checkpoint: no trainer_state.json
    assert main(["train", "--out", str(run), "--overwrite", *tiny(tmp_path, steps=2)]) == 0
    assert mine.read_text() == "keep me" and (run / "checkpoints" / "step_99999999").is_dir()
    assert not (run / "checkpoints" / "step_00000006").exists()


# ---------------------------------------------------------------------- sweep workers
def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it; it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_sweep_workers_die_when_the_parent_is_killed(tmp_path):
    plan = tmp_path / "plan.yaml"
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT)
    plan.write_text(textwrap.dedent(f"""
        name: orphan
        base:
          config:
            model: {{d_model: 32, n_heads: 2, context_length: 32}}
            data: {{path: {corpus}, cache_dir: {tmp_path / 'cache'}}}
            train: {{steps: 100000, batch_size: 4, eval_every: 0, checkpoint_every: 0, progress: none,
                     tensorboard: false, device: cpu}}
        grid: {{placements: [pre], depths: [2], lrs: [1.0e-3], seeds: [0]}}
        measure: {{layer_stats: false}}
        """))
    parent = subprocess.Popen([sys.executable, "-m", "spannorm", "sweep", str(plan), "--out", str(tmp_path / "sw"),
                               "--workers", "1"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "sw" / "runs" / "pre-L2-dense-lr1e-3-s0" / LOCK_NAME
    deadline = time.time() + 300
    while not lock.is_file() and time.time() < deadline and parent.poll() is None:
        time.sleep(0.5)
    assert lock.is_file(), "the worker never started its run"
    time.sleep(0.5)
    worker = json.loads(lock.read_text())["pid"]
    assert worker != parent.pid
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        if not _running(worker):
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived its killed parent by 30 s")


# ---------------------------------------------------------------------- plans and sweep folders
def _plan(**grid):
    from spannorm.experiments.plan import parse_plan

    return parse_plan({"name": "p", "grid": {"placements": ["pre", "span"], "depths": [2], **grid}})


def test_run_ids_carry_the_exact_learning_rate():
    from spannorm.experiments.plan_checks import exact_lr_tag

    assert [exact_lr_tag(v) for v in (3e-3, 1.5e-3, 1e-2, 0.0003)] == ["3e-3", "1.5e-3", "1e-2", "3e-4"]
    plan = _plan(lrs=[1e-3, 1.0000001e-3])
    ids = [spec.run_id for spec in plan.expand()]
    assert len(ids) == len(set(ids)) == 4 and "pre-L2-dense-lr1.0000001e-3-s0" in ids


def test_a_sweep_folder_accepts_its_plan_extended_and_refuses_a_cut_one(tmp_path):
    from spannorm.config import ConfigError
    from spannorm.experiments.plan_checks import check_sweep_folder

    small = _plan(lrs=[1e-3])
    record = {**small.expand()[0].to_dict(), "status": "done"}
    (tmp_path / "index.json").write_text(json.dumps({"plan": "p", "runs": [record]}))
    (tmp_path / "plan.yaml").write_text("name: p\n")
    results = {record["run_id"]: record}
    check_sweep_folder(_plan(lrs=[1e-3, 3e-3], seeds=[0, 1]), tmp_path, results)  # extended: accepted
    with pytest.raises(ConfigError, match="no longer asks for 1 run"):
        check_sweep_folder(_plan(lrs=[3e-3]), tmp_path, results)


def test_safetensors_files_get_the_ordinary_file_mode_not_0600(trained, tmp_path):
    from spannorm.model.io import FILE_MODE

    ckpt = trained / "run" / "checkpoints" / "step_00000006"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (ckpt / name).stat().st_mode & 0o777 == FILE_MODE
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == FILE_MODE
