"""The `pqpatch` command line and model loading, with a tiny model and tokenizer saved to a temporary folder."""

import argparse
import json
import subprocess
import sys

import pytest
from conftest import tiny_model

from pqpatch import cli, models


# ---- argument parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("2k", 2048), ("16K", 16384), ("1.5k", 1536), ("3000", 3000)])
def test_parse_length(text, value):
    assert cli.parse_length(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "-2k"])
def test_parse_length_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_length(text)


def test_parse_budget():
    assert cli.parse_budget("0.2") == 0.2 and isinstance(cli.parse_budget("512"), int)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_budget("1.5")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_budget("lots")


def test_eval_defaults_and_lists():
    a = cli.build_parser().parse_args(["eval", "niah"])
    assert a.task == ("niah",) and a.lengths == (2048, 4096, 8192, 16384) and a.budgets == (0.05, 0.1, 0.2)
    assert a.methods == ("dense", "pq", "oracle", "streaming", "quest", "snapkv") and a.model is None
    a = cli.build_parser().parse_args(
        ["eval", "kl,recall", "--lengths", "2k,4k", "--budgets", "0.1,256", "--methods", "pq,oracle",
         "--depths", "0,1", "--out", "x", "--sink-tokens", "8"]
    )
    assert a.task == ("kl", "recall") and a.lengths == (2048, 4096) and a.budgets == (0.1, 256)
    assert a.methods == ("pq", "oracle") and a.depths == (0.0, 1.0) and a.out == "x"
    assert cli._base_config(a) == {"sink_tokens": 8}


def test_demo_defaults():
    a = cli.build_parser().parse_args(["demo"])
    assert (a.length, a.budget, a.max_new_tokens, a.model) == (8192, 0.2, 8, None)
    a = cli.build_parser().parse_args(["demo", "--length", "4k", "--budget", "0.1", "--max-new-tokens", "4"])
    assert (a.length, a.budget, a.max_new_tokens) == (4096, 0.1, 4)


@pytest.mark.parametrize("argv", [["eval", "sudoku"], ["eval", "passkey", "--methods", "pq,magic"],
                                  ["eval", "passkey", "--depths", "1.5"], ["bench"], []])
def test_bad_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pqpatch", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout and "eval" in out.stdout


