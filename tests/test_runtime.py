"""spj_edge.runtime: the same tokens as PyTorch, without torch; verified packages only; clear refusals; threads."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import venv

import pytest
import torch

from conftest import REPO, assert_one_line_error, cli
from spj_edge.checkpoint import load_checkpoint, save_checkpoint
from spj_edge.errors import SPJError
from spj_edge.export import export
from spj_edge.generate import generate
from spj_edge.config import load_preset
from spj_edge.model import Transformer
from spj_edge.package import package
from spj_edge.runtime import Generator
from spj_edge.sampling import SamplingParams

PROMPTS = ["First Citizen:\nBefore we proceed", "Le chat est", "我们的"]
# What the base install lacks: the runtime must not need any of it.
TOOLCHAIN = ("torch", "transformers", "onnx", "safetensors", "rich", "tqdm", "fastokens")
BLOCKER = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TOOLCHAIN!r}:
            raise ImportError(f"{{name}} is blocked: spj_edge.runtime must not import it")

sys.meta_path.insert(0, Blocker())
"""


def runtime_cli(*args, env=None, stdin=None, cwd=REPO, python=sys.executable, timeout=120):
    return subprocess.run([python, "-m", "spj_edge.runtime", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pkg(nano_package):
    """The session's package of nano (conftest), a directory with the same package as a .tar.gz beside it."""
    return nano_package


@pytest.fixture(scope="module")
def generator(pkg):
    return Generator.load(pkg)


@pytest.fixture(scope="module")
def reference(nano_checkpoint):
    return load_checkpoint(nano_checkpoint)


def test_greedy_is_token_identical_to_pytorch(generator, reference):
    model, tokenizer = reference
    for prompt in PROMPTS:
        expected = list(generate(model, tokenizer, prompt, 64, SamplingParams(temperature=0.0), ignore_eos=True))
        produced = list(generator.tokens(prompt, max_new_tokens=64, temperature=0, ignore_eos=True))
        assert len(produced) == 64 and produced == expected, prompt
        text = generator.generate(prompt, max_new_tokens=64, temperature=0, ignore_eos=True)
        decoded = tokenizer.decode(expected)  # may end in a U+FFFD for a character cut short, which text drops
        assert text == (decoded[:-1] if len(text) < len(decoded) else decoded)


def test_seeded_sampling_is_reproducible_and_draws_what_pytorch_draws(generator, reference):
    model, tokenizer = reference
    options = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2)

    def draw(seed):
        return list(generator.tokens(PROMPTS[0], max_new_tokens=48, ignore_eos=True, seed=seed, **options))

    assert draw(7) == draw(7) != draw(8)
    expected = generate(model, tokenizer, PROMPTS[0], 48, SamplingParams(seed=7, **options), ignore_eos=True)
    assert draw(7) == list(expected)


def test_stream_and_left_padded_batch_agree_with_single_prompts(generator):
    options = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    singles = [generator.generate(p, **options) for p in PROMPTS]
    assert ["".join(generator.stream(p, **options)) for p in PROMPTS] == singles
    assert generator.generate_batch(PROMPTS, **options) == singles
    sampled = dict(options, temperature=1.0, seed=3)
    assert generator.generate_batch(PROMPTS, **sampled) == [generator.generate(p, **sampled) for p in PROMPTS]
    # without ignore_eos each row stops at its own EOS, and the defaults come from the package
    assert generator.generate_batch(PROMPTS[:2], max_new_tokens=8, temperature=0) == [
        generator.generate(p, max_new_tokens=8, temperature=0) for p in PROMPTS[:2]]


def test_eight_threads_at_once_match_sequential_runs(generator):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(8)]
    options = dict(max_new_tokens=32, temperature=0, ignore_eos=True)
    sequential = [generator.generate(p, **options) for p in prompts]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        results[i] = generator.generate(prompts[i], **options)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_ids_the_tokenizer_lacks_are_never_sampled(nano_checkpoint, tmp_path):
    """A model whose vocabulary is twice the tokenizer's: with random weights half the probability mass is on ids the
    tokenizer lacks, so 100 hot draws would hit one with near certainty if they were allowed."""
    _, tokenizer = load_checkpoint(nano_checkpoint)
    torch.manual_seed(0)
    model = Transformer(load_preset("nano").replace(vocab_size=2 * tokenizer.get_vocab_size()))
    save_checkpoint(tmp_path / "wide", model, tokenizer)
    export(tmp_path / "wide", tmp_path / "onnx")
    package(tmp_path / "onnx", tmp_path / "wide.spj")
    drawn = list(Generator.load(tmp_path / "wide.spj").tokens("The", max_new_tokens=100, temperature=2.0, seed=0,
                                                              ignore_eos=True))
    assert len(drawn) == 100 and max(drawn) < tokenizer.get_vocab_size()


