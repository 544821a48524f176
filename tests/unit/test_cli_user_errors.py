"""CLI user errors found by trying every command as a new user (issue 10): each exits 2 with one
clear line naming the option/file, prints nothing on stdout and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from layerfreeze.apply import apply_plan
from layerfreeze.cli import main
from layerfreeze.export import save_trainable
from tests.helpers.cli import error_line
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "tiny_llama" / "cpt_freeze_deep_deepspeed.yaml"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_tiny_model("llama", num_layers=4).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    applied = apply_plan(AutoModelForCausalLM.from_pretrained(str(ckpt)), "0-1:lora(r=2)")
    save_trainable(applied, str(path))
    return path


@pytest.fixture
def truncated(ckpt, tmp_path):
    """A copy of ``ckpt`` whose weight file was cut short (an interrupted download)."""
    bad = tmp_path / "trunc"
    shutil.copytree(ckpt, bad)
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def test_truncated_weights_are_named_by_every_command(truncated, tmp_path, capsys, adapter):
    probe = tmp_path / "probe.txt"
    probe.write_text("layer freeze train model " * 40, encoding="utf-8")
    run = tmp_path / "run"
    before = sorted(os.listdir(tmp_path))
    cases = [
        ["eval", "--model", str(truncated), "--benchmark", "ceval", "--data-dir", str(tmp_path)],
        ["trace", "--model", str(truncated), "--probe", str(probe), "--out", str(tmp_path / "t")],
        ["export", "--model", str(truncated), "--adapter-dir", str(adapter), "--format",
         "merged", "--out", str(tmp_path / "e")],
        ["prune", "--model", str(truncated), "--num-layers", "1", "--probe", str(probe), "--out",
         str(tmp_path / "p")],
        ["compose", "--base", "A", "--model", f"A={truncated}", "--layers", "0-3:A", "--out",
         str(tmp_path / "c")],
    ]
    for argv in cases:
        line = error_line(capsys, argv)
        assert f"{truncated}: model.safetensors is not a readable safetensors file" in line, argv
        assert "truncated or corrupt" in line
    overrides = ["model.architecture=null", f"model.path={truncated}", f"logging.out_dir={run}"]
    for cmd in ("validate", "train"):
        line = error_line(capsys, [cmd, "--config", str(QUICKSTART), *overrides])
        assert f"model.path {truncated}: model.safetensors is not a readable" in line
    assert sorted(os.listdir(tmp_path)) == before


def test_export_bad_adapter_files_and_flags(ckpt, adapter, tmp_path, capsys):
    def export(adapter_dir, *extra, out=tmp_path / "out"):
        return error_line(capsys, ["export", "--model", str(ckpt), "--adapter-dir",
                                    str(adapter_dir), "--format", "peft", "--out", str(out),
                                    *extra])

    cut = tmp_path / "cut"
    shutil.copytree(adapter, cut)
    (cut / "adapter.safetensors").write_bytes((adapter / "adapter.safetensors").read_bytes()[:50])
    assert f"{cut / 'adapter.safetensors'}: not a readable safetensors file" in export(cut)
    badjson = tmp_path / "badjson"
    shutil.copytree(adapter, badjson)
    (badjson / "plan.json").write_text('{"format": ', encoding="utf-8")
    assert f"{badjson / 'plan.json'}: not valid JSON" in export(badjson)
    (badjson / "plan.json").write_text("[1, 2]", encoding="utf-8")
    assert f"{badjson / 'plan.json'}: unknown format 'list'" in export(badjson)
    line = export(tmp_path / "nope")
    assert f"--adapter-dir {tmp_path / 'nope'}: no such directory" in line
    keep = tmp_path / "notes.txt"
    keep.write_text("mine", encoding="utf-8")
    assert f"--out: '{keep}' exists and is a file; the output is a directory" in export(
        adapter, out=keep
    )
    assert keep.read_text(encoding="utf-8") == "mine"  # not replaced by an export directory
    assert "--max-lora-rank: only used with --vllm" in export(adapter, "--max-lora-rank", "16")
    assert sorted(os.listdir(tmp_path)) == ["badjson", "cut", "notes.txt"]


def test_eval_output_paths_and_ranges_checked_before_loading(ckpt, tmp_path, capsys):
    base = ["eval", "--model", str(ckpt), "--benchmark", "ceval", "--data-dir", str(tmp_path)]
    (tmp_path / "res").mkdir()
    for flag in ("--out", "--predictions", "--submission"):
        line = error_line(capsys, [*base, flag, str(tmp_path / "res")])
        assert f"{flag}: '{tmp_path / 'res'}' is a directory; give a file path." in line
    line = error_line(capsys, [*base, "--max-length", "0"])
    assert "--max-length: must be >= 1 (tokens), got 0." in line
    line = error_line(capsys, [*base, "--tokenizer", str(tmp_path / "tok")])
    assert f"--tokenizer: not a directory, got '{tmp_path / 'tok'}'" in line
    assert os.listdir(tmp_path) == ["res"] and os.listdir(tmp_path / "res") == []


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("bogus", "--device: not a torch device, got 'bogus'. Use cpu, cuda or cuda:N."),
        ("cuda:99", "--device: 'cuda:99' but this machine has"),
    ],
)
def test_trace_unusable_device(ckpt, tmp_path, capsys, device, needle):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() >= 100:
        pytest.skip("a machine with 100 GPUs has cuda:99")
    probe = tmp_path / "probe.txt"
    probe.write_text("layer freeze train model " * 40, encoding="utf-8")
    line = error_line(capsys, ["trace", "--model", str(ckpt), "--probe", str(probe),
                                "--device", device, "--out", str(tmp_path / "t")])
    assert needle in line
    assert os.listdir(tmp_path) == ["probe.txt"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "--model", "m", "--preset", "full", "--plan", "full"],
         "layerfreeze plan: argument --plan: not allowed with argument --preset. "
         "See 'layerfreeze plan --help'."),
        (["plan", "--model", "m", "--preset", "full", "--memory", "--world-size", "abc"],
         "layerfreeze plan: argument --world-size: invalid int value: 'abc'."),
        (["tokenizer", "train", "--input", "x", "--vocab-size", "300", "--out", "t",
          "--model-type", "wordpiece"],
         "layerfreeze tokenizer train: argument --model-type: invalid choice: 'wordpiece' "
         "(choose from 'unigram', 'bpe'). See 'layerfreeze tokenizer train --help'."),
        (["train"], "layerfreeze train: the following arguments are required: --config."),
        (["trian"], "layerfreeze: argument COMMAND: invalid choice: 'trian'"),
        (["plan", "--model", "m", "--plan", "-4:-1:prefix"],
         "layerfreeze plan: argument --plan: expected one argument (a value that starts with "
         "'-' is written --plan=VALUE)."),
        (["export", "--model", "m", "--adapter-dir", "a", "--format", "gguf", "--out", "o"],
         "argument --format: invalid choice: 'gguf' (choose from 'peft', 'merged')"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, needle, monkeypatch, tmp_path):
    """argparse printed its whole usage block (6-9 lines) before the message."""
    monkeypatch.chdir(tmp_path)
    errors = tmp_path / "errors.txt"
    monkeypatch.setenv("LAYERFREEZE_ERROR_FILE", str(errors))
    line = error_line(capsys, argv)
    assert needle in line
    assert "usage:" not in line
    # under a launcher the line also reaches the job's error file (launch/torchrun.sh prints it)
    assert errors.read_text(encoding="utf-8") == f"rank 0: {line.split(': ', 1)[1]}\n"
    assert os.listdir(tmp_path) == ["errors.txt"]


def test_help_still_exits_0_on_stdout(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("usage: layerfreeze plan") and "--memory" in cap.out
    assert cap.err == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--scheduler", "k8s", "--time", "1:00", "--partition", "gpu"],
         "--time, --partition: only used by --scheduler slurm, got --scheduler k8s."),
        (["--scheduler", "slurm", "--image", "registry/x:1"],
         "--image: only used by --scheduler k8s, got --scheduler slurm."),
        (["--scheduler", "slurm", "--time", "two days"],
         "--time: not a Slurm time limit, got 'two days'. Use minutes, HH:MM:SS"),
        (["--scheduler", "slurm", "--out", "jobs"],
         "--out: 'jobs' is a directory; give a file path."),
    ],
)
def test_launch_options_of_the_other_scheduler_and_bad_paths(capsys, monkeypatch, tmp_path,
                                                             argv, needle):
    """These were accepted and silently left out of the job (--time abc reached sbatch), or an
    --out directory gave a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    line = error_line(capsys, ["launch", "--config", str(QUICKSTART), *argv])
    assert needle in line
    assert os.listdir(tmp_path) == ["jobs"] and os.listdir(tmp_path / "jobs") == []


