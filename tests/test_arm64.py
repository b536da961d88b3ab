"""The packaged runtime on a Raspberry Pi's CPU: under emulated aarch64 (../shared/tools/arm64, Cortex-A72 as in a Pi 4,
with the wheels of runtimes/raspberry-pi/requirements-pi.txt) an fp32 and an int8 package give x86's greedy tokens.

The int8 package stands in for the quantize stage's output until that stage exists: onnxruntime's quantize_dynamic on
the exported graph, int8 weights for the MatMuls on constant weights (activations quantized at run time), the LM head
left in float, packaged with its mode recorded. Emulation is ~50x slower than this host: few tokens, two processes.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from conftest import REPO
from spj_edge.export import export
from spj_edge.outputs import write_json
from spj_edge.options import PackageOptions
from spj_edge.package import package
from spj_edge.runtime import Generator

pytestmark = pytest.mark.slow

TOOLS = REPO.parent / "shared" / "tools" / "arm64"
EMULATOR = REPO / ".pi4"  # git-ignored; setup.sh is idempotent, later runs only look for updates
REQUIREMENTS = REPO / "runtimes" / "raspberry-pi" / "requirements-pi.txt"
PROMPT, TOKENS = "First Citizen:\nBefore we proceed", 24
INT8 = "dynamic-int8"
TOKENS_SCRIPT = f"""
import json, platform, sys
from spj_edge.runtime import Generator
print(json.dumps({{"machine": platform.machine(), "tokens": [
    list(Generator.load(p).tokens({PROMPT!r}, max_new_tokens={TOKENS}, temperature=0, ignore_eos=True))
    for p in sys.argv[1:]]}}))
"""


@pytest.fixture(scope="module")
def emulator() -> Path:
    if platform.machine() != "x86_64":
        pytest.skip(f"this test emulates aarch64 on an x86_64 host; this machine is {platform.machine()}")
    if not (TOOLS / "setup.sh").is_file():
        pytest.skip(f"{TOOLS / 'setup.sh'} is missing: the aarch64 emulator can't be set up")
    if os.geteuid() != 0 and not (EMULATOR / "sysroot").is_dir():
        pytest.skip("setting up the aarch64 emulator needs root (apt-get installs qemu-user-static)")
    setup = subprocess.run(["bash", TOOLS / "setup.sh", EMULATOR], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PIP_REQUIREMENTS": str(REQUIREMENTS), "HOST_PYTHON": sys.executable})
    if setup.returncode:
        reason = " | ".join(setup.stderr.strip().splitlines()[-3:])
        pytest.skip(f"the aarch64 emulator could not be set up (setup.sh exit {setup.returncode}): {reason}")
    return EMULATOR


def emulated(emulator: Path, *args: str) -> subprocess.CompletedProcess:
    """The aarch64 Python with this repository's pure-Python code on its path, as a Pi runs a copied checkout."""
    return subprocess.run(["bash", TOOLS / "run.sh", emulator, "--", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def packages(nano_checkpoint, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("arm64")
    export(nano_checkpoint, work / "fp32")
    int8 = work / "int8"
    int8.mkdir()
    quantize_dynamic(work / "fp32" / "model.onnx", int8 / "model.onnx", op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8, nodes_to_exclude=["/lm_head/MatMul"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # for the com.microsoft ops
    proto = onnx.load(int8 / "model.onnx")
    next(p for p in proto.metadata_props if p.key == "spj.quantization").value = INT8
    onnx.save(proto, int8 / "model.onnx")
    (int8 / "tokenizer.json").write_bytes((work / "fp32" / "tokenizer.json").read_bytes())
    write_json(int8 / "report.json", {"stage": "quantize (stand-in: quantize_dynamic in tests/test_arm64.py)"})
    for name in ("fp32", "int8"):
        package(work / name, work / f"nano-{name}.spj", PackageOptions(tar=True))
    return {name: work / f"nano-{name}.spj.tar.gz" for name in ("fp32", "int8")}


def test_emulated_aarch64_gives_the_greedy_tokens_of_x86(emulator, packages):
    x86 = {name: Generator.load(path) for name, path in packages.items()}
    assert x86["int8"].manifest["quantization"]["mode"] == INT8
    assert "MatMulInteger" in {n.op_type for n in onnx.load_from_string(x86["int8"].package.files["model.onnx"])
                               .graph.node}
    expected = [list(g.tokens(PROMPT, max_new_tokens=TOKENS, temperature=0, ignore_eos=True)) for g in x86.values()]

    result = emulated(emulator, "-c", TOKENS_SCRIPT, *packages.values())
    assert result.returncode == 0, result.stderr[-3000:]
    arm = json.loads(result.stdout)
    assert arm["machine"] == "aarch64"
    assert arm["tokens"] == expected

    cli = emulated(emulator, "-m", "spj_edge.runtime", "--model", packages["int8"], "--prompt", PROMPT,
                   "--temperature", "0", "--max-new-tokens", TOKENS, "--ignore-eos", "--no-stream")
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout == x86["int8"].generate(PROMPT, max_new_tokens=TOKENS, temperature=0, ignore_eos=True) + "\n"