def test_cli_needs_no_toolchain_and_prints_what_spj_edge_generate_prints(pkg, nano_checkpoint, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert blocked.returncode == 1 and "torch is blocked" in blocked.stderr

    flags = ["--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "64", "--ignore-eos"]
    expected = cli("generate", "--model", nano_checkpoint, *flags)
    assert expected.returncode == 0, expected.stderr
    for model in (pkg, f"{pkg}.tar.gz"):
        result = runtime_cli("--model", model, *flags, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert result.stdout == expected.stdout
    # the HTTP server's modules as well (test_serve runs its server process under this BLOCKER and serves requests)
    served = runtime_cli("serve", "--help", env=env)
    assert served.returncode == 0 and "--max-batch" in served.stdout, served.stderr


def test_stdin_prompts_no_stream_and_verbose(pkg, generator):
    result = runtime_cli("--model", pkg, "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos",
                         "--no-stream", "--verbose", "--threads", "1", stdin="\n".join(PROMPTS[1:]) + "\n")
    assert result.returncode == 0, result.stderr
    expected = [generator.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True) for p in PROMPTS[1:]]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"line": n, "prompt": prompt, "text": text} for n, (prompt, text) in enumerate(zip(PROMPTS[1:], expected), 1)]
    assert "threads 1; KV cache 0.5 KiB per token, 0.1 MiB at the full context of 128 tokens" in result.stderr
    assert result.stderr.count("12 new tokens at") == 2