@pytest.mark.parametrize("limit", ["30", "30:00", "48:00:00", "2-00", "2-12:30", "2-00:00:00"])
def test_launch_accepts_every_slurm_time_format(capsys, limit):
    assert main(["launch", "--scheduler", "slurm", "--config", str(QUICKSTART),
                 "--time", limit]) == 0
    assert f"#SBATCH --time={limit}\n" in capsys.readouterr().out


def test_plan_model_and_plan_files_that_are_not_what_they_should_be(ckpt, tmp_path, capsys):
    weights = ckpt / "model.safetensors"
    line = error_line(capsys, ["plan", "--model", str(weights), "--preset", "full"])
    assert f"--model {weights}: not a JSON config (" in line  # was the bare codec error
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    line = error_line(capsys, ["plan", "--model", str(tmp_path / "list.json"), "--preset", "full"])
    assert "expected a JSON object (a transformers config), got list." in line
    for name, text, needle in [
        ("notjson", '{"model_type": ', "is not a valid JSON file"),  # was a traceback
        ("unknown", '{"model_type": "llamaa"}', "model type `llamaa`"),  # was many lines
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text, encoding="utf-8")
        line = error_line(capsys, ["plan", "--model", str(tmp_path / name), "--preset", "full"])
        assert f"--model {tmp_path / name / 'config.json'}: cannot read it (" in line
        assert needle in line
    line = error_line(capsys, ["plan", "--model", str(ckpt), "--plan", str(tmp_path)])
    assert f"--plan {tmp_path}: is a directory." in line  # was "unknown preset '<dir>'"


