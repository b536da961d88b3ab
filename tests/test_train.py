"""The training loop: accumulation, mixed precision, exact resume after SIGKILL, DDP on one machine and across two
"nodes", and bad input."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHAKESPEARE, UD, cli, run_cli
from grad_probe import SUMMATION_ORDER_BOUND, first_step_gradients, relative_difference
from spj_edge.checkpoint import load_model
from spj_edge.data import build_dataset, tokenize_corpus
from spj_edge.config import load_preset
from spj_edge.model import Transformer
from spj_edge.tokenizer import train_tokenizer
from spj_edge.train import Processes, TrainOptions, fit, heldout_metrics
from spj_edge.tokenizer import token_byte_lengths

NANO = load_preset("nano")
SINGLE = Processes(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def corpus():
    text = (SHAKESPEARE / "val.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer([text], NANO.vocab_size)
    return tokenizer, build_dataset(tokenize_corpus([text], tokenizer), NANO.max_position_embeddings, 0, 0.05)


def first_gradients(corpus, **options):
    tokenizer, dataset = corpus
    torch.manual_seed(0)
    model = Transformer(NANO)
    with first_step_gradients() as gradients:
        fit(model, tokenizer, dataset, TrainOptions(**{"precision": "fp32", "eval_every": 1000, "steps": 1, **options}),
            None, SINGLE)
    return gradients


def test_accumulating_k_micro_batches_equals_one_big_batch(corpus):
    one_big = first_gradients(corpus, batch_size=8, grad_accum=1)
    accumulated = first_gradients(corpus, batch_size=2, grad_accum=4)
    small_only = first_gradients(corpus, batch_size=2, grad_accum=1)
    assert relative_difference(accumulated, one_big) < SUMMATION_ORDER_BOUND
    assert relative_difference(small_only, one_big) > 100 * SUMMATION_ORDER_BOUND, "the batches really differ"


def test_bf16_autocast_training_lowers_the_loss(corpus):
    tokenizer, dataset = corpus
    torch.manual_seed(0)
    model = Transformer(NANO)
    lengths = torch.from_numpy(token_byte_lengths(tokenizer, NANO.vocab_size))
    before = heldout_metrics(model, dataset.val, lengths, 8)["loss"]
    # ten steps (a CPU without bf16 instructions emulates them, slowly) drop the loss by about a nat; half that is
    # still far from what a broken autocast learns (nothing)
    report = fit(model, tokenizer, dataset,
                 TrainOptions(steps=10, batch_size=8, lr=1e-2, precision="bf16", eval_every=10), None, SINGLE)
    assert report["precision"] == "bfloat16"
    after = heldout_metrics(model, dataset.val, lengths, 8)["loss"]
    assert after < before - 0.5, (before, after)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay float32"



def test_heldout_bits_per_byte_scores_only_text_as_eval_and_the_gate_do(corpus):
    """Training's held-out figures in torch against metrics.figures (eval's and the quantizer's gate's, numpy) on the
    same logits: the <eos> targets between documents stand for no bytes and are not scored by either."""
    from spj_edge.metrics import figures

    tokenizer, dataset = corpus
    torch.manual_seed(0)
    model = Transformer(NANO).eval()
    lengths = token_byte_lengths(tokenizer, NANO.vocab_size)
    windows = dataset.val[:8]
    assert (lengths[windows[:, 1:]] == 0).any(), "the windows hold special-token targets"
    ours = heldout_metrics(model, windows, torch.from_numpy(lengths), 4)
    with torch.no_grad():  # a window is the context plus the last target: its logits predict windows[:, 1:]
        numpy_logits = model(torch.from_numpy(windows[:, :-1]))[0].numpy()
    padded = np.concatenate([numpy_logits, numpy_logits[:, -1:]], axis=1)  # figures drops each window's last row
    reference = figures(zip(windows, padded), lengths)
    assert ours["tokens"] == reference.tokens < windows[:, 1:].size
    # the same float32 logits summed in float64 (numpy) and in float32 (torch's cross entropy): tokens·2⁻²⁴ relative
    assert ours["bits_per_byte"] == pytest.approx(reference.bits_per_byte, rel=reference.tokens * 2 ** -24)

TRAIN_ARGS = ["train", "--preset", "nano", "--data", SHAKESPEARE / "val.txt", "--steps", "40", "--batch-size", "8",
              "--precision", "fp32", "--eval-every", "20", "--save-every", "4", "--seed", "7"]


def read_weights(path):
    return load_model(path).state_dict()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference = tmp_path / "reference"
    assert run_cli(*TRAIN_ARGS, "--out", reference).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "spj_edge.cli", *map(str, TRAIN_ARGS), "--out", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "train_state" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 40, f"killed at step {step}: not mid-way"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed")]
    resumed = run_cli(*TRAIN_ARGS, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((killed / "report.json").read_text())
    assert final["step"] == 40 and [h["step"] for h in final["history"]] == [20, 40]
    ref, got = read_weights(reference), read_weights(killed)
    assert all(torch.equal(ref[n], got[n]) for n in ref), "resumed weights differ from the uninterrupted run"
    assert len(leftovers) <= 1, leftovers  # at most the staging directory the kill interrupted


def test_resume_refuses_changed_settings(tmp_path):
    out = tmp_path / "run"
    args = [a if a != "40" else "4" for a in TRAIN_ARGS]
    assert cli(*args, "--out", out).returncode == 0
    result = cli(*[a if a != "7" else "8" for a in args], "--out", out, "--resume")
    assert result.returncode == 2 and "cannot resume with different settings (seed changed)" in result.stderr


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    common = ["--preset", "nano", "--data", SHAKESPEARE / "val.txt", "--steps", "3", "--precision", "fp32",
              "--eval-every", "3", "--tokenizer", tmp_path / "tok.json"]
    assert run_cli("tokenizer", "--data", SHAKESPEARE / "val.txt", "--vocab-size", "512",
                   "--out", tmp_path / "tok.json").returncode == 0
    probe = [sys.executable, str(REPO / "tests" / "grad_probe.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([*probe, str(tmp_path / "single.safetensors"), "train", *map(str, common),
                             "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "single")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", *probe[1:], str(tmp_path / "ddp.safetensors"), "train", *map(str, common),
                          "--batch-size", "4", "--out", str(tmp_path / "ddp")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "report.json").read_text())["processes"] == 2
    a, b = (load_file(tmp_path / f"{run}.safetensors") for run in ("single", "ddp"))
    assert relative_difference([b[k] for k in sorted(b, key=int)], [a[k] for k in sorted(a, key=int)]) \
        < SUMMATION_ORDER_BOUND, "the all-reduced gradients of 2 x 4 windows differ from one process's 2 x 4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_c10d_match_one_process_and_a_resume_on_another_world_size_is_refused(tmp_path):
    """Two torchrun launchers, one per "node", meet at a c10d rendezvous on 127.0.0.1; each rank reads its own
    windows of the prepared shards. Their all-reduced first-step gradients equal one process's with two micro-batches
    (to summation order: grad_probe.SUMMATION_ORDER_BOUND); a checkpoint of 2 processes is not resumed by 1."""
    tokenizer, shards = tmp_path / "tok.json", tmp_path / "shards"
    assert run_cli("tokenizer", "--data", SHAKESPEARE / "val.txt", "--vocab-size", "512", "--out", tokenizer).returncode == 0
    assert run_cli("prepare", "--data", SHAKESPEARE / "val.txt", UD / "en_ewt_dev.txt", "--tokenizer", tokenizer,
                   "--out", shards, "--shard-tokens", "10000").returncode == 0
    common = ["--preset", "nano", "--data", shards, "--steps", "3", "--precision", "fp32", "--eval-every", "3",
              "--batch-size", "4"]
    probe = [str(REPO / "tests" / "grad_probe.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *probe, str(tmp_path / "single.safetensors"), "train", *map(str, common),
                             "--grad-accum", "2", "--out", str(tmp_path / "single")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "spj-test",
                               *probe, str(tmp_path / f"node{node}.safetensors"), "train", *map(str, common),
                               "--out", str(tmp_path / "two-nodes")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for node in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    report = json.loads((tmp_path / "two-nodes" / "report.json").read_text())
    assert report["processes"] == 2 and report["tokens_seen"] == json.loads(
        (tmp_path / "single" / "report.json").read_text())["tokens_seen"]
    rank0 = next(tmp_path / f"node{n}.safetensors" for n in range(2) if (tmp_path / f"node{n}.safetensors").exists())
    a, b = load_file(tmp_path / "single.safetensors"), load_file(rank0)
    assert relative_difference([b[k] for k in sorted(b, key=int)], [a[k] for k in sorted(a, key=int)]) \
        < SUMMATION_ORDER_BOUND, "the all-reduced gradients of 2 nodes x 4 windows differ from one process's 2 x 4"

    before = (tmp_path / "two-nodes" / "model.safetensors").read_bytes()
    resumed = run_cli("train", *common, "--out", tmp_path / "two-nodes", "--resume")
    assert resumed.returncode == 2 and resumed.stderr.strip().splitlines() == [
        f"spj-edge: error: {tmp_path / 'two-nodes'}: ran with 2 processes, now 1: the batches would differ"]
    assert (tmp_path / "two-nodes" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--data", "does/not/exist"], "does/not/exist: no such file or directory"),
    (["--data", "EMPTY"], "directory has no files"),
    (["--data", "LATIN1"], "latin1.txt: not UTF-8 text"),
    (["--data", UD / "en_ewt_dev.txt", "--preset", "huge"], "huge: no such preset"),
    (["--data", UD / "en_ewt_dev.txt", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--data", UD / "en_ewt_dev.txt", "--steps", "-5"], "--steps must be a positive integer, got -5"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    args = [{"EMPTY": tmp_path / "empty", "LATIN1": tmp_path / "latin1.txt"}.get(a, a) for a in args]
    out = tmp_path / "out"
    result = cli("train", "--preset", "nano", *args, "--out", out)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
