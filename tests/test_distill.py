"""Distillation: the KD loss against its formula, the teacher kept frozen, a student that learns the teacher, resume
and the pruned-student path, and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import UD, assert_one_line_error, cli
from spj_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from spj_edge.distill import agreement_with_teacher, distill, distillation_loss, kd_loss
from spj_edge.errors import SPJError
from spj_edge.config import load_preset
from spj_edge.model import Transformer
from spj_edge.options import PruneOptions
from spj_edge.prune import prune
from spj_edge.tokenizer import train_tokenizer
from spj_edge.train import TrainOptions, load_dataset

TINY = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
DATA = [UD / "en_ewt_dev.txt", UD / "fr_gsd_dev.txt"]
FAST = dict(batch_size=8, precision="fp32", eval_every=1000, eval_windows=8)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_kd_loss_is_zero_for_identical_distributions():
    logits = torch.randn(2, 7, 50) * 3
    for temperature in (0.5, 1.0, 4.0):
        assert kd_loss(logits, logits.clone(), temperature).item() == 0.0
    # a shift by a constant does not change a softmax
    assert abs(kd_loss(logits + 5.0, logits, 2.0).item()) < 1e-5


def test_kd_loss_equals_the_formula():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator) * 2
    for temperature in (1.0, 2.5):
        p = torch.softmax(teacher.double() / temperature, -1)
        q = torch.softmax(student.double() / temperature, -1)
        # T² · Σ_v p log(p / q), averaged over the 10 positions
        expected = temperature ** 2 * (p * (p / q).log()).sum(-1).mean()
        torch.testing.assert_close(kd_loss(student, teacher, temperature).double(), expected, rtol=1e-5, atol=1e-6)
    # forward KL: the teacher's distribution weights the log ratio, swapping them gives another number
    assert abs(kd_loss(student, teacher, 1.0) - kd_loss(teacher, student, 1.0)) > 1e-3
    # bf16 logits under autocast: computed in float32, not in bf16
    low = kd_loss(student.bfloat16(), teacher.bfloat16(), 1.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 1.0))


def test_loss_mixes_cross_entropy_by_alpha_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    config = load_preset("nano")
    teacher, student = Transformer(config), Transformer(config)
    teacher.train()
    batch = torch.randint(3, config.vocab_size, (2, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    loss = distillation_loss(teacher, 2.0, 0.3)(student, inputs, targets)
    loss.backward()
    with torch.no_grad():
        s, t = student(inputs)[0], teacher(inputs)[0]
    expected = 0.7 * kd_loss(s, t, 2.0) + 0.3 * F.cross_entropy(s.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss.detach(), expected)
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_distilled_student_moves_towards_the_teacher(nano_checkpoint, tiny_preset, tmp_path):
    teacher, tokenizer = load_checkpoint(nano_checkpoint)
    opts = TrainOptions(steps=40, lr=1e-2, **FAST)
    dataset = load_dataset(DATA, tokenizer, TINY["max_position_embeddings"], opts)
    torch.manual_seed(opts.seed)
    untrained = Transformer(load_preset(tiny_preset))
    before = agreement_with_teacher(untrained, teacher, dataset.val[:8], 8)

    out = tmp_path / "student"
    distill(nano_checkpoint, out, preset=tiny_preset, data=DATA, opts=opts, temperature=1.0)
    written = json.loads((out / "report.json").read_text())
    heldout = written["distillation"]["heldout"]
    assert written["stage"] == "distill" and written["step"] == 40
    assert heldout["kl_to_teacher"] < before["kl_to_teacher"] - 0.5, (before, heldout)
    assert heldout["top1_agreement"] > before["top1_agreement"]
    assert heldout["kl_to_teacher"] == pytest.approx(
        agreement_with_teacher(load_model(out), teacher, dataset.val[:8], 8)["kl_to_teacher"], rel=1e-5)
    assert 0 < written["heldout"]["bits_per_byte"] and 0 < heldout["teacher_bits_per_byte"]
    assert load_model(out).config.hidden_size == TINY["hidden_size"]


def test_a_pruned_teacher_distills_and_resume_refuses_a_changed_temperature(nano_checkpoint, tmp_path):
    prune(nano_checkpoint, tmp_path / "pruned", options=PruneOptions(ffn_ratio=0.5, importance="l1"))
    out = tmp_path / "recovered"
    opts = TrainOptions(steps=4, save_every=2, **FAST)
    distill(nano_checkpoint, out, student_dir=tmp_path / "pruned", data=DATA, opts=opts)
    assert load_model(out).config.intermediate_size == 96
    with pytest.raises(SPJError, match="cannot resume with different settings \\(temperature changed\\)"):
        distill(nano_checkpoint, out, student_dir=tmp_path / "pruned", data=DATA, opts=opts, temperature=2.0,
                resume=True)
    finished = load_model(out).state_dict()
    _, _, report = distill(nano_checkpoint, out, student_dir=tmp_path / "pruned", data=DATA, opts=opts, resume=True)
    assert report["step"] == 4 and "heldout" in report["distillation"]
    assert all(torch.equal(finished[n], w) for n, w in load_model(out).state_dict().items())


@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory):
    """A nano checkpoint whose tokenizer was trained on other text: same vocabulary size, different ids."""
    out = tmp_path_factory.mktemp("foreign") / "student"
    tokenizer = train_tokenizer([(UD / "de_gsd_dev.txt").read_text(encoding="utf-8")], 512)
    save_checkpoint(out, Transformer(load_preset("nano")), tokenizer)
    return out


# These go through the CLI (`spj-edge distill`).
@pytest.mark.parametrize("args, message", [
    (["--student", "FOREIGN"], "the student's tokenizer differs from the teacher's"),
    (["--preset", "nano", "--student", "FOREIGN"], "give the student as exactly one of --preset"),
    ([], "give the student as exactly one of --preset"),
    (["--preset", "student"], "the student's vocabulary has 4096 entries, the teacher's 512"),
    (["--preset", "nano", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--preset", "nano", "--temperature", "0"], "--temperature must be a positive number, got 0.0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(nano_checkpoint, foreign_student, tmp_path, args, message):
    args = [foreign_student if a == "FOREIGN" else a for a in args]
    out = tmp_path / "out"
    result = cli("distill", "--teacher", nano_checkpoint, *args, "--data", DATA[0], "--steps", "2",
                     "--out", out)
    assert_one_line_error(result, message)
    assert not list(tmp_path.iterdir())