def test_section_message_is_not_prefixed_twice(ckpt, capsys):
    line = error_line(capsys, ["validate", "--config", str(QUICKSTART), f"model.path={ckpt}"])
    assert "ERROR layerfreeze.validate: model: set exactly one of model.path" in line  # not model.model


def test_eval_submission_outside_ceval_test_is_refused_up_front(ckpt, capsys, eval_data_dir,
                                                                tmp_path):
    """--submission with another split only warned, after the whole evaluation had run."""
    line = error_line(capsys, ["eval", "--model", str(ckpt), "--benchmark", "ceval",
                                "--data-dir", str(eval_data_dir), "--split", "val",
                                "--submission", str(tmp_path / "sub.json")])
    assert "--submission: the official submission file is for --benchmark ceval --split test " \
           "only, got ceval val." in line
    assert not (tmp_path / "sub.json").exists()


def test_help_names_both_engines_for_train(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help column
    assert "train continued pre-training with a layer plan (DeepSpeed or Megatron" in out


@pytest.mark.parametrize("key", ["logging.out_dir", "checkpoint.dir", "checkpoint.export_dir"])
def test_run_output_paths_that_are_files(tmp_path, capsys, key):
    """train with logging.out_dir naming a file died with a FileExistsError traceback after the
    process group had started."""
    f = tmp_path / "notes.txt"
    f.write_text("mine", encoding="utf-8")
    for cmd in ("validate", "train"):
        line = error_line(capsys, [cmd, "--config", str(QUICKSTART), f"{key}={f}"])
        assert f"{key}: '{f}' exists and is not a directory. Choose another" in line
    assert os.listdir(tmp_path) == ["notes.txt"] and f.read_text(encoding="utf-8") == "mine"


def test_tokenizer_directory_without_a_tokenizer(ckpt, tmp_path, capsys, eval_data_dir):
    """transformers' multi-line message came through as six lines (train) or as its first line
    only, 'Couldn't instantiate the backend tokenizer from one of:' (eval, trace)."""
    empty = tmp_path / "tok"
    empty.mkdir()
    line = error_line(capsys, ["eval", "--model", str(ckpt), "--tokenizer", str(empty),
                                "--benchmark", "ceval", "--data-dir", str(eval_data_dir),
                                "--subjects", "computer_network", "--limit", "1"])
    assert f"--tokenizer {empty}: cannot load a tokenizer: Couldn't instantiate" in line
    assert "(1) a `tokenizers` library serialization file" in line
    from layerfreeze.data.config import TokenizerConfig
    from layerfreeze.data.tokenizer import load_tokenizer
    from layerfreeze.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_tokenizer(TokenizerConfig(path=str(empty)))
    assert "\n" not in str(e.value) and "holds no tokenizer AutoTokenizer can load" in str(e.value)


def test_tokenizer_out_that_is_a_file_is_kept(tmp_path, capsys):
    """tokenizer train --out FILE silently replaced the file with the tokenizer directory."""
    f = tmp_path / "notes.txt"
    f.write_text("mine", encoding="utf-8")
    line = error_line(capsys, ["tokenizer", "train", "--input", "@bundled", "--vocab-size",
                                "400", "--out", str(f)])
    assert f"--out: '{f}' exists and is a file; the output is a directory." in line
    assert os.listdir(tmp_path) == ["notes.txt"] and f.read_text(encoding="utf-8") == "mine"


def test_atomic_outputs_leave_no_debris_and_follow_the_umask(tmp_path):
    """Replacing a file with an atomic directory (compose/prune/trace --overwrite) left the old
    file behind as '.<name>.old.<pid>' (rmtree cannot remove a file), and atomic outputs were
    0600 files in 0700 directories (mkstemp/mkdtemp modes) whatever the umask."""
    from layerfreeze.utils.io import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        target = tmp_path / "out"
        target.write_text("old file", encoding="utf-8")
        with atomic_directory(target, overwrite=True) as staging:
            atomic_write_text(staging / "a.json", "{}")
        atomic_write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["b.txt", "out"]  # no .out.old.<pid>
    assert os.listdir(target) == ["a.json"]
    assert (target.stat().st_mode & 0o777) == 0o755
    assert ((target / "a.json").stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "b.txt").stat().st_mode & 0o777) == 0o644