# ---- model loading + eval through the CLI --------------------------------------------------------------------
def _char_tokenizer():
    """A character-level fast tokenizer built locally (ids 1..95 = printable ASCII, 0 = <bos>/<pad>)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{chr(i): i - 31 for i in range(32, 127)}}
    tk = Tokenizer(WordLevel(vocab, unk_token=" "))
    tk.pre_tokenizer = Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<bos>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_model("gemma3", layers=2).save_pretrained(path)
    _char_tokenizer().save_pretrained(path)
    return path


def test_load_model_from_a_folder(tiny_dir):
    model, tok = models.load_model(str(tiny_dir), progress=False)
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert tok("ab", add_special_tokens=False).input_ids == [66, 67]
    assert tok.decode([66, 1, 67]) == "a b"


def test_load_model_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_model(str(tmp_path / "nope.gguf"), progress=False)


def test_missing_optional_package_names_the_install(monkeypatch):
    with pytest.raises(ImportError, match="pip install some-missing-pkg"):
        models._require("some_missing_module_xyz", "some-missing-pkg", "this feature")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PQPATCH_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PQPATCH_CACHE_DIR")
    assert models.cache_dir().name == "pqpatch"


def test_cli_eval_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main([
        "eval", "passkey", "--model", str(tiny_dir), "--lengths", "320", "--depths", "0.5", "--budgets", "0.2",
        "--methods", "dense,pq,streaming", "--min-context", "64", "--sink-tokens", "4", "--out", str(out),
        "--quiet",
    ])
    assert rc == 0
    res = json.loads((out / "passkey.json").read_text())
    assert [r["method"] for r in res["records"]] == ["dense", "pq", "streaming"]
    assert res["model"] == str(tiny_dir) and res["settings"]["base"] == {"sink_tokens": 4, "min_context": 64}
    assert (out / "passkey.md").is_file()
    assert "| pq @0.2 |" in capsys.readouterr().out


# ---- usage errors: one line on stderr, exit status 2, before any heavy work -------------------------------------
def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although an argument was bad")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_default_model", refuse)


def _exit_status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_eval_out_is_checked_before_the_model_loads(where, tmp_path, monkeypatch, capsys):
    """A typo in --out used to surface after the whole evaluation (25 minutes)."""
    _no_model_load(monkeypatch)
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "file" else blocker / "res"
    assert _exit_status(["eval", "passkey", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("pqpatch eval: error: --out")


def test_eval_out_folder_exists_before_the_model_loads(tmp_path, monkeypatch):
    out = tmp_path / "new" / "res"
    seen = []

    class Loaded(Exception):
        pass

    def load(*a, **k):
        seen.append(out.is_dir())
        raise Loaded

    monkeypatch.setattr(models, "load_default_model", load)
    with pytest.raises(Loaded):
        cli.main(["eval", "passkey", "--out", str(out)])
    assert seen == [True]


BAD_ARGS = [  # (argv, words the error line must contain); TINY stands for the tiny model's folder
    (["eval", "passkey", "--model", "{tmp}/no-such-model"], "no such file"),
    (["eval", "passkey", "--model", "{tmp}/model.gguf"], "no such file"),
    (["eval", "passkey", "--model", "{tmp}"], "not a transformers checkpoint"),  # a folder, but not a model
    (["eval", "passkey", "--model", "{tmp}/notes.txt"], "not a model"),
    (["eval", "passkey", "--model", "TINY", "--num-subspaces", "3", "--set", "quantizer=pq"],
     "does not divide the model's head dim 16"),
    (["eval", "passkey", "--model", "TINY", "--num-subspaces", "5"], "use quantizer='pq'"),  # 5 residual stages
    (["eval", "passkey", "--decode-threads", "-1"], "--decode-threads"),
    (["eval", "kl", "--teacher-tokens", "0"], "--teacher-tokens"),
    (["eval", "kl", "--model", "TINY", "--lengths", "300,2k", "--teacher-tokens", "299"], "teacher_tokens=299"),
    (["eval", "passkey", "--model", "TINY", "--lengths", "20"], "too short"),
    (["eval", "niah", "--model", "TINY", "--lengths", "300"], "too short"),
    (["eval", "passkey", "--budgets", "inf"], "--budgets"),
    (["eval", "passkey", "--budgets", "0.1,nan"], "--budgets"),
    (["eval", "passkey", "--budgets", "0"], "--budgets"),
    (["eval", "passkey", "--budgets", "-3"], "--budgets"),
    (["eval", "passkey", "--budgets", "1.5"], "--budgets"),
    (["demo", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["demo", "--decode-threads", "-1"], "--decode-threads"),
    (["demo", "--budget", "inf"], "--budget"),
    (["demo", "--model", "{tmp}/no-such-model"], "no such file"),
    (["demo", "--model", "TINY", "--num-subspaces", "5"], "use quantizer='pq'"),
    (["demo", "--model", "TINY", "--length", "20"], "too short"),
]


@pytest.mark.parametrize("argv,words", BAD_ARGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_argument_is_one_line_and_exit_2(argv, words, tiny_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("TINY", str(tiny_dir)) for a in argv]
    if argv[0] == "eval":
        argv += ["--out", str(tmp_path / "res"), "--quiet"]
    if "TINY" not in " ".join(argv) and str(tiny_dir) not in argv:
        _no_model_load(monkeypatch)  # nothing to load before the error
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"pqpatch {argv[0]}: error:") and words in last, err


def test_usage_errors_leave_no_results(tiny_dir, tmp_path, capsys):
    """A rejected run writes nothing but the (empty) output folder."""
    out = tmp_path / "res"
    assert _exit_status(["eval", "passkey", "--model", str(tiny_dir), "--num-subspaces", "5", "--out", str(out)]) == 2
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.slow
def test_default_model_loads_and_answers_a_passkey():
    """Loads the real Gemma-3-270M (converted once into the cache dir) and runs a short passkey eval."""
    from pqpatch.eval.runner import EvalSettings, run_eval
    from pqpatch.eval.tasks import HFCodec

    model, tok = models.load_default_model(progress=False)
    assert model.config.model_type == "gemma3_text"
    s = EvalSettings(tasks=("passkey",), lengths=(2048,), depths=(0.5,), budgets=(0.2,), methods=("dense", "pq"))
    res = run_eval(model, HFCodec(tok), s, progress=False)
    assert [r["score"] for r in res["records"]] == [1.0, 1.0]


def test_demo_runs_on_a_tiny_model(tiny_dir, capsys):
    from pqpatch.eval.demo import run_demo

    from pqpatch.cache import bucket_length

    res = run_demo(str(tiny_dir), length=320, budget=0.5, max_new_tokens=4, min_context=64, sink_tokens=4,
                   num_subspaces=2)
    out = capsys.readouterr().out
    assert "dense  :" in out and "pqpatch:" in out and "ms/token" in out
    mem = res["memory"]
    n = res["prompt_tokens"] + 4  # the cache holds prompt + new tokens
    assert mem["dense_global"] == n * 2 * 2 * 16 * 4  # one global layer, K+V, 2 KV heads x 16 dims, float32
    assert mem["pq_codes"] == 2 * bucket_length(n) * 2 and mem["pq_centroids"] > 0  # [Hkv, max_len, m] uint8
    assert 0 < mem["pq_attended"] < mem["dense_global"]