def test_stdin_replies_are_framed_even_when_the_model_writes_newlines(pkg, generator):
    """Shakespeare's lines are short: 48 greedy tokens after a speaker's name hold line breaks, which a
    line-per-reply protocol would split into several replies. A line that is not UTF-8 is answered with an error
    record and the next line is served."""
    prompts = ["First Citizen:", "MENENIUS:", "ROMEO:"]
    options = dict(max_new_tokens=48, temperature=0, ignore_eos=True)
    expected = [generator.generate(p, **options) for p in prompts]
    assert any("\n" in text for text in expected)
    stdin = b"\n".join([prompts[0].encode(), b"caf\xe9 \xff", *(p.encode() for p in prompts[1:])]) + b"\n"
    result = subprocess.run([sys.executable, "-m", "spj_edge.runtime", "--model", pkg, "--temperature", "0",
                             "--max-new-tokens", "48", "--ignore-eos"], input=stdin, capture_output=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    records = [json.loads(line) for line in result.stdout.decode("ascii").split("\n")[:-1]]
    finals = [r for r in records if "piece" not in r]
    assert finals == [{"line": 1, "prompt": prompts[0], "text": expected[0]},
                      {"line": 2, "error": "prompt is not UTF-8 text (invalid byte 0xe9 at offset 3)"},
                      *({"line": n, "prompt": p, "text": t} for n, p, t in zip((3, 4), prompts[1:], expected[1:]))]
    for final in finals[:1] + finals[2:]:  # the streamed pieces add up to the whole continuation
        assert "".join(r["piece"] for r in records if r.get("piece") is not None and r["line"] == final["line"]) \
            == final["text"]


def test_a_package_from_before_the_tokenizer_facts_runs_as_it_did(pkg, generator, tmp_path):
    """A manifest without eos_token_ids, add_bos_token and chat_template, and a tokenizer.json without the
    post-processor that now puts our <|bos|> in front: the prompt still gets its <bos>, and the text is the same."""
    old = tmp_path / "old.spj"
    shutil.copytree(pkg, old)
    manifest = json.loads((old / "spj.json").read_text())
    special = manifest["special_tokens"]
    del manifest["chat_template"], special["eos_token_ids"], special["add_bos_token"]
    spec = json.loads((old / "tokenizer.json").read_text())
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    data = json.dumps({**spec, "post_processor": None}).encode()
    (old / "tokenizer.json").write_bytes(data)
    manifest["files"]["tokenizer.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (old / "spj.json").write_text(json.dumps(manifest))
    loaded = Generator.load(old)
    assert loaded.encode(PROMPTS[1]) == generator.encode(PROMPTS[1]) and loaded.encode(PROMPTS[1])[0] == 1
    assert loaded.eos_ids == generator.eos_ids == (2,)
    options = dict(max_new_tokens=24, temperature=0)
    assert loaded.generate(PROMPTS[1], **options) == generator.generate(PROMPTS[1], **options)


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer.json"])
def test_a_changed_file_is_refused_naming_it(pkg, tmp_path, name):
    changed = tmp_path / "nano.spj"
    shutil.copytree(pkg, changed)
    data = bytearray((changed / name).read_bytes())
    data[len(data) // 2] ^= 1
    (changed / name).write_bytes(bytes(data))
    with pytest.raises(SPJError, match=f"nano.spj/{name}: sha256 differs from spj.json's"):
        Generator.load(changed)
    assert_one_line_error(runtime_cli("--model", changed, "--prompt", "Hi"), f"{name}: sha256 differs")

    with tarfile.open(tmp_path / "changed.tar.gz", "w:gz") as tar:
        tar.add(changed, arcname="nano.spj")
    with pytest.raises(SPJError, match=f"changed.tar.gz:nano.spj/{name}: sha256 differs from spj.json's"):
        Generator.load(tmp_path / "changed.tar.gz")
    archive = (tmp_path / "changed.tar.gz").read_bytes()
    (tmp_path / "truncated.tar.gz").write_bytes(archive[: len(archive) // 2])
    assert_one_line_error(runtime_cli("--model", tmp_path / "truncated.tar.gz", "--prompt", "Hi"),
                          "truncated.tar.gz: damaged archive")


@pytest.mark.parametrize("as_tar", [False, True])
def test_what_was_verified_is_what_runs(pkg, generator, tmp_path, as_tar):
    """The weights are hashed as they are read and loaded later, by onnxruntime, from a file: the verified one, not a
    file put in its place between the two (a directory package holds its files open; a tar's are inflated into a
    private folder, removed with the package)."""
    import gc

    from spj_edge.runtime import read_package

    copy = tmp_path / "nano.spj"
    shutil.copytree(pkg, copy)
    source = copy
    if as_tar:
        source = tmp_path / "nano.spj.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(copy, arcname="nano.spj")
    package = read_package(source)
    for name, stand_in in (("model.onnx.data", bytes((copy / "model.onnx.data").stat().st_size)),
                           ("model.onnx", b"not a graph")):
        (copy / name).rename(copy / f"verified-{name}")  # swapped by rename: rewriting in place is not covered
        (copy / name).write_bytes(stand_in)
    options = dict(max_new_tokens=16, temperature=0)
    assert Generator(package).generate(PROMPTS[0], **options) == generator.generate(PROMPTS[0], **options)
    folder = package.model_folder
    assert folder != copy and folder.is_dir() and sorted(p.name for p in folder.iterdir()) == [
        "model.onnx", "model.onnx.data"]
    del package
    gc.collect()
    assert not folder.exists()  # the private copy or links go with the package


def test_a_missing_file_or_an_unreadable_manifest_is_refused(pkg, tmp_path):
    broken = tmp_path / "nano.spj"
    shutil.copytree(pkg, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(SPJError, match="nano.spj/tokenizer.json: missing from the package"):
        Generator.load(broken)
    manifest = json.loads((broken / "spj.json").read_text())
    del manifest["generation"]["top_p"], manifest["files"]["model.onnx"]["sha256"]
    (broken / "spj.json").write_text(json.dumps(manifest))
    with pytest.raises(SPJError, match="spj.json: incomplete manifest, it lacks generation.top_p, "
                                       "files.model.onnx.sha256"):
        Generator.load(broken)
    (broken / "spj.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(SPJError, match="spj.json: package format version 3; this runtime reads versions 1, 2"):
        Generator.load(broken)
    with pytest.raises(SPJError, match="nothing: no such package"):
        Generator.load(tmp_path / "nothing")


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    return info, io.BytesIO(data)


@pytest.mark.parametrize("case, bad, why", [
    ("dotdot", member("nano.spj/../evil.py", b"x"), "a path that leaves the package folder"),
    ("absolute", member("/tmp/evil.py", b"x"), "an absolute path"),
    ("symlink", member("nano.spj/model.onnx", kind=tarfile.SYMTYPE, link="/etc/passwd"), "a link"),
    ("hardlink", member("nano.spj/model.onnx", kind=tarfile.LNKTYPE, link="nano.spj/spj.json"), "a link"),
    ("device", member("nano.spj/null", kind=tarfile.CHRTYPE), "not a regular file or folder"),
])
def test_unsafe_archives_are_refused(pkg, tmp_path, case, bad, why):
    archive = tmp_path / f"{case}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("spj.json", "tokenizer.json", "model.onnx"):
            if not (case in ("symlink", "hardlink") and name == "model.onnx"):
                tar.add(pkg / name, arcname=f"nano.spj/{name}")
        tar.addfile(*bad)
    with pytest.raises(SPJError, match=f"{case}.tar.gz: refusing the archive: member .* is {why}"):
        Generator.load(archive)
    assert_one_line_error(runtime_cli("--model", archive, "--prompt", "Hi"), "refusing the archive")


def test_an_archive_must_hold_one_folder(pkg, tmp_path):
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("spj.json", "tokenizer.json", "model.onnx"):
            tar.add(pkg / name, arcname=name)
    with pytest.raises(SPJError, match="a package archive holds exactly one folder"):
        Generator.load(archive)


def test_bad_requests_fail_before_any_work(pkg, generator):
    with pytest.raises(SPJError, match="the model's context is 128, which leaves no room to generate"):
        generator.tokens("word " * 200)
    with pytest.raises(SPJError, match="top_p must be in"):
        generator.generate_batch(["a", "b"], top_p=0)
    too_long = runtime_cli("--model", pkg, "--prompt", "word " * 200)
    assert_one_line_error(too_long, "prompt is", "tokens; the model's context is 128")
    for flags, message in [(["--temperature", "-1"], "temperature must be ≥ 0, got -1.0"),
                           (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
                           (["--top-k", "-3"], "top_k must be ≥ 0, got -3"),
                           (["--repetition-penalty", "0"], "repetition_penalty must be > 0, got 0.0"),
                           (["--temperature", "nan"], "temperature must be a finite number, got nan"),
                           (["--max-new-tokens", "-1"], "max_new_tokens must be ≥ 0, got -1"),
                           (["--threads", "0"], "threads must be ≥ 1, got 0")]:
        assert_one_line_error(runtime_cli("--model", pkg, "--prompt", "Hi", *flags), message)


@pytest.mark.slow
def test_a_fresh_venv_with_pip_install_and_no_extras_generates(pkg, generator, tmp_path):
    """The base install, as a user gets it: a copy of the repository, `pip install .` into a new venv, no torch."""
    source = tmp_path / "spj-edge"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".pi4", "runs", "dist", "__pycache__", "*.egg-info", ".pytest_cache"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    # (tqdm does come: tokenizers needs huggingface_hub, which needs tqdm)
    for module in ("torch", "transformers", "onnx"):
        missing = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert missing.returncode == 1 and "ModuleNotFoundError" in missing.stderr, module

    result = runtime_cli("--model", f"{pkg}.tar.gz", "--prompt", PROMPTS[1], "--temperature", "0",
                         "--max-new-tokens", "32", "--ignore-eos", python=python, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == generator.generate(PROMPTS[1], max_new_tokens=32, temperature=0, ignore_eos=True) + "\n"
    spj_edge = str(env_dir / "bin" / "spj-edge")
    usage = subprocess.run([spj_edge, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert usage.returncode == 0 and "quantize" in usage.stdout, usage.stderr
    assert_one_line_error(subprocess.run([spj_edge, "export", "--model", str(pkg)], capture_output=True, text=True,
                                         cwd=tmp_path), "pip install 'spj-edge[toolchain]'")


def test_a_killed_runtime_leaves_nothing_the_next_one_keeps(pkg, tmp_path):
    """SIGKILL runs no cleanup, so a killed runtime leaves its private folder (for a tar, the weights inflated:
    gigabytes); the next runtime to load a package removes the folders of processes no longer running."""
    scratch = tmp_path / "TMPDIR"
    scratch.mkdir()
    with tarfile.open(tmp_path / "nano.spj.tar.gz", "w:gz") as tar:
        tar.add(pkg, arcname="nano.spj")
    env = {**os.environ, "TMPDIR": str(scratch)}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom spj_edge.runtime import read_package\n"
                               "package = read_package(sys.argv[1])\nprint(flush=True)\ntime.sleep(60)",
                               str(tmp_path / "nano.spj.tar.gz")], stdout=subprocess.PIPE, env=env, cwd=REPO)
    holder.stdout.readline()  # loaded
    left = list(scratch.iterdir())
    assert len(left) == 1 and (left[0] / "model.onnx.data").is_file()
    holder.kill()
    for _ in range(500):  # killed, not yet reaped: a zombie, which kill(pid, 0) still finds (CI's failure)
        with open(f"/proc/{holder.pid}/stat") as stat:
            if stat.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert list(scratch.iterdir()) == left  # no cleanup after SIGKILL
    assert runtime_cli("--model", tmp_path / "nano.spj.tar.gz", "--prompt", "Hi", "--max-new-tokens", "2",
                       env=env).returncode == 0
    holder.wait()
    assert list(scratch.iterdir()) == []  # the dead one's removed, and its own on exit