def test_compose_map_that_is_a_directory_or_broken(tmp_path, capsys):
    line = error_line(capsys, ["compose", "--map", str(tmp_path), "--out", str(tmp_path / "o")])
    assert f"--map {tmp_path}: is a directory; pass a YAML/JSON map file." in line  # 'no such file'
    bad = tmp_path / "map.yaml"
    bad.write_text("base: A\nmodels: {A: x\n", encoding="utf-8")
    line = error_line(capsys, ["compose", "--map", str(bad), "--out", str(tmp_path / "o")])
    # said only '(while parsing a flow mapping)': now where and what, like plan --plan
    assert f"--map {bad}: not valid YAML/JSON at line 3, column 1: expected ',' or '}}'" in line
    assert os.listdir(tmp_path) == ["map.yaml"]


def test_run_config_that_is_binary_or_a_directory(ckpt, tmp_path, capsys):
    weights = ckpt / "model.safetensors"
    for cmd in ("validate", "train", "launch"):
        extra = ["--scheduler", "slurm"] if cmd == "launch" else []
        line = error_line(capsys, [cmd, *extra, "--config", str(weights)])
        assert f"--config: '{weights}' is not a UTF-8 text file." in line  # was a traceback
        line = error_line(capsys, [cmd, *extra, "--config", str(tmp_path)])
        assert f"--config: '{tmp_path}' is a directory." in line  # was 'file not found'
    assert os.listdir(tmp_path) == []


def test_deepspeed_json_that_is_binary(ckpt, tmp_path, capsys):
    binary = tmp_path / "zero2.json"
    shutil.copy(ckpt / "model.safetensors", binary)
    line = error_line(capsys, ["validate", "--config", str(QUICKSTART), f"deepspeed={binary}"])
    assert f"deepspeed: {binary} is not valid JSON: 'utf-8' codec" in line  # was a traceback


def test_empty_corpus_named_by_its_run_config_key(tmp_path):
    """train with an empty data.paths file (and no tokenizer.path) said 'input: no text found',
    the tokenizer CLI's name, not the run config's key."""
    from layerfreeze.data.config import TokenizerConfig
    from layerfreeze.data.tokenizer import prepare_tokenizer

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^data\.paths: no text found in {empty}\. "):
        prepare_tokenizer(TokenizerConfig(vocab_size=400), [str(empty)], tmp_path / "tok")
    with pytest.raises(ValueError, match=r"^tokenizer\.train_inputs\[0\]: no such file"):
        prepare_tokenizer(TokenizerConfig(vocab_size=400, train_inputs=[str(tmp_path / "no")]),
                          [str(empty)], tmp_path / "tok")
    assert os.listdir(tmp_path) == ["empty.txt"]


def test_trace_probe_directory_or_missing_before_loading(ckpt, tmp_path, capsys):
    """A directory was reported as 'no such file', and both only after the model had loaded."""
    (tmp_path / "texts").mkdir()
    line = error_line(capsys, ["trace", "--model", str(ckpt), "--probe", str(tmp_path / "texts"),
                                "--out", str(tmp_path / "t")])
    assert f"--probe {tmp_path / 'texts'}: is a directory; pass its .txt/.jsonl files" in line
    line = error_line(capsys, ["trace", "--model", str(ckpt), "--probe", str(tmp_path / "x.txt"),
                                "--out", str(tmp_path / "t")])
    assert f"--probe {tmp_path / 'x.txt'}: no such file." in line
    assert os.listdir(tmp_path) == ["texts"]


def test_benchmark_csv_cut_inside_a_character(ckpt, tmp_path, capsys, eval_data_dir):
    """A C-Eval CSV truncated mid-character gave a bare "'utf-8' codec can't decode" line."""
    src = Path(eval_data_dir) / "ceval"
    data = tmp_path / "ceval"
    (data / "dev").mkdir(parents=True)
    (data / "val").mkdir()
    shutil.copy(src / "subject_mapping.json", data)
    shutil.copy(src / "dev" / "computer_network_dev.csv", data / "dev")
    raw = (src / "val" / "computer_network_val.csv").read_bytes()
    cut = next(i for i in range(100, len(raw)) if 0x80 <= raw[i] <= 0xBF)  # inside a character
    bad = data / "val" / "computer_network_val.csv"
    bad.write_bytes(raw[:cut])
    line = error_line(capsys, ["eval", "--model", str(ckpt), "--benchmark", "ceval",
                                "--data-dir", str(data), "--subjects", "computer_network"])
    assert f"{bad}: not UTF-8 text (" in line and "truncated or corrupt" in line


def test_several_config_problems_are_one_line(tmp_path, capsys):
    """A config with several problems reports all of them, numbered, on one ERROR line."""
    import yaml

    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg["optim"]["lr"] = -1.0
    cfg["train"]["steps"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = error_line(capsys, ["validate", "--config", str(path)])
    assert "configuration problems: (1) " in line and " (2) " in line, line
    assert "optim.lr" in line and "train.steps" in line, line
